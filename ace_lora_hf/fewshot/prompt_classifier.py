"""The prompt-initialised classifier (CLIP-LoRA style): a linear head whose rows start as the class-prompt embeddings,
trained on the shots together with the image tower's LoRA adapters; every base weight, the hypergraph and the logit
scale stay frozen. Before its first step it scores exactly as zero-shot classification does.

The run is deterministic for a seed on the CPU (the seed fixes LoRA dropout and the order of the shots); the model's
adapters and trainable flags are restored afterwards, so that the next K or seed starts from the loaded model.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler

from ..models.ace_lora.batch_inference import ImageBatch, ImageFiles, collate_images, default_num_workers
from ..models.ace_lora.zero_shot import image_embeddings
from .embeddings import encode, unreadable
from .sampling import LabelledImages


@dataclass(frozen=True)
class HeadTraining:
    """How the head and the adapters train: AdamW steps on mini-batches of the shots."""

    steps: int = 50
    learning_rate: float = 1e-3
    batch_size: int = 32


class PromptInitialisedHead(nn.Module):
    """`logit_scale * image @ normalise(weight).T` with `weight` initialised from the `[C, D]` class embeddings."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(class_embeddings.detach().float().clone())
        self.register_buffer("logit_scale", logit_scale.detach().float().clone())

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_embeds.float() @ F.normalize(self.weight, dim=-1).t()


def lora_parameters(model) -> dict[str, nn.Parameter]:
    """The image tower's LoRA weights, by name."""
    return {name: parameter for name, parameter in model.vision_model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name}


@contextmanager
def adapters_restored(model) -> Iterator[dict[str, nn.Parameter]]:
    """Yield the image tower's LoRA weights, trainable and nothing else; afterwards the weights, the trainable flags
    and eval mode are as they were."""
    adapters = lora_parameters(model)
    saved = {name: parameter.detach().clone() for name, parameter in adapters.items()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad = False
    for parameter in adapters.values():
        parameter.requires_grad = True
    try:
        yield adapters
    finally:
        with torch.no_grad():
            for name, parameter in adapters.items():
                parameter.copy_(saved[name])
        for name, parameter in model.named_parameters():
            parameter.requires_grad = flags[name]
        model.eval()


def shot_batches(image_processor, images: LabelledImages, batch_size: int, num_workers: int,
                 seed: int) -> Iterator[ImageBatch]:
    """Endless mini-batches of the shots, reshuffled by `seed` each pass and decoded in `num_workers` workers (a share
    of a large table does not fit in memory at once); an unreadable image stops the run, named."""
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(ImageFiles(images.images, image_processor), batch_size=batch_size, num_workers=num_workers,
                        sampler=RandomSampler(range(len(images.names)), generator=order), collate_fn=collate_images)
    while True:
        for batch in loader:
            if batch.failures:
                raise unreadable(images, batch.failures)
            yield batch


def train_and_score(model, image_processor, class_embeddings: torch.Tensor, shots: LabelledImages,
                    test: LabelledImages, seed: int, training: HeadTraining = HeadTraining(), batch_size: int = 16,
                    num_workers: int | None = None) -> np.ndarray:
    """`[N_test, C]` probabilities of the test images after training the head and the adapters on the shots."""
    device = model.logit_scale.device
    head = PromptInitialisedHead(class_embeddings, model.logit_scale).to(device)
    labels = torch.as_tensor(shots.targets, device=device)
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    batches = shot_batches(image_processor, shots, training.batch_size, num_workers, seed)
    with adapters_restored(model) as adapters:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW([*adapters.values(), *head.parameters()], lr=training.learning_rate,
                                      weight_decay=0.0)
        model.train()
        for _, batch in zip(range(training.steps), batches):
            logits = head(image_embeddings(model, batch.pixel_values.to(device)))
            loss = F.cross_entropy(logits, labels[batch.indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        batches.close()  # stops its workers now
        model.eval()
        with torch.no_grad():
            logits = head(encode(model, image_processor, test, batch_size, num_workers).to(device))
    return logits.softmax(dim=-1).cpu().numpy()


__all__ = ["HeadTraining", "PromptInitialisedHead", "adapters_restored", "train_and_score"]
