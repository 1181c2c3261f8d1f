"""Frozen image embeddings of a few-shot run, computed once per image: the zero-shot baseline and the linear probe of
every K and seed reuse them instead of encoding the images again."""

from collections.abc import Sequence

import torch

from ..errors import ImageLoadError
from ..models.ace_lora.batch_inference import embed_images
from ..models.ace_lora.zero_shot import image_embeddings


class EmbeddingCache:
    """`[N, D]` image embeddings of the model as it is now (frozen), by image path."""

    def __init__(self, model, image_processor, batch_size: int = 16, num_workers: int | None = None):
        self.model, self.image_processor = model, image_processor
        self.batch_size, self.num_workers = batch_size, num_workers
        self._embeddings: dict[str, torch.Tensor] = {}

    def __call__(self, images: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(image for image in images if image not in self._embeddings))
        if missing:
            for image, embedding in zip(missing, encode(self.model, self.image_processor, missing, self.batch_size,
                                                        self.num_workers)):
                self._embeddings[image] = embedding
        return torch.stack([self._embeddings[image] for image in images])


def encode(model, image_processor, images: Sequence[str], batch_size: int = 16,
           num_workers: int | None = None) -> torch.Tensor:
    """`[N, D]` image embeddings of `model` (float32, on the CPU); an unreadable image stops the run, named."""
    device = model.logit_scale.device
    rows: dict[int, torch.Tensor] = {}
    embed = lambda pixels: image_embeddings(model, pixels)  # noqa: E731
    for batch in embed_images(embed, images, image_processor, batch_size, num_workers, device):
        if batch.failures:
            raise unreadable(images, batch.failures)
        rows.update(zip(batch.indices, batch.embeddings))
    return torch.stack([rows[index] for index in range(len(images))])


def unreadable(images: Sequence[str], failures: list[tuple[int, str]]) -> ImageLoadError:
    """The error of the first image of a batch that could not be read: a few-shot run needs every image."""
    index, reason = failures[0]
    return ImageLoadError(images[index], f"{reason}; remove it from its table or replace the file")


__all__ = ["EmbeddingCache", "encode", "unreadable"]
