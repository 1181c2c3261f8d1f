"""Adapter-only export and import (a few MB for a shared base): LoRA in PEFT's own format, beside it the hypergraph
adapters and the logit scale.

A folder written by `save_adapters` holds:
- `adapter_config.json` and `adapter_model.safetensors`: the LoRA of both towers exactly as `PeftModel.save_pretrained`
  writes it, so `model.load_adapter(folder)` (transformers) and `PeftModel.from_pretrained(model, folder)` read it;
- `ace_lora_extras.safetensors`: the hypergraph adapters and the logit scale, which PEFT does not know about;
- `ace_lora_adapters.json`: the settings the tensors depend on, checked before anything is loaded.
"""

import json
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..errors import AdapterMismatchError, CheckpointError, InvalidArgumentError, OutputPathError
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..outputs.safe_outputs import atomic_file, ensure_folder, write_text_atomic
from .tensors import check_weight


PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
EXTRAS_WEIGHTS_NAME = "ace_lora_extras.safetensors"
STRUCTURE_NAME = "ace_lora_adapters.json"
ADAPTER_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, EXTRAS_WEIGHTS_NAME, STRUCTURE_NAME)
PEFT_PREFIX = "base_model.model."  # PeftModel's own prefix of the wrapped model's keys
ADAPTER_NAME = "default"
# Tower settings that decide which adapter tensors exist and what they mean; they must match to load.
STRUCTURE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "projection_dim", "lora_rank", "lora_alpha",
    "use_rslora", "lora_target_projections", "lora_layers", "use_hypergraph", "hypergraph_top_k",
    "hypergraph_hidden_size",
)


def _structure(model: AceLoraModel) -> dict:
    config = model.config
    structure = {tower: {field: getattr(getattr(config, tower), field) for field in STRUCTURE_FIELDS}
                 for tower in ("vision_config", "text_config")}
    structure["text_config"]["context_length"] = config.text_config.context_length
    return json.loads(json.dumps(structure))  # tuples become lists, as in the saved file


def _extras(model: AceLoraModel) -> dict[str, torch.Tensor]:
    """The trainable tensors PEFT does not hold: hypergraph adapters and logit scale."""
    return {name: parameter for name, parameter in model.named_parameters()
            if model._is_trainable(name) and ".lora_" not in name}


def save_adapters(model: AceLoraModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write LoRA (PEFT format), the hypergraph adapters, the logit scale and their settings to `directory`."""
    directory = Path(directory)
    existing = [name for name in ADAPTER_FILES if (directory / name).exists()]
    if existing and not overwrite:
        raise OutputPathError(f"{directory} already holds adapters ({', '.join(existing)}); pass overwrite=True to "
                              "replace them.")
    if model.lora_merged:
        raise InvalidArgumentError("LoRA is merged into the base weights; call `model.unmerge_lora()` before "
                                   "exporting adapters.")
    ensure_folder(directory)
    lora = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    _save_tensors({PEFT_PREFIX + name: tensor for name, tensor in lora.items()}, directory / PEFT_WEIGHTS_NAME)
    _save_tensors(_extras(model), directory / EXTRAS_WEIGHTS_NAME)
    peft_config = model.peft_config[ADAPTER_NAME].to_dict()
    peft_config["base_model_name_or_path"] = model.config.name_or_path or None
    write_text_atomic(directory / PEFT_CONFIG_NAME, json.dumps(peft_config, indent=2, default=sorted))
    write_text_atomic(directory / STRUCTURE_NAME, json.dumps({"structure": _structure(model),
                                                              "base_model": model.config.name_or_path or None},
                                                             indent=2))
    return directory


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    data = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
                metadata={"format": "pt"})
    with atomic_file(path, "wb") as file:
        file.write(data)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}); it may be truncated.") from None


def load_adapters(model: AceLoraModel, directory: str | Path) -> AceLoraModel:
    """Load adapters written by [`save_adapters`] into `model` (same architecture), checking every tensor first."""
    directory = Path(directory)
    for name in (STRUCTURE_NAME, PEFT_WEIGHTS_NAME, EXTRAS_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} not found: not an ACE-LoRA adapter folder (see save_adapters).")
    if model.lora_merged:
        raise InvalidArgumentError("LoRA is merged into the base weights; call `model.unmerge_lora()` before "
                                   "loading adapters.")
    _check_structure(model, directory / STRUCTURE_NAME)
    tensors = {_model_key(name): tensor for name, tensor in _read_tensors(directory / PEFT_WEIGHTS_NAME).items()}
    tensors.update(_read_tensors(directory / EXTRAS_WEIGHTS_NAME))
    parameters = {name: p for name, p in model.named_parameters() if model._is_trainable(name)}
    if tensors.keys() != parameters.keys():
        missing, unexpected = parameters.keys() - tensors.keys(), tensors.keys() - parameters.keys()
        raise AdapterMismatchError(f"{directory}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}.")
    for name, tensor in tensors.items():  # all checked before any is copied: a bad file leaves the model as it was
        if tensor.shape != parameters[name].shape:
            raise AdapterMismatchError(
                f"{directory}: {name} has shape {list(tensor.shape)}, the model {list(parameters[name].shape)}."
            )
        check_weight(str(directory), name, tensor)
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    return model


def _check_structure(model: AceLoraModel, path: Path) -> None:
    try:
        saved = json.loads(path.read_text())["structure"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not an ACE-LoRA adapter description ({error}).") from None
    differences = [
        f"{tower}.{field}: adapters {saved.get(tower, {}).get(field)!r}, model {value!r}"
        for tower, fields in _structure(model).items() for field, value in fields.items()
        if saved.get(tower, {}).get(field) != value
    ]
    if differences:
        raise AdapterMismatchError(f"{path}: adapters do not fit this model ({'; '.join(differences)}).")


def _model_key(peft_key: str) -> str:
    """`base_model.model.X.lora_A.weight` (PEFT's file) -> `X.lora_A.default.weight` (the model's parameter)."""
    name = peft_key.removeprefix(PEFT_PREFIX)
    module, leaf = name.rsplit(".", 1)
    return f"{module}.{ADAPTER_NAME}.{leaf}"


__all__ = ["load_adapters", "save_adapters"]
