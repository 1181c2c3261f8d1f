# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""Zero-shot classification on Hugging Face Inference Endpoints (or any server that loads a repository's `handler.py`):
base64 PNG/JPEG/DICOM images in, the repository's own pipeline scores out.

A published repository carries this file as `handler.py` at its root, beside a `requirements.txt`. The server loads it
as a top-level module, so it imports no sibling: the model, the pipeline and the image loader come from the
repository's remote code (`trust_remote_code=True`), and the ace-lora-hf package need not be installed.

Request (JSON):

    {"inputs": "<base64 image>" or ["<base64>", ...],
     "parameters": {"candidate_labels": ["No Finding", "pneumonia"],
                    "templates": ["a chest X-ray image of {}."],        # optional; default: the paper's two
                    "calibrated": true}}                                # optional; see below

Response: for one image, the pipeline's list of `{"label", "score"}` (highest first); for a list, one such list per
image, in order. A repository that carries a `calibration.json` (from `ace-lora-evaluate --calibration-output`)
returns calibrated scores, with `"decision"` for each label it holds an operating threshold for; such a file is made
for one set of labels and templates, so a request for others is refused unless it asks `"calibrated": false` (raw
scores). An image that cannot be used (missing, not base64, unreadable, too large) gets `{"error": "..."}` in
its place and the others are scored. A request over the caps below is refused as a whole, with a message.
"""

import base64
import binascii
import importlib
from pathlib import Path
from typing import Any

import torch
from transformers import pipeline


TASK = "zero-shot-image-classification"
CALIBRATION_FILE = "calibration.json"
# Caps of one request: a server shares its memory and time among its callers.
MAX_IMAGES = 32
MAX_LABELS = 64
MAX_TEMPLATES = 16
MAX_IMAGE_BYTES = 64 * 2**20  # encoded file size, checked before decoding
MAX_PIXELS = 50_000_000  # width x height after decoding (a 4096 x 4096 mammogram has 16.8 million)


class EndpointHandler:
    """Loads the repository at `path` once; each call scores a request's images against its labels. The class-prompt
    embeddings of each (labels, templates) pair are computed once and kept by the pipeline."""

    def __init__(self, path: str = "", device: int | str | None = None):
        if device is None:
            device = 0 if torch.cuda.is_available() else -1
        self.pipeline = pipeline(TASK, model=path, trust_remote_code=True, device=device)
        # The pipeline's own siblings (remote code, or the installed package), so that errors are its classes.
        package = type(self.pipeline).__module__.rpartition(".")[0]
        self._load_image = importlib.import_module(f"{package}.image_loading").load_image
        self._errors = importlib.import_module(f"{package}.errors")
        self._default_templates = importlib.import_module(f"{package}.zero_shot").CHEST_XRAY_TEMPLATES
        calibration = Path(path) / CALIBRATION_FILE
        self.calibration = (importlib.import_module(f"{package}.calibration").Calibration.load(calibration)
                            if calibration.is_file() else None)

    def __call__(self, data: dict[str, Any]) -> list:
        if not isinstance(data, dict):
            raise self._errors.InvalidArgumentError("The request is not a JSON object; send {\"inputs\": ..., "
                                                    "\"parameters\": {\"candidate_labels\": [...]}}.")
        inputs = data.get("inputs")
        single = not (isinstance(inputs, list) and inputs)  # an empty list is a request without images too
        images = [inputs] if single else inputs
        parameters = data.get("parameters") or {}
        labels, templates = self._parameters(parameters, len(images))
        calibration = self._calibration(parameters, labels, templates)
        loaded = [self._decoded(image, index) for index, image in enumerate(images)]
        scored = self._scores([image for image in loaded if not isinstance(image, dict)], labels, templates,
                              calibration)
        results = [image if isinstance(image, dict) else next(scored) for image in loaded]
        return results[0] if single else results

    def _parameters(self, parameters: dict, num_images: int) -> tuple[list[str], list[str] | None]:
        """Labels and templates of the request, each within its cap."""
        if not isinstance(parameters, dict):
            raise self._errors.InvalidArgumentError("parameters: give a JSON object, e.g. {\"candidate_labels\": "
                                                    "[\"No Finding\", \"pneumonia\"]}.")
        labels, templates = parameters.get("candidate_labels"), parameters.get("templates")
        if not isinstance(labels, list) or not labels:
            raise self._errors.InvalidArgumentError("parameters.candidate_labels: give a list of class names, e.g. "
                                                    "[\"No Finding\", \"pneumonia\"].")
        for name, values, cap in (("candidate_labels", labels, MAX_LABELS), ("templates", templates, MAX_TEMPLATES),
                                  ("inputs", range(num_images), MAX_IMAGES)):
            if values is not None and len(values) > cap:
                where = name if name == "inputs" else f"parameters.{name}"
                raise self._errors.InvalidArgumentError(f"{where}: {len(values)} given, at most {cap} a request; "
                                                        "split the request.")
        return labels, templates

    def _calibration(self, parameters: dict, labels: list[str], templates: list[str] | None):
        """The repository's calibration for this request (None for raw scores), checked against its labels."""
        if self.calibration is None or parameters.get("calibrated", True) is False:
            return None
        self.calibration.check(labels, templates or self._default_templates)  # before any image is decoded
        return self.calibration

    def _decoded(self, image: Any, index: int):
        """The image at `index` as a PIL image, or its error entry."""
        name = f"image {index}"
        if not isinstance(image, str) or not image.strip():
            return {"error": f"{name}: no image; send the file's bytes base64-encoded under inputs."}
        encoded = image.split(",", 1)[1] if image.startswith("data:") else image  # a data URL's payload
        if len(encoded) * 3 // 4 > MAX_IMAGE_BYTES:
            return {"error": f"{name}: larger than {MAX_IMAGE_BYTES / 2**20:g} MiB; send a smaller file."}
        try:
            decoded = self._load_image(base64.b64decode(encoded, validate=True), name=name)
        except binascii.Error:
            return {"error": f"{name}: not base64; send the file's bytes base64-encoded."}
        except self._errors.ImageLoadError as error:
            return {"error": str(error)}
        if decoded.width * decoded.height > MAX_PIXELS:
            return {"error": f"{name}: {decoded.width} x {decoded.height} pixels, more than {MAX_PIXELS}; send a "
                             "smaller image."}
        return decoded

    def _scores(self, images: list, labels: list[str], templates: list[str] | None, calibration=None):
        """Each image's ranked `{"label", "score"}` list, by the pipeline's own preprocessing, logits and
        postprocessing (all images through the model at once)."""
        if not images:
            return iter(())
        _, forward_params, postprocess_params = self.pipeline._sanitize_parameters(
            candidate_labels=labels, templates=templates, calibration=calibration)
        pixels = torch.cat([self.pipeline.preprocess(image)["pixel_values"] for image in images])
        logits = self.pipeline.forward({"pixel_values": pixels}, **forward_params)["logits"]
        return (self.pipeline.postprocess({"logits": row[None]}, **postprocess_params) for row in logits)


__all__ = ["EndpointHandler"]
