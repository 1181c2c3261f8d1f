"""The metrics of ACE-LoRA's evaluations: classification, segmentation Dice and RSNA detection mAP."""

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from transformers.utils import logging

from ..models.ace_lora.modeling_ace_lora_heads import box_iou


logger = logging.get_logger(__name__)


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
    AUC is NaN when the targets hold a single class, or (with more than two) miss a class, whose one-vs-rest AUC is
    then undefined.

    Args:
        probabilities: `[N, C]` class probabilities (or any scores ranking the classes).
        targets: `[N]` class indices.
    """
    probabilities, targets = _as_arrays(probabilities, targets, expected_target_ndim=1)
    num_classes = probabilities.shape[1]
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"Targets must be class indices in [0, {num_classes}); got {sorted(set(targets.tolist()))}.")
    accuracy = float((probabilities.argmax(axis=1) == targets).mean())
    present = len(np.unique(targets))
    if present < 2 or (num_classes > 2 and present < num_classes):  # scikit-learn warns or raises, by version
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


def dice_metrics(predicted_masks, true_masks) -> dict[str, float | int]:
    """Dice of binary masks (`[N, H, W]`, anything > 0 is foreground), as the segmentation papers report it.

    `dice_positive`: the mean Dice of the images with a true foreground (SIIM's pneumothorax-positive images); an
    image without one has no Dice to contribute, and counting an empty prediction on it as a perfect 1 would reward a
    model that predicts nothing on a mostly negative test set. `dice_pooled`: one Dice over all pixels of all images.
    Either is NaN where it is undefined (no true foreground; no foreground at all). The counts say what the means rest
    on, and a warning is logged when no image has a predicted foreground pixel.
    """
    predicted = np.asarray(predicted_masks) > 0
    true = np.asarray(true_masks) > 0
    if predicted.shape != true.shape:
        raise ValueError(f"Predicted masks {predicted.shape} and true masks {true.shape} differ in shape.")
    axes = tuple(range(1, predicted.ndim))
    overlap = (predicted & true).sum(axis=axes)
    predicted_area, true_area = predicted.sum(axis=axes), true.sum(axis=axes)
    positive = true_area > 0
    per_positive_image = 2 * overlap[positive] / (predicted_area[positive] + true_area[positive])
    total = predicted_area.sum() + true_area.sum()
    if len(predicted) and not predicted_area.any():
        logger.warning("No image has a predicted foreground pixel: the model predicts nothing (Dice 0 on every "
                       "positive image).")
    return {
        "dice_positive": float(per_positive_image.mean()) if positive.any() else float("nan"),
        "dice_pooled": float(2 * overlap.sum() / total) if total else float("nan"),
        "num_images": int(len(predicted)),
        "num_positive_images": int(positive.sum()),
        "num_images_predicted_positive": int((predicted_area > 0).sum()),
    }


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
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(truth)).numpy()
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
