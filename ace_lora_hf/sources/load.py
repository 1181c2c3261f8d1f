"""One way to load a model, used by every command and by the Python API: `load(source)`.

A source is any of
- `"released"` (or None): the released ACE-LoRA model, BiomedCLIP from the Hub with the adapters shipped in this
  package, converted once and kept in the Hugging Face cache (`biomedclip=`, `adapters=`, `tokenizer=` choose other
  sources of it);
- a folder or Hub repository in this package's format (`ace-lora-convert`, `save_pretrained`, `ace-lora-publish`, a
  run's `final/`), with `revision=` for the Hub;
- a training run's folder (`--output_dir` of `examples/pretrain.py` or a fine-tune): its `best/`, else its `final/`,
  else its newest checkpoint;
- a run's light `best/` or a `checkpoints/step_N/` folder: the base it names with the trained weights on it, after
  checking that the base is the one they were trained on.
Anything else is refused with one line that says what the source is and what to pass instead.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoProcessor
from transformers.utils import logging

from ..errors import ModelSourceError
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from .checkpoints import MODEL_CLASSES, is_checkpoint, latest_checkpoint, load_trained_model, read_checkpoint_record
from .folders import load_pretrained, model_folder, released_model_folder
from .released_adapters import RELEASED


logger = logging.get_logger(__name__)

RUN_MODEL_FOLDERS = ("best", "final")  # what a run folder loads, in this order, before its newest checkpoint


class LoadedModel(NamedTuple):
    """What `load` returns: `model, processor, description = load(source)`."""

    model: torch.nn.Module
    processor: AceLoraProcessor
    description: str


@dataclass(frozen=True)
class ResolvedSource:
    """A source as `load` will read it: `location` is a model folder, Hub id, checkpoint folder or None (released)."""

    location: str | None
    kind: str  # "released", "model", "checkpoint"
    description: str


def resolve_source(source: str | Path | None, option: str = "--model") -> ResolvedSource:
    """What `source` is, without loading anything: cheap enough to run before any other work starts."""
    if source is None or str(source) == RELEASED:
        return ResolvedSource(None, "released", "the released ACE-LoRA model (BiomedCLIP + the authors' adapters)")
    path = Path(source)
    if is_checkpoint(path):
        record = read_checkpoint_record(path)
        where = f" (epoch {record['epoch']})" if "epoch" in record else ""
        return ResolvedSource(str(path), "checkpoint", f"trained weights {path}{where} on {record['base']['source']}")
    if path.is_dir() and not (path / "config.json").is_file():
        for name in RUN_MODEL_FOLDERS:
            if is_checkpoint(path / name) or (path / name / "config.json").is_file():
                inner = resolve_source(path / name, option)
                return ResolvedSource(inner.location, inner.kind, f"{inner.description}, the {name}/ of run {path}")
        newest = latest_checkpoint(path)
        if newest is not None:
            inner = resolve_source(newest, option)
            return ResolvedSource(inner.location, inner.kind, f"{inner.description}, the newest checkpoint of {path}")
    if path.exists() and not path.is_dir():
        raise ModelSourceError(f"{option} {source}: a file, not a model; pass a model folder, a training run's folder "
                               "(or its best/, final/, checkpoints/step_N/), a Hub id or 'released'.")
    return ResolvedSource(str(source), "model", f"{source}")


def model_identity(source: str | Path | None, revision: str | None = None, **released: Any) -> dict:
    """What identifies the model `source` loads, found without loading it: where it comes from and, for local files,
    each weights file's size and modification time (a run's best/ also names its base). Results files record it, so
    that `--resume` never continues another model's results."""
    resolved = resolve_source(source)
    folder = Path(resolved.location) if resolved.location is not None else None
    weights = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    return {"source": resolved.description, "revision": revision,
            "released": {key: str(value) for key, value in sorted(released.items())} if folder is None else None,
            "weights": [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in weights]}


def load(
    source: str | Path | None = RELEASED,
    *,
    model_class: type | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    for_inference: bool = True,
    option: str = "--model",
    **released: Any,
) -> LoadedModel:
    """The model and processor of `source` (see the module's docstring for what a source can be).

    Args:
        model_class: the class to load as (default: what the folder or checkpoint holds, `AceLoraModel` for a model
            folder); a task head loads the vision tower of any ACE-LoRA folder.
        revision: branch, tag or commit of a Hub repository.
        device, dtype: where and in which dtype the model runs (the float32 parts stay float32).
        for_inference: merge LoRA into the weights and switch to eval mode.
        option: the command-line option the source came from, named in error messages.
        released: `biomedclip`, `adapters`, `tokenizer`, `cache_dir` of the released model.
    """
    resolved = resolve_source(source, option)
    if resolved.kind == "checkpoint":
        model_class = model_class or MODEL_CLASSES[read_checkpoint_record(Path(resolved.location))["model_class"]]
        model, processor = load_trained_model(resolved.location, model_class, option)
        model = model.to(dtype=dtype) if dtype is not None else model
    else:
        folder = (str(released_model_folder(revision=revision, **released)) if resolved.kind == "released"
                  else model_folder(resolved.location, option, revision))
        model = load_pretrained(model_class or AceLoraModel, folder, option, revision=revision, dtype=dtype)
        processor = load_pretrained(AutoProcessor, folder, option, revision=revision)
    if for_inference:
        if hasattr(model, "merge_lora"):
            model.merge_lora()
        model.eval()
    logger.info("Loaded %s", resolved.description)
    return LoadedModel(model.to(device), processor, resolved.description)


__all__ = ["LoadedModel", "ResolvedSource", "load", "model_identity", "resolve_source"]
