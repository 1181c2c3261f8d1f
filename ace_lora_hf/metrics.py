"""Classification metrics as the ACE-LoRA evaluations define them."""

import numpy as np
from sklearn.metrics import roc_auc_score


def binary_classification_metrics(positive_probability, targets) -> dict[str, float]:
    """Accuracy (probability >= 0.5, i.e. the argmax of two classes) and ROC AUC of the positive class.

    AUC is NaN when `targets` hold a single class, where it is undefined.
    """
    positive_probability = np.asarray(positive_probability, dtype=np.float64)
    targets = np.asarray(targets).astype(int)
    if positive_probability.shape != targets.shape:
        raise ValueError(f"{positive_probability.shape[0]} probabilities for {targets.shape[0]} targets.")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError(f"Binary targets must be 0 or 1; got {sorted(set(targets.tolist()))}.")
    accuracy = float(((positive_probability >= 0.5) == targets).mean())
    auc = float(roc_auc_score(targets, positive_probability)) if len(set(targets.tolist())) == 2 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


__all__ = ["binary_classification_metrics"]
