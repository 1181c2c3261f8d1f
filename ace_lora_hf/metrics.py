"""Classification metrics as the ACE-LoRA evaluations define them (also served as `evaluate` modules)."""

import numpy as np
from sklearn.metrics import roc_auc_score


def _as_arrays(scores, targets, expected_target_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(int)
    if scores.ndim != 2:
        raise ValueError(f"Expected scores of shape [samples, classes], got {scores.shape}.")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {targets.shape[0]} targets.")
    if targets.ndim != expected_target_ndim:
        raise ValueError(f"Expected targets with {expected_target_ndim} dimension(s), got shape {targets.shape}.")
    return scores, targets


def classification_metrics(probabilities, targets) -> dict[str, float]:
    """Single-label classification: top-1 accuracy and ROC AUC.

    With two classes the AUC is that of the positive class (index 1); with more, the macro one-vs-rest AUC.
    AUC is NaN when the targets hold a single class, where it is undefined.

    Args:
        probabilities: `[N, C]` class probabilities (or any scores ranking the classes).
        targets: `[N]` class indices.
    """
    probabilities, targets = _as_arrays(probabilities, targets, expected_target_ndim=1)
    num_classes = probabilities.shape[1]
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"Targets must be class indices in [0, {num_classes}); got {sorted(set(targets.tolist()))}.")
    accuracy = float((probabilities.argmax(axis=1) == targets).mean())
    if len(np.unique(targets)) < 2:
        return {"accuracy": accuracy, "auc": float("nan")}
    if num_classes == 2:
        auc = roc_auc_score(targets, probabilities[:, 1])
    else:
        normalised = probabilities / probabilities.sum(axis=1, keepdims=True)
        auc = roc_auc_score(targets, normalised, multi_class="ovr", average="macro", labels=list(range(num_classes)))
    return {"accuracy": accuracy, "auc": float(auc)}


def multilabel_metrics(scores, targets) -> dict[str, float | list[float]]:
    """Multi-label classification: ROC AUC per class and their macro mean (over classes with both outcomes)."""
    scores, targets = _as_arrays(scores, targets, expected_target_ndim=2)
    per_class = [
        float(roc_auc_score(targets[:, c], scores[:, c])) if len(np.unique(targets[:, c])) == 2 else float("nan")
        for c in range(scores.shape[1])
    ]
    defined = [auc for auc in per_class if not np.isnan(auc)]
    return {"auc": float(np.mean(defined)) if defined else float("nan"), "auc_per_class": per_class}


__all__ = ["classification_metrics", "multilabel_metrics"]
