"""Zero-shot classification: class prompts encoded once per label set, images in batches."""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .image_loading import load_image
from .modeling_ace_lora import AceLoraModel
from .processing_ace_lora import AceLoraProcessor


logger = logging.get_logger(__name__)

# The two templates of the released zero-shot evaluation (SPEC §6).
CHEST_XRAY_TEMPLATES = ("a chest X-ray image of {}.", "Findings suggesting {}.")
# For histopathology label sets (LC25000, MHIST); ours, in the same two-template form.
PATHOLOGY_TEMPLATES = ("a histopathology image of {}.", "an H&E stained tissue section showing {}.")

ImageInput = str | Path | bytes | Image.Image


class ZeroShotClassifier:
    """Classify images against free-text labels with an `AceLoraModel`.

    Example:

    ```python
    >>> classifier = ZeroShotClassifier(model, processor)
    >>> probabilities = classifier(["a.dcm", "b.png"], ["No Finding", "pneumonia"])  # [2, 2]
    ```
    """

    def __init__(
        self,
        model: AceLoraModel,
        processor: AceLoraProcessor,
        templates: Sequence[str] = CHEST_XRAY_TEMPLATES,
        batch_size: int = 16,
        show_progress: bool = False,
    ):
        if not templates or any("{}" not in template for template in templates):
            raise ValueError(f"Every template needs a '{{}}' where the label goes; got {list(templates)}.")
        self.model = model.eval()
        self.processor = processor
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._class_embeddings: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        """`[C, D]` embeddings of `labels`, computed once per label set and template list."""
        key = tuple(labels)
        if key not in self._class_embeddings:
            prompts = [template.format(label) for label in labels for template in self.templates]
            tokens = self.processor.tokenizer(
                prompts,
                padding="max_length",
                truncation=True,
                max_length=self.model.config.text_config.context_length,
                return_tensors="pt",
            )
            shape = (len(labels), len(self.templates), -1)
            self._class_embeddings[key] = self.model.get_class_embeddings(
                tokens["input_ids"].view(shape).to(self.device),
                tokens["attention_mask"].view(shape).to(self.device),
            ).pooler_output
        return self._class_embeddings[key]

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """`[N, D]` ACE image embeddings, `batch_size` images at a time."""
        batches = range(0, len(images), self.batch_size)
        embeddings = []
        for start in tqdm(batches, desc="images", unit="batch", disable=not self.show_progress):
            batch = [load_image(image) for image in images[start : start + self.batch_size]]
            pixel_values = self.processor.image_processor(batch, return_tensors="pt")["pixel_values"]
            embeddings.append(self.model.get_image_features(pixel_values.to(self.device)).pooler_output)
        return torch.cat(embeddings)

    def logits(self, images: Sequence[ImageInput], labels: Sequence[str]) -> torch.Tensor:
        """`[N, C]` scaled image-class similarities."""
        classes = self.class_embeddings(labels)
        return self.model.logit_scale.detach() * self.image_embeddings(images) @ classes.t()

    def __call__(self, images: Sequence[ImageInput] | ImageInput, labels: Sequence[str]) -> torch.Tensor:
        """`[N, C]` probabilities of each label for each image (softmax with the model's learned scale)."""
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        return self.logits(list(images), labels).softmax(dim=-1).cpu()


__all__ = ["CHEST_XRAY_TEMPLATES", "PATHOLOGY_TEMPLATES", "ZeroShotClassifier"]
