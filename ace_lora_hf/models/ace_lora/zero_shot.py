"""Zero-shot classification: class prompts encoded once per label set, images decoded beside the model in batches."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .batch_inference import ImageInput, embed_images, in_cpu_chunks
from .errors import ImageLoadError, InvalidArgumentError
from .modeling_ace_lora import AceLoraModel
from .processing_ace_lora import AceLoraProcessor


# The two templates of the released zero-shot evaluation (the authors' code averages these per class).
CHEST_XRAY_TEMPLATES = ("a chest X-ray image of {}.", "Findings suggesting {}.")
# For histopathology label sets (LC25000, MHIST); ours, in the same two-template form.
PATHOLOGY_TEMPLATES = ("a histopathology image of {}.", "an H&E stained tissue section showing {}.")


def checked_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Templates as a tuple; each must hold exactly one `{}` where the label goes."""
    if isinstance(templates, str) or not templates:
        raise InvalidArgumentError(f"templates={templates!r}: give a non-empty list of templates, each with one "
                                   "'{}'.")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1 or template.replace("{}", "").count("{") \
                or template.replace("{}", "").count("}"):
            raise InvalidArgumentError(f"template {template!r}: needs exactly one '{{}}' where the label goes "
                                       "(and no other braces).")
    return tuple(templates)


def checked_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Labels as a tuple: two or more distinct, non-empty strings (a bare string is refused; with one label the
    probability would be 1 whatever the image)."""
    if isinstance(labels, str) or len(labels) < 2:
        raise InvalidArgumentError(f"labels={labels!r}: give a list of two or more class names, e.g. "
                                   "['No Finding', 'pneumonia'].")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise InvalidArgumentError(f"labels={list(labels)!r}: every label must be a non-empty string.")
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(f"labels={list(labels)!r}: a label is repeated.")
    return tuple(labels)


def describe_image(image: ImageInput, index: int) -> str:
    """How messages name an input: its path, or its position for bytes and PIL images."""
    return str(image) if isinstance(image, (str, Path)) else f"image {index}"


def image_embeddings(model: AceLoraModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[N, D]` ACE image embeddings of a batch of pixels (in CPU chunks, see `in_cpu_chunks`)."""
    return in_cpu_chunks(lambda pixels: model.get_image_features(pixels).pooler_output, pixel_values,
                         tokens_per_sample=model.config.vision_config.num_tokens)


@dataclass
class ClassifiedBatch:
    """Per batch, in input order: the classified inputs, their `[n, C]` probabilities, and the inputs that failed;
    `logits` are the scaled similarities the probabilities are the softmax of (what a calibration rescales)."""

    indices: list[int]
    probabilities: torch.Tensor
    failures: list[tuple[int, str]]
    logits: torch.Tensor | None = None


class ZeroShotClassifier:
    """Classify images against free-text labels with an `AceLoraModel`.

    Images are read and preprocessed in `num_workers` DataLoader processes while the model runs (None: none beside
    a model on the CPU, one per spare CPU beside a GPU; see `batch_inference.default_num_workers`); with an
    `accelerate.Accelerator` of several processes each takes its shard of the batches and the results come back
    gathered in input order. Merge LoRA before classifying many images (`model.merge_lora()`): same probabilities,
    no adapter cost.

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
        num_workers: int | None = None,
        show_progress: bool = False,
        accelerator=None,
    ):
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size={batch_size}: must be at least 1.")
        self.model = model.eval()
        self.processor = processor
        self.templates = checked_templates(templates)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.show_progress = show_progress
        self.accelerator = accelerator
        self._class_embeddings: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        """`[C, D]` embeddings of `labels`, computed once per label set."""
        labels = checked_labels(labels)
        if labels not in self._class_embeddings:
            prompts = [template.format(label) for label in labels for template in self.templates]
            tokens = self.processor(text=prompts, return_tensors="pt")
            shape = (len(labels), len(self.templates), -1)
            input_ids, attention_mask = (tokens[key].view(shape).to(self.device)
                                         for key in ("input_ids", "attention_mask"))
            self._class_embeddings[labels] = in_cpu_chunks(
                lambda ids, mask: self.model.get_class_embeddings(ids, mask).pooler_output,
                input_ids, attention_mask, tokens_per_sample=input_ids.shape[1] * input_ids.shape[2],
            )
        return self._class_embeddings[labels]

    def classify(self, images: Sequence[ImageInput], labels: Sequence[str]) -> Iterator[ClassifiedBatch]:
        """Probabilities batch by batch, in input order; an image that cannot be read is reported, not fatal."""
        classes = self.class_embeddings(labels)
        scale = self.model.logit_scale.detach().float().cpu()
        batches = embed_images(
            lambda pixels: image_embeddings(self.model, pixels),
            images, self.processor.image_processor, self.batch_size, self.num_workers, self.device,
            self.accelerator, self.show_progress,
        )
        for batch in batches:
            logits = scale * batch.embeddings @ classes.float().cpu().t() if batch.indices \
                else torch.empty(0, len(classes))
            yield ClassifiedBatch(batch.indices, logits.softmax(dim=-1), batch.failures, logits)

    def __call__(self, images: Sequence[ImageInput] | ImageInput, labels: Sequence[str]) -> torch.Tensor:
        """`[N, C]` probabilities of each label for each image (softmax with the model's learned scale).

        Raises `ImageLoadError` for the first image that cannot be read; `classify` reports and skips instead.
        """
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        images = list(images)
        results = torch.empty(len(images), len(checked_labels(labels)))
        for batch in self.classify(images, labels):
            if batch.failures:
                index, reason = batch.failures[0]
                raise ImageLoadError(describe_image(images[index], index), reason)
            results[batch.indices] = batch.probabilities
        return results


__all__ = ["CHEST_XRAY_TEMPLATES", "PATHOLOGY_TEMPLATES", "ClassifiedBatch", "ZeroShotClassifier", "checked_labels",
           "checked_templates", "describe_image", "image_embeddings"]
