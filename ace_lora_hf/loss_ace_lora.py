"""Label-guided InfoNCE, the contrastive loss ACE-LoRA is trained with."""

import torch
import torch.nn.functional as F


def binarize_labels(labels: torch.Tensor) -> torch.Tensor:
    """CheXpert-style label vectors to 0/1: a missing (NaN) or uncertain (-1) finding counts as absent."""
    labels = labels.float().nan_to_num(0.0)
    return labels.masked_fill(labels == -1, 0.0)


def false_negative_mask(labels: torch.Tensor) -> torch.Tensor:
    """`[B, B]` mask of the pairs `i != j` whose (binarised) label vectors are identical."""
    labels = binarize_labels(labels)
    same = (labels[:, None, :] == labels[None, :, :]).all(dim=-1)
    same.fill_diagonal_(False)
    return same


def label_guided_infonce(logits_per_image: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a `[B, B]` image-text logit matrix whose positives lie on the diagonal.

    With `labels` (`[B, K]`), a pair `i != j` whose label vectors are identical is a false negative: its
    logit is removed from both softmax denominators (image-to-text and text-to-image). Without labels this
    is CLIP's plain symmetric InfoNCE.
    """
    if labels is not None:
        logits_per_image = logits_per_image.masked_fill(false_negative_mask(labels), float("-inf"))
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_image.t(), targets)
    return (image_to_text + text_to_image) / 2


__all__ = ["binarize_labels", "false_negative_mask", "label_guided_infonce"]
