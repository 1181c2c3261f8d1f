"""The on-disk format of what a training run writes and how it loads: trained weights that apply to a frozen base
(`best/`, `checkpoints/step_N/`), found in a run folder and loaded onto their base, or written out as a complete model
folder. Every file is safetensors or JSON: nothing is unpickled, so a checkpoint from elsewhere cannot run code.
"""

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import AutoProcessor

from ..errors import CheckpointError
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..models.ace_lora.modeling_ace_lora_heads import AceLoraForObjectDetection, AceLoraForSegmentation
from ..outputs.safe_outputs import atomic_file, write_json_atomic
from .convert import save_model_folder
from .tensors import check_weight
from .folders import load_pretrained, model_folder


CHECKPOINT_RECORD = "ace_lora_checkpoint.json"  # what the weights are and which base they apply to
TRAINED_WEIGHTS = "trainable.safetensors"
CHECKPOINT_FORMAT = 1
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")
MODEL_CLASSES = {cls.__name__: cls for cls in (AceLoraModel, AceLoraForSegmentation, AceLoraForObjectDetection)}


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; a save in progress (a hidden staging folder) never counts."""
    folder = output_dir / "checkpoints"
    steps = [(int(match.group(1)), path) for path in (folder.iterdir() if folder.is_dir() else ())
             if (match := CHECKPOINT_PATTERN.fullmatch(path.name)) and path.is_dir()]
    return max(steps)[1] if steps else None


@dataclass(frozen=True)
class BaseModel:
    """The frozen model that trained weights apply to: where it came from and a fingerprint of its weights."""

    source: str
    fingerprint: str

    @classmethod
    def of(cls, model: torch.nn.Module, source: str | Path) -> "BaseModel":
        """The base of `model` loaded from `source`: a local folder is recorded by its absolute path, a checkpoint
        folder by its own base (the frozen weights are the same)."""
        if is_checkpoint(source):
            source = read_checkpoint_record(Path(source))["base"]["source"]
        path = Path(source)
        return cls(str(path.resolve()) if path.is_dir() else str(source), frozen_fingerprint(model))


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the frozen parameters (names, dtypes, shapes and values) of `model`."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            tensor = parameter.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tensor.dtype}:{list(parameter.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in trainable_parameters(model).items() if not torch.isfinite(parameter).all()]


def is_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds trained weights written by a run (`best/`, `checkpoints/step_N/`)."""
    return (Path(folder) / CHECKPOINT_RECORD).is_file()


def write_trained_weights(model: torch.nn.Module, folder: Path, base: BaseModel, **details) -> None:
    """Write the trainable weights of `model` and the record of what they are into `folder`."""
    save_tensors(trainable_parameters(model), folder / TRAINED_WEIGHTS)
    config = json.loads(model.config.to_json_string(use_diff=False))
    write_json_atomic(folder / CHECKPOINT_RECORD, {"format": CHECKPOINT_FORMAT, "model_class": type(model).__name__,
                                            "base": asdict(base), **details, "config": config})


def read_checkpoint_record(folder: Path) -> dict:
    record = read_json(folder / CHECKPOINT_RECORD)
    if record.get("format") != CHECKPOINT_FORMAT or not isinstance(record.get("base"), dict):
        raise CheckpointError(f"{folder / CHECKPOINT_RECORD}: not a checkpoint record of this version of ace-lora-hf "
                              f"(format {record.get('format')!r}, expected {CHECKPOINT_FORMAT}).")
    return record


def load_trained_weights(model: torch.nn.Module, folder: Path) -> None:
    """Copy the trained weights of `folder` into `model`, every tensor checked first (names, shapes, finite): a bad
    file leaves the model as it was."""
    tensors = read_tensors(folder / TRAINED_WEIGHTS)
    parameters = trainable_parameters(model)
    if tensors.keys() != parameters.keys():
        missing, unexpected = sorted(parameters.keys() - tensors.keys()), sorted(tensors.keys() - parameters.keys())
        raise CheckpointError(f"{folder / TRAINED_WEIGHTS}: its weights do not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    for name, tensor in tensors.items():
        if tensor.shape != parameters[name].shape:
            raise CheckpointError(f"{folder / TRAINED_WEIGHTS}: {name} has shape {list(tensor.shape)}, the model "
                                  f"{list(parameters[name].shape)}.")
        check_weight(str(folder / TRAINED_WEIGHTS), name, tensor)
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def load_trained_model(source: str | Path | None, model_class: type, option: str = "--model", **config_overrides):
    """`(model, processor)` of `source` as `model_class`: a model folder or Hub id (see `model_sources.model_folder`),
    or a run's checkpoint folder (`best/`, `checkpoints/step_N/`), which is loaded as its base with its trained
    weights, once the base is found to be the one they were trained on."""
    if source is None or not is_checkpoint(source):
        return _model_and_processor(model_class, source, option, **config_overrides)
    folder = Path(source)
    record = read_checkpoint_record(folder)
    if record["model_class"] != model_class.__name__:
        raise CheckpointError(f"{option} {folder}: holds the weights of an {record['model_class']}, not of an "
                              f"{model_class.__name__}; pass a complete model folder (e.g. the run's final/, or "
                              "materialize_checkpoint) instead.")
    config = model_class.config_class.from_dict(record["config"])
    base = record["base"]
    model, processor = _model_and_processor(model_class, base["source"], f"{option} {folder} (its base)", config=config)
    if frozen_fingerprint(model) != base["fingerprint"]:
        raise CheckpointError(f"{option} {folder}: its weights were trained on another base than the one now at "
                              f"{base['source']} (the frozen weights differ); restore that base model.")
    load_trained_weights(model, folder)
    return model, processor


def _model_and_processor(model_class: type, source: str | Path | None, option: str, **kwargs):
    folder = model_folder(source, option)
    return load_pretrained(model_class, folder, option, **kwargs), load_pretrained(AutoProcessor, folder, option)


def materialize_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write a checkpoint folder (`best/`, `checkpoints/step_N/`) as a complete `save_pretrained` folder (model and
    processor) at `output`, which may be the checkpoint folder itself."""
    record = read_checkpoint_record(Path(checkpoint))
    model, processor = load_trained_model(checkpoint, MODEL_CLASSES[record["model_class"]])
    save_model_folder(model, processor, Path(output))
    return Path(output)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    data = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
    with atomic_file(path, "wb") as file:
        file.write(data)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint is incomplete.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}); it may be truncated or damaged: "
                              "use another checkpoint.") from None


def read_json(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a checkpoint of ace-lora-hf, or an incomplete one.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); it may be truncated or damaged: use another "
                              "checkpoint.") from None



__all__ = ["BaseModel", "CHECKPOINT_RECORD", "MODEL_CLASSES", "frozen_fingerprint", "is_checkpoint",
           "latest_checkpoint", "load_trained_model", "load_trained_weights", "materialize_checkpoint",
           "non_finite_parameters",
           "read_checkpoint_record", "read_json", "read_tensors", "save_tensors", "trainable_parameters",
           "write_trained_weights"]
