"""Zero-shot classification with the files of `ace-lora-export-onnx`: the image embedding by onnxruntime, the class
side as the export computed it in PyTorch.

The class embeddings of zero-shot are not one text embedding per prompt: the model averages the tokens of a class's
templates before its text hypergraph runs once per class (`AceLoraModel.get_class_embeddings`), so averaging
`text.onnx` embeddings of each prompt gives other numbers. The export therefore stores the class embeddings of the
labels and templates it was given (`classes.safetensors`, described in `export_onnx.json`), and this module scores
images against them exactly as `ZeroShotClassifier` does.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import InvalidArgumentError, MissingDependencyError, ModelSourceError
from ..models.ace_lora.zero_shot import (ZeroShotClassifier, checked_findings, checked_labels, zero_shot_logits,
                                         zero_shot_probabilities)


DESCRIPTION_FILE = "export_onnx.json"
VISION_FILE = "vision.onnx"
CLASSES_FILE = "classes.safetensors"
CLASSES_TENSOR = "class_embeds"


@dataclass(frozen=True)
class ExportedClasses:
    """The class side of zero-shot for one label set: `[C, D]` class embeddings, or with `multi_label` `[F, 2, D]`
    (each finding's positive and negative prompts), and the labels and templates they were made from."""

    labels: tuple[str, ...]
    templates: tuple[str, ...]
    embeddings: torch.Tensor
    multi_label: bool = False
    negative_templates: tuple[str, ...] | None = None

    @classmethod
    def compute(cls, classifier: ZeroShotClassifier, labels: Sequence[str], multi_label: bool = False
                ) -> "ExportedClasses":
        """The embeddings `classifier` scores `labels` with."""
        if multi_label:
            return cls(tuple(labels), classifier.templates, classifier.finding_embeddings(labels).float().cpu(),
                       True, classifier.negative_templates)
        return cls(tuple(labels), classifier.templates, classifier.class_embeddings(labels).float().cpu())

    def description(self) -> dict:
        """What `export_onnx.json` says about the class embeddings (the file is `CLASSES_FILE`)."""
        return {"file": CLASSES_FILE, "tensor": CLASSES_TENSOR, "shape": list(self.embeddings.shape),
                "labels": list(self.labels), "templates": list(self.templates), "multi_label": self.multi_label,
                **({"negative_templates": list(self.negative_templates)} if self.multi_label else {})}


class OnnxZeroShotClassifier:
    """Zero-shot probabilities from an ONNX export made with `--labels`: `vision.onnx` in onnxruntime (CPU) and the
    exported class embeddings, scored with the model's logit scale as `ZeroShotClassifier` scores them (single-label:
    a softmax over the labels; multi-label: each finding's own probability).

    Example:

    ```python
    >>> classifier = OnnxZeroShotClassifier("onnx/")
    >>> pixel_values = processor(images=image, return_tensors="np")["pixel_values"]  # AceLoraImageProcessor
    >>> classifier(pixel_values)  # [1, C], columns in the order of classifier.labels
    >>> classifier(pixel_values, ["pneumonia", "No Finding"])  # any of the exported labels, in this order
    ```
    """

    def __init__(self, folder: str | Path):
        try:
            import onnxruntime
        except ImportError:
            raise MissingDependencyError("OnnxZeroShotClassifier runs the ONNX files with onnxruntime (not "
                                         "installed); install the onnx extra: pip install 'ace-lora-hf[onnx]'"
                                         ) from None
        self.folder = Path(folder)
        description = self._description()
        classes = description.get("classes")
        if classes is None:
            raise InvalidArgumentError(f"{self.folder}: exported without class embeddings; export again with "
                                       "ace-lora-export-onnx --labels ... (and --templates, --multi-label as "
                                       "you classify).")
        self.labels = tuple(classes["labels"])
        self.templates = tuple(classes["templates"])
        self.multi_label = bool(classes["multi_label"])
        self.negative_templates = tuple(classes["negative_templates"]) if self.multi_label else None
        self.logit_scale = torch.tensor(description["logit_scale"], dtype=torch.float32)
        self.class_embeddings = load_file(self.folder / classes["file"])[classes["tensor"]]
        self.session = onnxruntime.InferenceSession(str(self.folder / VISION_FILE),
                                                    providers=["CPUExecutionProvider"])

    def _description(self) -> dict:
        path = self.folder / DESCRIPTION_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelSourceError(f"{path}: not found; give the folder ace-lora-export-onnx wrote.") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelSourceError(f"{path}: damaged; export the model again.") from None

    def label_indices(self, labels: Sequence[str]) -> list[int]:
        """Where `labels` are among the exported ones. Each class (or finding) is embedded on its own, so any of the
        exported labels, in any order, score exactly as they would have been exported alone."""
        labels = checked_findings(labels) if self.multi_label else checked_labels(labels)
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise InvalidArgumentError(f"labels {unknown}: not exported to {self.folder} (it holds the class "
                                       f"embeddings of {list(self.labels)}); classify with those, or export again "
                                       "with --labels naming these.")
        return [self.labels.index(label) for label in labels]

    def __call__(self, pixel_values: np.ndarray | torch.Tensor, labels: Sequence[str] | None = None) -> torch.Tensor:
        """`[N, C]` probabilities of `pixel_values` (`[N, 3, H, W]` float32 as `AceLoraImageProcessor` makes them)
        for `labels` (default: every exported label, in the exported order)."""
        classes = self.class_embeddings if labels is None else self.class_embeddings[self.label_indices(labels)]
        pixels = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else np.asarray(pixel_values)
        (image_embeds,) = self.session.run(None, {"pixel_values": pixels.astype(np.float32, copy=False)})
        return zero_shot_probabilities(zero_shot_logits(self.logit_scale, torch.from_numpy(image_embeds), classes))


__all__ = ["CLASSES_FILE", "CLASSES_TENSOR", "DESCRIPTION_FILE", "ExportedClasses", "OnnxZeroShotClassifier",
           "VISION_FILE"]
