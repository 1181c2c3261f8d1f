"""A calibration file: the temperature that turns zero-shot logits into calibrated probabilities, and the per-label
thresholds of an operating point, fitted on a labelled validation table for one label set and one template list.

The file is small JSON, read without running anything. Zero-shot logits are the model's scaled cosine similarities
of an image with each class (templates combined); the calibrated probabilities are `softmax(logits / temperature)`,
and a label is decided present where its calibrated probability reaches its threshold.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidArgumentError


CALIBRATION_FORMAT = "ace-lora-calibration"
CALIBRATION_VERSION = 1
TARGET_METRICS = ("sensitivity", "specificity")


def _refuse(source: str, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"calibration file {source}: {problem}; write it again with ace-lora-evaluate "
                                "--calibrate-on.")


@dataclass(frozen=True)
class Calibration:
    """Temperature and operating thresholds for `labels` scored with `templates`.

    Args:
        labels (`tuple[str, ...]`): the class names, in the order of the logits.
        templates (`tuple[str, ...]`): the prompt templates the logits were computed with.
        temperature (`float`): divides the logits before the softmax (above 1 softens over-confident scores).
        thresholds (`dict[str, float]`, *optional*): label -> the calibrated probability from which it is decided
            present; labels without one get no decision.
        target (`dict`, *optional*): the operating point the thresholds meet on the validation table, e.g.
            `{"metric": "sensitivity", "value": 0.95}`.
        fitted_on (`dict`, *optional*): what the file was fitted on (table, rows, model), for the record.
    """

    labels: tuple[str, ...]
    templates: tuple[str, ...]
    temperature: float
    thresholds: dict[str, float] = field(default_factory=dict)
    target: dict | None = None
    fitted_on: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "labels": list(self.labels),
                "templates": list(self.templates), "temperature": self.temperature, "thresholds": self.thresholds,
                "target": self.target, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<dict>") -> "Calibration":
        """A calibration from its JSON form, every field checked (one line naming the field where one is wrong)."""
        if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
            raise _refuse(source, f"not an {CALIBRATION_FORMAT} file (its 'format' field)")
        if data.get("version") != CALIBRATION_VERSION:
            raise _refuse(source, f"version {data.get('version')!r}; this code reads version {CALIBRATION_VERSION}")
        labels, templates = data.get("labels"), data.get("templates")
        for name, values in (("labels", labels), ("templates", templates)):
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise _refuse(source, f"'{name}' must be a non-empty list of strings")
        temperature = data.get("temperature")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise _refuse(source, f"'temperature' is {temperature!r}; it must be a positive number")
        thresholds = data.get("thresholds") or {}
        if not isinstance(thresholds, Mapping) or any(
                label not in labels or isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) for label, value in thresholds.items()):
            raise _refuse(source, "'thresholds' must map labels of 'labels' to finite numbers")
        target = data.get("target")
        if target is not None and (not isinstance(target, Mapping) or target.get("metric") not in TARGET_METRICS):
            raise _refuse(source, f"'target' must be null or name a metric among {', '.join(TARGET_METRICS)}")
        return cls(tuple(labels), tuple(templates), float(temperature), {k: float(v) for k, v in thresholds.items()},
                   dict(target) if target else None, dict(data.get("fitted_on") or {}))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read and check a calibration file (JSON only: nothing in it runs)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidArgumentError(f"calibration file {path}: no such file; check the path.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _refuse(str(path), f"unreadable as JSON ({error})") from None
        return cls.from_dict(data, str(path))

    def check(self, labels: Sequence[str], templates: Sequence[str]) -> None:
        """Refuse, in one line naming what differs, labels or templates other than those the file was fitted for."""
        for name, given, fitted in (("labels", list(labels), list(self.labels)),
                                    ("templates", list(templates), list(self.templates))):
            if given != fitted:
                raise InvalidArgumentError(f"the calibration file was fitted for {name} {fitted}, not {given}; pass "
                                           f"those {name} or fit a calibration for these.")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`[N, C]` calibrated probabilities of `[N, C]` zero-shot logits: softmax over the classes of the
        temperature-scaled logits."""
        return (logits.float() / self.temperature).softmax(dim=-1)

    def decide(self, probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label -> `[N]` booleans (present where the calibrated probability reaches its threshold), for the labels
        that have a threshold."""
        return {label: probabilities[:, self.labels.index(label)] >= threshold
                for label, threshold in self.thresholds.items()}


__all__ = ["CALIBRATION_FORMAT", "CALIBRATION_VERSION", "Calibration", "TARGET_METRICS"]
