"""Calibration fitted on a validation table and reported on the test table: the temperature (NLL, ECE and Brier
before and after, on both tables), the operating thresholds found on validation and their sensitivity, specificity,
PPV and NPV on test with bootstrap intervals, per subgroup when asked, and the report's PNGs."""

from pathlib import Path

import numpy as np
import torch

from .benchmarks import BENCHMARKS, ZeroShotScores, benchmark_scores, probabilities_of
from .bootstrap import bootstrap_intervals
from .calibration import calibration_metrics, fit_temperature, top_class
from .curves import reliability_diagram, roc_and_pr_curves
from .operating_points import label_outcomes, operating_thresholds, thresholded_labels, thresholds_metrics
from .subgroups import subgroup_metrics
from ..errors import InvalidArgumentError
from ..models.ace_lora.calibration import Calibration
from ..models.ace_lora.zero_shot import ZeroShotClassifier
from ..outputs.terminal import printable


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
    validation_logits, validation_targets = validation
    report = {
        "temperature": calibration.temperature, "target": calibration.target, "thresholds": calibration.thresholds,
        "validation": {"num_images": len(validation_targets),
                       "before": calibration_metrics(probabilities_of(validation_logits), validation_targets),
                       "after": calibration_metrics(calibrated(calibration, validation_logits), validation_targets)},
        "test": {"num_images": len(test_targets),
                 "before": calibration_metrics(probabilities_of(test_logits), test_targets),
                 "after": test_metrics(probabilities, test_targets),
                 "confidence_intervals_95": bootstrap_intervals(test_metrics, probabilities, test_targets,
                                                                resamples, seed)},
    }
    if subgroups:
        report["subgroups"] = subgroup_metrics(test_metrics, probabilities, test_targets, subgroups, resamples, seed)
    return report


def calibrate_benchmark(name: str, classifier: ZeroShotClassifier, validation: tuple[list[str], list], source: str,
                        test: ZeroShotScores, references: list, subgroups: dict[str, list[str]] | None,
                        target: tuple[str, float] | None, model: str, resamples: int,
                        seed: int) -> tuple[dict, Calibration]:
    """Fit the calibration of benchmark `name` on the validation images and references (read from `source`) and
    report it on the test table's scores (`references` and `subgroups` per test image)."""
    benchmark, (images, validation_references) = BENCHMARKS[name], validation
    labels = list(benchmark.classes.values())
    scores = benchmark_scores(f"--calibrate-on {source}", classifier, images, labels)
    validation_targets = np.asarray([validation_references[index] for index in scores.kept])
    fitted_on = {"table": source, "images": len(scores.kept), "dataset": name, "model": model}
    calibration = fit_calibration(scores.logits, validation_targets, labels, list(benchmark.templates), target,
                                  fitted_on, source)
    test_targets = np.asarray([references[index] for index in test.kept])
    kept_subgroups = {column: [values[index] for index in test.kept] for column, values in (subgroups or {}).items()}
    report = calibrated_evaluation(calibration, (scores.logits, validation_targets), (test.logits, test_targets),
                                   kept_subgroups, resamples, seed)
    return {**report, "skipped": scores.skipped}, calibration


def reliability_points(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a reliability diagram bins: top-class confidence and correctness, or every finding's probability and
    outcome of a multi-label set."""
    if targets.ndim == 2:
        return probabilities.ravel(), targets.ravel().astype(bool)
    return top_class(probabilities, targets)


def write_figures(logits: np.ndarray, targets: np.ndarray, labels: list[str], calibration: Calibration | None,
                  stem: Path) -> list[Path]:
    """`<stem>_reliability.png` (zero-shot, and calibrated when there is a calibration) and the ROC and
    precision-recall curves (`<stem>_roc.png`, `<stem>_pr.png`) of the labels that get operating points."""
    probabilities = probabilities_of(logits)
    curves = {"zero-shot": reliability_points(probabilities, targets)}
    if calibration is not None:
        probabilities = calibrated(calibration, logits)
        curves[f"calibrated (T = {calibration.temperature:.3f})"] = reliability_points(probabilities, targets)
    outcomes = {labels[column]: (column, label_outcomes(targets, column)) for column in thresholded_labels(labels)}
    return [reliability_diagram(curves, stem.with_name(stem.name + "_reliability.png")),
            *roc_and_pr_curves(probabilities, outcomes, stem)]


FIGURES = ("reliability", "roc", "pr")


def _line(metrics: dict, intervals: dict | None = None) -> str:
    return ", ".join(f"{name} {value:.4f}" + (f" [{intervals[name][0]:.4f}, {intervals[name][1]:.4f}]"
                                               if intervals and name in intervals else "")
                     for name, value in metrics.items() if np.isscalar(value))


def print_calibrated(report: dict) -> None:
    print(f"  temperature {report['temperature']:.4f} (fitted on {report['validation']['num_images']} validation "
          "images)")
    for table in ("validation", "test"):
        before, after = report[table]["before"], report[table]["after"]
        print(f"  {table}: before " + _line(before) + "; after " + _line({k: after[k] for k in before}))
    if report["thresholds"]:
        target = report["target"]
        print(f"  operating point (target {target['metric']} {target['value']}): thresholds "
              + ", ".join(f"{label} {value:.4f}" for label, value in report["thresholds"].items()))
        decisions = {k: v for k, v in report["test"]["after"].items() if k not in report["test"]["before"]}
        print("  test: " + _line(decisions, report["test"]["confidence_intervals_95"]))
    print_subgroups(report.get("subgroups", {}))


def print_subgroups(subgroups: dict) -> None:
    for column, entry in subgroups.items():
        for value, group in entry["groups"].items():
            print(printable(f"  {column}={value} ({group['num_images']} images): "
                            + _line(group["metrics"], group["confidence_intervals_95"])))
        for metric, gap in entry["largest_gap"].items():
            print(printable(f"  {column}: largest {metric} gap {gap['gap']:.4f} ({gap['highest']} vs "
                            f"{gap['lowest']})"))


__all__ = ["FIGURES", "calibrate_benchmark", "calibrated", "calibrated_evaluation", "check_validation_targets",
           "fit_calibration", "print_calibrated", "print_subgroups", "reliability_points", "write_figures"]
