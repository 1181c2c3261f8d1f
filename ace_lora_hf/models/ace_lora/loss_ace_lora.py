"""Label-guided InfoNCE, the contrastive loss ACE-LoRA is trained with."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


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


def has_negatives(labels: torch.Tensor) -> bool:
    """Whether label-guided InfoNCE keeps any negative pair in a batch: not when its (binarised) label vectors are all
    the same, nor for a batch of one."""
    labels = binarize_labels(labels)
    return len(labels) > 1 and not bool((labels == labels[:1]).all())


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


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (batches may differ in size); the backward sums every process's gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
        sizes = [int(size) for size in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


class LabelGuidedInfoNCELoss(nn.Module):
    """Label-guided InfoNCE of a model output, optionally with every process's batch as negatives.

    Without `global_negatives` (or on one process) this is the loss of the model's own `logits_per_image`, each
    process using only its local batch, as the released ACE-LoRA training did. With it, image and text embeddings and
    labels are gathered from all processes and each process computes the loss of the global batch, exactly the
    single-process loss on the concatenated batch; gradients reach each process's own embeddings through the gather.

    A batch whose label vectors are all the same leaves no pair as a negative: its loss is 0 and it teaches nothing.
    Such batches are counted in `batches_without_negatives`, with a warning the first time.
    """

    def __init__(self, global_negatives: bool = False):
        super().__init__()
        self.global_negatives = global_negatives
        self.batches_without_negatives = 0

    def _gathers(self) -> bool:
        return self.global_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, outputs, logit_scale: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`outputs`: an `AceLoraOutput` with `image_embeds`, `text_embeds` and `logits_per_image`."""
        logits_per_image = outputs.logits_per_image
        if self._gathers():
            image_embeds = _GatherWithGrad.apply(outputs.image_embeds)
            text_embeds = _GatherWithGrad.apply(outputs.text_embeds)
            labels = None if labels is None else _GatherWithGrad.apply(labels.float())
            logits_per_image = logit_scale * image_embeds @ text_embeds.t()
        if labels is not None and not has_negatives(labels):
            if not self.batches_without_negatives:
                logger.warning("A batch's label vectors are all the same, so the label-guided loss has no negatives "
                               "for it (loss 0, nothing learnt); a larger batch or more varied labels avoid this.")
            self.batches_without_negatives += 1
        return label_guided_infonce(logits_per_image, labels)


__all__ = ["LabelGuidedInfoNCELoss", "binarize_labels", "false_negative_mask", "has_negatives", "label_guided_infonce"]
