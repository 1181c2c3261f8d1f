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


def dice_metrics(predicted_masks, true_masks) -> dict[str, float]:
    """Dice of binary masks (`[N, H, W]`, anything > 0 is foreground), averaged two ways.

    `dice_per_image`: the mean over images of each image's Dice, an image with neither a true nor a predicted
    foreground counting as 1 (a correct empty prediction). `dice_pooled`: one Dice over all pixels of all images.
    """
    predicted = np.asarray(predicted_masks) > 0
    true = np.asarray(true_masks) > 0
    if predicted.shape != true.shape:
        raise ValueError(f"Predicted masks {predicted.shape} and true masks {true.shape} differ in shape.")
    axes = tuple(range(1, predicted.ndim))
    overlap = (predicted & true).sum(axis=axes)
    total = predicted.sum(axis=axes) + true.sum(axis=axes)
    per_image = np.where(total == 0, 1.0, 2 * overlap / np.maximum(total, 1))
    pooled = 2 * overlap.sum() / total.sum() if total.sum() else 1.0
    return {"dice_per_image": float(per_image.mean()), "dice_pooled": float(pooled)}


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(-1)


def _iou_matrix(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    top_left = np.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(-1)
    return intersection / np.maximum(_areas(boxes)[:, None] + _areas(others)[None, :] - intersection, 1e-12)


RSNA_IOU_THRESHOLDS = tuple(round(0.4 + 0.05 * step, 2) for step in range(8))  # 0.4, 0.45, ..., 0.75


def detection_map(predictions: list[dict], ground_truths: list[list], iou_thresholds=RSNA_IOU_THRESHOLDS) -> dict:
    """The RSNA Pneumonia challenge's mean average precision (the convention MGCA reports).

    For each image and IoU threshold t, predictions (highest score first) are matched greedily to unmatched true
    boxes with IoU > t, and precision(t) = TP / (TP + FP + FN); an image's score is its mean over the thresholds,
    and the result the mean over images, leaving out images with neither true nor predicted boxes.

    Args:
        predictions: per image `{"boxes": [[x1, y1, x2, y2], ...], "scores": [...]}`.
        ground_truths: per image a list of true boxes `[x1, y1, x2, y2]`.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} images.")
    image_scores = []
    for prediction, truth in zip(predictions, ground_truths):
        boxes = np.asarray(prediction["boxes"], dtype=np.float64).reshape(-1, 4)
        truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
        if not len(boxes) and not len(truth):
            continue
        boxes = boxes[np.argsort(-np.asarray(prediction["scores"], dtype=np.float64), kind="stable")]
        iou = _iou_matrix(boxes, truth) if len(boxes) and len(truth) else np.zeros((len(boxes), len(truth)))
        precisions = []
        for threshold in iou_thresholds:
            matched, true_positives = set(), 0
            for row in iou:
                candidates = [(value, j) for j, value in enumerate(row) if value > threshold and j not in matched]
                if candidates:
                    matched.add(max(candidates)[1])
                    true_positives += 1
            false_positives, false_negatives = len(boxes) - true_positives, len(truth) - true_positives
            precisions.append(true_positives / (true_positives + false_positives + false_negatives))
        image_scores.append(np.mean(precisions))
    return {"map": float(np.mean(image_scores)) if image_scores else float("nan"), "num_images": len(image_scores)}


__all__ = ["RSNA_IOU_THRESHOLDS", "classification_metrics", "detection_map", "dice_metrics", "multilabel_metrics"]
