"""Zero-shot classification: class prompts encoded once per label set, images decoded beside the model in batches.

Two ways to score: single-label (a softmax over the labels: which of them) and per-finding (multi-label: for each
finding a positive and a negative prompt, a two-way softmax per finding, so several findings can be present at once,
as CheXzero scores findings).
"""

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
# Per-finding zero-shot: the negative prompt of a finding puts "no {finding}" where the positive one puts the finding.
NEGATION = "no {}"


def negated_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The default negative side of per-finding zero-shot: each template with "no {}" where the finding goes."""
    return tuple(template.replace("{}", NEGATION) for template in checked_templates(templates))


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
    return _distinct_names(labels, "two or more class names, e.g. ['No Finding', 'pneumonia']", "label", minimum=2)


def checked_findings(findings: Sequence[str]) -> tuple[str, ...]:
    """Findings of per-finding zero-shot as a tuple: one or more distinct, non-empty strings (each is scored against
    its own negative prompt, so a single finding is meaningful)."""
    return _distinct_names(findings, "one or more findings, e.g. ['pneumonia', 'effusion']", "finding", minimum=1)


def checked_classes(labels: Sequence[str], multi_label: bool = False, templates: Sequence[str] | None = None,
                    negative_templates: Sequence[str] | None = None) -> tuple[str, ...]:
    """`labels` checked as classes (two or more) or, with `multi_label`, as findings (one or more), and the templates
    given, as the classifier will use them."""
    for given in (templates, negative_templates):
        if given:
            checked_templates(given)
    return checked_findings(labels) if multi_label else checked_labels(labels)


def _distinct_names(names: Sequence[str], wanted: str, noun: str, minimum: int) -> tuple[str, ...]:
    if isinstance(names, str) or len(names) < minimum:
        raise InvalidArgumentError(f"labels={names!r}: give a list of {wanted}.")
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise InvalidArgumentError(f"labels={list(names)!r}: every {noun} must be a non-empty string.")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"labels={list(names)!r}: a {noun} is repeated.")
    return tuple(names)


def zero_shot_logits(logit_scale: torch.Tensor, image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Scaled cosines of `[N, D]` image embeddings with `[C, D]` class embeddings (`[N, C]`), or with `[F, 2, D]`
    positive/negative finding embeddings (`[N, F, 2]`)."""
    logits = logit_scale * image_embeds @ class_embeds.flatten(0, -2).t()
    return logits.unflatten(-1, class_embeds.shape[:-1])


def zero_shot_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities of `zero_shot_logits`: a softmax over the classes of `[N, C]` logits; for `[N, F, 2]` the
    two-way softmax of each finding, whose positive side is the finding's probability (`[N, F]`)."""
    probabilities = logits.softmax(dim=-1)
    return probabilities if logits.ndim == 2 else probabilities[..., 0]


def describe_image(image: ImageInput, index: int) -> str:
    """How messages name an input: its path, or its position for bytes and PIL images."""
    return str(image) if isinstance(image, (str, Path)) else f"image {index}"


