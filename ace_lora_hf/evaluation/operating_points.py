"""Operating points: the threshold on a label's probability that meets a target sensitivity or specificity on a
validation table, and what that threshold gives on a test table (sensitivity, specificity, PPV, NPV).

A label is decided present where its probability is at or above the threshold. For a target sensitivity the
threshold is the highest that reaches it (the best specificity that keeps it); for a target specificity, the lowest
that keeps it (the best sensitivity).
"""

import numpy as np
from sklearn.metrics import roc_curve

from ..errors import InvalidArgumentError


def check_target(metric: str, value: float) -> None:
    if not 0 < value < 1:
        raise InvalidArgumentError(f"--target-{metric} {value}: give a value strictly between 0 and 1, e.g. 0.95.")


def operating_threshold(scores, positives, metric: str, target: float) -> float:
    """The threshold of `scores` (higher = more likely present) meeting `target` `metric` on these outcomes."""
    check_target(metric, target)
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives).astype(bool)
    false_positive_rate, sensitivity, thresholds = roc_curve(positives, scores, drop_intermediate=False)
    if metric == "sensitivity":
        index = int(np.argmax(sensitivity >= target))
    else:
        index = int(np.flatnonzero(1 - false_positive_rate >= target)[-1])
    # roc_curve's first threshold (infinite) calls nothing present: just above the highest score says the same.
    return float(thresholds[index]) if np.isfinite(thresholds[index]) else float(np.nextafter(scores.max(), np.inf))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def decision_metrics(scores, positives, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV of deciding `scores >= threshold` (NaN where a denominator is 0)."""
    decided, positives = np.asarray(scores) >= threshold, np.asarray(positives).astype(bool)
    true_positives, false_positives = int((decided & positives).sum()), int((decided & ~positives).sum())
    false_negatives, true_negatives = int((~decided & positives).sum()), int((~decided & ~positives).sum())
    return {"sensitivity": _ratio(true_positives, true_positives + false_negatives),
            "specificity": _ratio(true_negatives, true_negatives + false_positives),
            "ppv": _ratio(true_positives, true_positives + false_positives),
            "npv": _ratio(true_negatives, true_negatives + false_negatives)}


def label_outcomes(targets: np.ndarray, column: int) -> np.ndarray:
    """Whether each image has label `column`: its 0/1 column (multi-label), or its class is that one."""
    targets = np.asarray(targets)
    return targets[:, column].astype(bool) if targets.ndim == 2 else targets == column


def thresholded_labels(labels: list[str]) -> list[int]:
    """The labels that get an operating point: the positive (second) one of a binary set, every one otherwise."""
    return [1] if len(labels) == 2 else list(range(len(labels)))


def check_both_outcomes(targets, labels: list[str], source: str) -> None:
    """Refuse by name a label that gets an operating point but is present in every row of `source`, or in none."""
    for column in thresholded_labels(labels):
        outcomes = label_outcomes(targets, column)
        if outcomes.all() or not outcomes.any():
            state = "present" if outcomes.any() else "absent"
            raise InvalidArgumentError(f"{source}: label {labels[column]!r} is {state} in every row; an operating "
                                       "point needs images with and without it.")


def operating_thresholds(probabilities, targets, labels: list[str], metric: str, target: float,
                         source: str) -> dict[str, float]:
    """Label -> its threshold on a validation set (see `check_both_outcomes`)."""
    check_both_outcomes(targets, labels, source)
    probabilities = np.asarray(probabilities)
    return {labels[column]: operating_threshold(probabilities[:, column], label_outcomes(targets, column), metric,
                                                target) for column in thresholded_labels(labels)}


def thresholds_metrics(probabilities, targets, labels: list[str], thresholds: dict[str, float]) -> dict[str, float]:
    """`<label> <metric>` of every label's decisions at its threshold (flat, for bootstrap intervals)."""
    probabilities = np.asarray(probabilities)
    return {f"{label} {name}": value for label, threshold in thresholds.items()
            for name, value in decision_metrics(probabilities[:, labels.index(label)],
                                                label_outcomes(targets, labels.index(label)), threshold).items()}


__all__ = ["check_both_outcomes", "check_target", "decision_metrics", "label_outcomes", "operating_threshold",
           "operating_thresholds", "thresholded_labels", "thresholds_metrics"]
