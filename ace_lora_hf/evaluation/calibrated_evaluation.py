"""Calibration fitted on a validation table and reported on the test table: the temperature (NLL, ECE and Brier
before and after, on both tables), the operating thresholds found on validation and their sensitivity, specificity,
PPV and NPV on test with bootstrap intervals, per subgroup when asked, and the report's PNGs."""

from pathlib import Path

import numpy as np
import torch

from .benchmarks import probabilities_of
from .bootstrap import bootstrap_intervals
from .calibration import calibration_metrics, fit_temperature, top_class
from .curves import reliability_diagram, roc_and_pr_curves
from .operating_points import label_outcomes, operating_thresholds, thresholded_labels, thresholds_metrics
from .subgroups import subgroup_metrics
from ..errors import InvalidArgumentError
from ..models.ace_lora.calibration import Calibration


def check_validation_targets(targets: np.ndarray, labels: list[str], source: str) -> None:
    """A validation table must hold more than one class: a temperature fitted on one class only grows."""
    present = sorted(set(np.asarray(targets).tolist()))
    if len(present) < 2:
        raise InvalidArgumentError(f"--calibrate-on {source}: every row is {labels[present[0]]!r}; calibration needs "
                                   "rows of at least two classes.")


def fit_calibration(logits: np.ndarray, targets: np.ndarray, labels: list[str], templates: list[str],
                    target: tuple[str, float] | None, fitted_on: dict, source: str) -> Calibration:
    """The temperature minimising the validation NLL and, for a `(metric, value)` target, each label's threshold on
    the calibrated validation probabilities."""
    if np.asarray(targets).ndim != 1:
        raise InvalidArgumentError(f"--calibrate-on {source}: calibration fits single-label tables (one class per "
                                   "image); this dataset is multi-label.")
    check_validation_targets(targets, labels, source)
    calibration = Calibration(tuple(labels), tuple(templates), fit_temperature(logits, targets), fitted_on=fitted_on)
    if target is None:
        return calibration
    metric, value = target
    thresholds = operating_thresholds(calibrated(calibration, logits), targets, labels, metric, value, source)
    return Calibration(calibration.labels, calibration.templates, calibration.temperature, thresholds,
                       {"metric": metric, "value": value}, fitted_on)


def calibrated(calibration: Calibration, logits: np.ndarray) -> np.ndarray:
    return calibration.apply(torch.from_numpy(np.asarray(logits, dtype=np.float32))).numpy()


def calibrated_evaluation(calibration: Calibration, validation: tuple[np.ndarray, np.ndarray],
                          test: tuple[np.ndarray, np.ndarray], subgroups: dict[str, list[str]] | None,
                          resamples: int, seed: int) -> dict:
    """The report of `calibration` on (logits, targets) of the validation and test tables."""
    labels = list(calibration.labels)
    test_logits, test_targets = test

    def test_metrics(probabilities: np.ndarray, targets: np.ndarray) -> dict:
        return {**calibration_metrics(probabilities, targets),
                **thresholds_metrics(probabilities, targets, labels, calibration.thresholds)}

    probabilities = calibrated(calibration, test_logits)
    report = {
        "temperature": calibration.temperature, "target": calibration.target, "thresholds": calibration.thresholds,
        "validation": {"num_images": len(validation[1]), "before": calibration_metrics(probabilities_of(validation[0]), validation[1]),
                       "after": calibration_metrics(calibrated(calibration, validation[0]), validation[1])},
        "test": {"num_images": len(test_targets), "before": calibration_metrics(probabilities_of(test_logits), test_targets),
                 "after": test_metrics(probabilities, test_targets),
                 "confidence_intervals_95": bootstrap_intervals(test_metrics, probabilities, test_targets,
                                                                resamples, seed)},
    }
    if subgroups:
        report["subgroups"] = subgroup_metrics(test_metrics, probabilities, test_targets, subgroups, resamples, seed)
    return report


def write_figures(calibration: Calibration, test: tuple[np.ndarray, np.ndarray], stem: Path) -> list[Path]:
    """`<stem>_reliability.png` (test, before and after) and the ROC and PR curves of the thresholded labels."""
    logits, targets = test
    after = calibrated(calibration, logits)
    curves = {"before": top_class(probabilities_of(logits), targets), f"after (T = {calibration.temperature:.3f})":
              top_class(after, targets)}
    labels = list(calibration.labels)
    outcomes = {labels[column]: (column, label_outcomes(targets, column)) for column in thresholded_labels(labels)}
    return [reliability_diagram(curves, stem.with_name(stem.name + "_reliability.png")),
            *roc_and_pr_curves(after, outcomes, stem)]


__all__ = ["calibrated", "calibrated_evaluation", "check_validation_targets", "fit_calibration", "write_figures"]