def image_embeddings(model: AceLoraModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[N, D]` ACE image embeddings of a batch of pixels (in CPU chunks, see `in_cpu_chunks`)."""
    return in_cpu_chunks(lambda pixels: model.get_image_features(pixels).pooler_output, pixel_values,
                         tokens_per_sample=model.config.vision_config.num_tokens)


@dataclass
class ClassifiedBatch:
    """Per batch, in input order: the classified inputs, their `[n, C]` probabilities (per-finding: `[n, F]`, each
    finding's own probability), and the inputs that failed; `logits` are the scaled similarities the probabilities
    come from (what a calibration rescales)."""

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

    With `multi_label=True` the labels are findings scored one by one: the finding in `templates` against its negative
    prompt in `negative_templates` (default: each template with "no {finding}"), a two-way softmax per finding.
    Each side combines its templates exactly as single-label zero-shot combines a class's templates
    (`AceLoraModel.get_class_embeddings`: the templates' tokens averaged, then the text hypergraph once). That
    hypergraph runs over the tokens of one class's prompts and never mixes classes, so each of the 2 x F sides is
    embedded on its own, exactly as it would be as a class of single-label zero-shot: the positive side of a finding
    is its single-label class embedding, and single-label results are untouched.

    Example:

    ```python
    >>> classifier = ZeroShotClassifier(model, processor)
    >>> probabilities = classifier(["a.dcm", "b.png"], ["No Finding", "pneumonia"])  # [2, 2]
    >>> present = classifier(["a.dcm", "b.png"], ["pneumonia", "effusion", "edema"], multi_label=True)  # [2, 3]
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
        negative_templates: Sequence[str] | None = None,
    ):
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size={batch_size}: must be at least 1.")
        self.model = model.eval()
        self.processor = processor
        self.templates = checked_templates(templates)
        self.negative_templates = (negated_templates(self.templates) if negative_templates is None
                                   else checked_templates(negative_templates))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.show_progress = show_progress
        self.accelerator = accelerator
        self._class_embeddings: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def class_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        """`[C, D]` embeddings of `labels`, computed once per label set."""
        return self._prompt_embeddings(checked_labels(labels), self.templates)

    def finding_embeddings(self, findings: Sequence[str]) -> torch.Tensor:
        """`[F, 2, D]` embeddings of each finding's positive and negative prompts, computed once per finding set."""
        findings = checked_findings(findings)
        return torch.stack([self._prompt_embeddings(findings, self.templates),
                            self._prompt_embeddings(findings, self.negative_templates)], dim=1)

    @torch.no_grad()
    def _prompt_embeddings(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """`[C, D]` class embeddings of `labels` in `templates`, cached."""
        if (labels, templates) not in self._class_embeddings:
            prompts = [template.format(label) for label in labels for template in templates]
            tokens = self.processor(text=prompts, return_tensors="pt")
            shape = (len(labels), len(templates), -1)
            input_ids, attention_mask = (tokens[key].view(shape).to(self.device)
                                         for key in ("input_ids", "attention_mask"))
            self._class_embeddings[labels, templates] = in_cpu_chunks(
                lambda ids, mask: self.model.get_class_embeddings(ids, mask).pooler_output,
                input_ids, attention_mask, tokens_per_sample=input_ids.shape[1] * input_ids.shape[2],
            )
        return self._class_embeddings[labels, templates]

    def classify(self, images: Sequence[ImageInput], labels: Sequence[str],
                 multi_label: bool = False) -> Iterator[ClassifiedBatch]:
        """Probabilities batch by batch, in input order; an image that cannot be read is reported, not fatal."""
        classes = self.finding_embeddings(labels) if multi_label else self.class_embeddings(labels)
        scale = self.model.logit_scale.detach().float().cpu()
        batches = embed_images(
            lambda pixels: image_embeddings(self.model, pixels),
            images, self.processor.image_processor, self.batch_size, self.num_workers, self.device,
            self.accelerator, self.show_progress,
        )
        for batch in batches:
            logits = zero_shot_logits(scale, batch.embeddings, classes.float().cpu()) if batch.indices \
                else torch.empty(0, *classes.shape[:-1])
            yield ClassifiedBatch(batch.indices, zero_shot_probabilities(logits), batch.failures, logits)

    def __call__(self, images: Sequence[ImageInput] | ImageInput, labels: Sequence[str],
                 multi_label: bool = False) -> torch.Tensor:
        """`[N, C]` probabilities of each label for each image (softmax with the model's learned scale; with
        `multi_label`, each finding's own probability of being present).

        Raises `ImageLoadError` for the first image that cannot be read; `classify` reports and skips instead.
        """
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        images = list(images)
        results = torch.empty(len(images), len(checked_findings(labels) if multi_label else checked_labels(labels)))
        for batch in self.classify(images, labels, multi_label):
            if batch.failures:
                index, reason = batch.failures[0]
                raise ImageLoadError(describe_image(images[index], index), reason)
            results[batch.indices] = batch.probabilities
        return results


__all__ = ["CHEST_XRAY_TEMPLATES", "NEGATION", "PATHOLOGY_TEMPLATES", "ClassifiedBatch", "ZeroShotClassifier",
           "checked_findings", "checked_labels", "checked_templates", "describe_image", "image_embeddings",
           "negated_templates", "zero_shot_logits", "zero_shot_probabilities"]
