"""Label-guided InfoNCE, the contrastive loss ACE-LoRA is trained with."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
    """Label-guided InfoNCE over the embeddings of a batch, optionally with every process's batch as negatives.

    With `global_negatives` (and more than one process), image and text embeddings and labels are gathered from
    all processes and each process computes the loss of the global batch, exactly the single-process loss on the
    concatenated batch; gradients reach each process's own embeddings through the gather. Without it, each
    process uses only its local batch, as the released ACE-LoRA training did.
    """

    def __init__(self, global_negatives: bool = False):
        super().__init__()
        self.global_negatives = global_negatives

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.global_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            image_embeds = _GatherWithGrad.apply(image_embeds)
            text_embeds = _GatherWithGrad.apply(text_embeds)
            labels = None if labels is None else _GatherWithGrad.apply(labels.float())
        return label_guided_infonce(logit_scale * image_embeds @ text_embeds.t(), labels)


__all__ = ["LabelGuidedInfoNCELoss", "binarize_labels", "false_negative_mask", "label_guided_infonce"]
