# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""The zero-shot-image-classification pipeline for ACE-LoRA: class prompts encoded once, several templates, DICOM."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.pipelines import PIPELINE_REGISTRY, ZeroShotImageClassificationPipeline
from transformers.utils import logging

from .calibration import Calibration
from .configuration_ace_lora import AceLoraConfig
from .hub_pipeline import TASK
from .errors import InvalidArgumentError
from .image_loading import load_image
from .processing_ace_lora import AceLoraProcessor
from .zero_shot import (CHEST_XRAY_TEMPLATES, ZeroShotClassifier, checked_templates, image_embeddings,
                        zero_shot_logits, zero_shot_probabilities)


# Images of a list go through the model this many at a time unless `batch_size` says otherwise (ZeroShotClassifier's
# default): on the 2-core development CPU, 8 images in one batch ran 1.7-2.9x faster per image than one at a time.
DEFAULT_BATCH_SIZE = 16


class AceLoraZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    r"""
    Zero-shot image classification with ACE-LoRA, called like transformers' own pipeline for the task and returning
    the same output, at the speed of [`ZeroShotClassifier`] and with its scores:

    - the class embeddings of a label set are computed once and kept for later calls with the same labels and
      templates (the stock pipeline re-encodes every 256-token prompt for every image);
    - `templates` (several prompt templates, averaged per class as released; default the paper's two chest X-ray
      templates) or, as in the stock pipeline, one `hypothesis_template`;
    - images are paths (PNG, JPEG, TIFF, DICOM), bytes or PIL images, read by the package's loader (no URLs);
      a list of images goes through the model `batch_size` (default 16) at a time;
    - `calibration` (a [`Calibration`] or its file, from `ace-lora-evaluate --calibration-output`): calibrated
      scores, and `decision` (True/False) for each label the file holds an operating threshold for. Without it the
      scores stay the model's own.

    For any other model it is the stock pipeline: `import ace_lora_hf` registers this class for the task.

    Example:

    ```python
    >>> import ace_lora_hf
    >>> from transformers import pipeline

    >>> classifier = pipeline("zero-shot-image-classification", model="path/to/ace-lora")
    >>> classifier("siim_pneumothorax.dcm", candidate_labels=["No Finding", "pneumothorax"])
    [{'score': 0.93, 'label': 'pneumothorax'}, {'score': 0.07, 'label': 'No Finding'}]
    >>> classifier("siim_pneumothorax.dcm", candidate_labels=["pneumothorax", "effusion"], multi_label=True)
    [{'score': 0.88, 'label': 'pneumothorax'}, {'score': 0.31, 'label': 'effusion'}]
    ```
    """

    def __init__(self, **kwargs):
        # One classifier per template list (and negative templates): each keeps the class embeddings it has computed.
        self._classifiers: dict[tuple[tuple[str, ...], tuple[str, ...] | None], ZeroShotClassifier] = {}
        super().__init__(**kwargs)
        if self._serves_ace_lora and self._batch_size is None:
            # Images need no padding to batch, and each scores the same in any batch.
            self._batch_size = DEFAULT_BATCH_SIZE

    @property
    def _serves_ace_lora(self) -> bool:
        return self.model.config.model_type == AceLoraConfig.model_type

    def _sanitize_parameters(self, **kwargs):
        if not self._serves_ace_lora:
            return super()._sanitize_parameters(**kwargs)
        return self._ace_lora_parameters(**kwargs)

    @staticmethod
    def _ace_lora_parameters(
        candidate_labels: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        hypothesis_template: str | None = None,
        calibration: Calibration | str | Path | None = None,
        multi_label: bool | None = None,
        negative_templates: Sequence[str] | None = None,
    ) -> tuple[dict, dict, dict]:
        """The labels and templates go to `_forward` (which embeds the classes) and the labels to `postprocess`;
        `preprocess` only reads images, so batches of images collate without them. A calibration (or its file) goes
        to `postprocess` with the templates, where the labels and templates of the call, merged with those given when
        the pipeline was built, are checked against it (here already where this call gives both)."""
        if templates is not None and hypothesis_template is not None:
            raise InvalidArgumentError("Pass either templates=[...] or hypothesis_template='...', not both.")
        forward_params, postprocess_params = {}, {}
        if candidate_labels is not None:
            forward_params["candidate_labels"] = postprocess_params["candidate_labels"] = candidate_labels
        if hypothesis_template is not None:
            templates = [hypothesis_template]
        if templates is not None:
            forward_params["templates"] = postprocess_params["templates"] = checked_templates(templates)
        if calibration is not None:
            if not isinstance(calibration, Calibration):
                calibration = Calibration.load(calibration)
            if candidate_labels is not None:
                calibration.check(candidate_labels, forward_params.get("templates", CHEST_XRAY_TEMPLATES))
            postprocess_params["calibration"] = calibration
        if multi_label is not None:
            forward_params["multi_label"] = bool(multi_label)
        if negative_templates is not None:
            forward_params["negative_templates"] = checked_templates(negative_templates)
        return {}, forward_params, postprocess_params

    def preprocess(self, image, **kwargs) -> dict[str, Any]:
        if not self._serves_ace_lora:
            return super().preprocess(image, **kwargs)
        return {"pixel_values": self.image_processor(load_image(image), return_tensors="pt")["pixel_values"]}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        candidate_labels: Sequence[str] | None = None,
        templates: tuple[str, ...] = CHEST_XRAY_TEMPLATES,
        multi_label: bool = False,
        negative_templates: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """`logits` `[N, C]`, or `[N, F, 2]` (positive, negative) with `multi_label`."""
        if not self._serves_ace_lora:
            return super()._forward(model_inputs)
        if negative_templates is not None and not multi_label:
            # Checked here, where the call's options and the pipeline's own are merged.
            raise InvalidArgumentError("negative_templates=... scores findings one by one: pass multi_label=True too.")
        classifier = self._classifier(templates, negative_templates)
        classes = (classifier.finding_embeddings(candidate_labels) if multi_label
                   else classifier.class_embeddings(candidate_labels))
        images = image_embeddings(self.model, model_inputs["pixel_values"])
        return {"logits": zero_shot_logits(self.model.logit_scale.float(), images.float(), classes.float())}

    def postprocess(self, model_outputs: dict[str, Any], candidate_labels: Sequence[str] | None = None,
                    calibration: Calibration | None = None, templates: tuple[str, ...] = CHEST_XRAY_TEMPLATES):
        if not self._serves_ace_lora:
            return super().postprocess(model_outputs)
        if calibration is None:
            scores = zero_shot_probabilities(model_outputs["logits"])[0].tolist()
            ranked = sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
            return [{"score": score, "label": label} for score, label in ranked]
        if model_outputs["logits"].ndim != 2:
            raise InvalidArgumentError("calibration= holds a temperature and thresholds fitted on single-label scores; "
                                       "per-finding (multi_label=True) scores are returned uncalibrated: leave out "
                                       "one of the two.")
        calibration.check(candidate_labels, templates)  # the scores' order is the labels', the thresholds' the file's
        probabilities = calibration.apply(model_outputs["logits"])
        decided = {label: bool(yes[0]) for label, yes in calibration.decide(probabilities).items()}
        ranked = sorted(zip(probabilities[0].tolist(), candidate_labels), key=lambda pair: -pair[0])
        return [{"score": score, "label": label, **({"decision": decided[label]} if label in decided else {})}
                for score, label in ranked]

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = CHEST_XRAY_TEMPLATES) -> torch.Tensor:
        """`[C, D]` embeddings of `labels`, computed once per label set and template list."""
        return self._classifier(checked_templates(templates)).class_embeddings(labels)

    def _classifier(self, templates: tuple[str, ...], negative_templates: tuple[str, ...] | None = None
                    ) -> ZeroShotClassifier:
        """The classifier of these templates, made once: it keeps the class embeddings it computes."""
        key = (templates, negative_templates)
        if key not in self._classifiers:
            processor = AceLoraProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer,
                                         context_length=self.model.config.text_config.context_length)
            self._classifiers[key] = ZeroShotClassifier(self.model, processor, templates,
                                                        negative_templates=negative_templates)
        return self._classifiers[key]


def register_pipeline() -> None:
    """Make `pipeline("zero-shot-image-classification", ...)` build [`AceLoraZeroShotImageClassificationPipeline`]
    (the stock pipeline for every other model), and its `save_pretrained` record it in the config's
    `custom_pipelines`, so that the saved folder serves it as remote code. Configs loaded in this process then leave
    that record out, so that `pipeline(task, model=FOLDER)` builds this class without trust_remote_code."""
    stock = PIPELINE_REGISTRY.supported_tasks[TASK]
    registry_logger = logging.get_logger("transformers.pipelines.base")
    level = registry_logger.level
    # Replacing the task's class is the point (it keeps serving other models): no "Overwriting pipeline" warning.
    registry_logger.setLevel(logging.ERROR)
    try:
        PIPELINE_REGISTRY.register_pipeline(
            TASK,
            pipeline_class=AceLoraZeroShotImageClassificationPipeline,
            pt_model=stock["pt"],
            default=stock.get("default"),
            type=stock.get("type"),
        )
    finally:
        registry_logger.setLevel(level)
    AceLoraConfig.pipeline_served_in_process = True


__all__ = ["AceLoraZeroShotImageClassificationPipeline", "register_pipeline"]
