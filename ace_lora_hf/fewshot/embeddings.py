"""Frozen image embeddings of a few-shot run, computed once per image: the zero-shot baseline and the linear probe of
every K and seed reuse them instead of encoding the images again."""

import torch

from ..errors import ImageLoadError
from ..models.ace_lora.batch_inference import embed_images
from ..models.ace_lora.zero_shot import image_embeddings
from .sampling import LabelledImages


class EmbeddingCache:
    """`[N, D]` image embeddings of the model as it is now (frozen), by table (or prepared split) and image name."""

    def __init__(self, model, image_processor, batch_size: int = 16, num_workers: int | None = None):
        self.model, self.image_processor = model, image_processor
        self.batch_size, self.num_workers = batch_size, num_workers
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, images: LabelledImages) -> torch.Tensor:
        keys = [(images.source, name) for name in images.names]
        missing: dict[tuple[str, str], int] = {}  # each key not cached yet, at its first row
        for index, key in enumerate(keys):
            if key not in self._embeddings:
                missing.setdefault(key, index)
        if missing:
            encoded = encode(self.model, self.image_processor, images.subset(list(missing.values())), self.batch_size,
                             self.num_workers)
            self._embeddings.update(zip(missing, encoded))
        return torch.stack([self._embeddings[key] for key in keys])


def encode(model, image_processor, images: LabelledImages, batch_size: int = 16,
           num_workers: int | None = None) -> torch.Tensor:
    """`[N, D]` image embeddings of `model` (float32, on the CPU); an unreadable image stops the run, named."""
    device = model.logit_scale.device
    rows: dict[int, torch.Tensor] = {}
    embed = lambda pixels: image_embeddings(model, pixels)  # noqa: E731
    for batch in embed_images(embed, images.images, image_processor, batch_size, num_workers, device):
        if batch.failures:
            raise unreadable(images, batch.failures)
        rows.update(zip(batch.indices, batch.embeddings))
    return torch.stack([rows[index] for index in range(len(images.names))])


def unreadable(images: LabelledImages, failures: list[tuple[int, str]]) -> ImageLoadError:
    """The error of the first image of a batch that could not be read: a few-shot run needs every image."""
    index, reason = failures[0]
    if images.split is None:
        return ImageLoadError(images.names[index], f"{reason}; remove it from its table or replace the file")
    return ImageLoadError(f"{images.source}, {images.names[index]}", f"{reason}; prepare the set again "
                          "(ace-lora-prepare training-set)")


__all__ = ["EmbeddingCache", "encode", "unreadable"]
