"""Adapter-only export and import: LoRA, hypergraph adapters and logit scale (a few MB) for a shared base."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import AdapterMismatchError
from .modeling_ace_lora import AceLoraModel


ADAPTER_WEIGHTS_NAME = "ace_lora_adapters.safetensors"
ADAPTER_CONFIG_NAME = "ace_lora_adapters.json"
# Settings that decide which adapter tensors exist and what they mean; they must match to load.
STRUCTURE_FIELDS = (
    "lora_rank", "lora_alpha", "use_rslora", "lora_target_projections", "lora_layers",
    "hypergraph_top_k", "hypergraph_hidden_size", "hypergraph_towers", "projection_dim", "text_context_length",
)
TOWER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


def _structure(model: AceLoraModel) -> dict:
    config = model.config
    structure = {field: getattr(config, field) for field in STRUCTURE_FIELDS}
    for tower in ("vision_config", "text_config"):
        structure[tower] = {field: getattr(getattr(config, tower), field) for field in TOWER_FIELDS}
    return json.loads(json.dumps(structure))  # tuples become lists, as in the saved file


def save_adapters(model: AceLoraModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the trainable tensors and the settings they depend on to `directory`."""
    directory = Path(directory)
    weights_path, config_path = directory / ADAPTER_WEIGHTS_NAME, directory / ADAPTER_CONFIG_NAME
    if not overwrite and (weights_path.exists() or config_path.exists()):
        raise FileExistsError(f"{directory} already holds adapters; pass overwrite=True to replace them.")
    if model.lora_merged:
        raise ValueError("LoRA is merged into the base weights; call `model.unmerge_lora()` before exporting.")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, weights_path, metadata={"format": "pt"})
    config_path.write_text(json.dumps({"structure": _structure(model),
                                       "base_model": model.config.name_or_path or None}, indent=2))
    return directory


def load_adapters(model: AceLoraModel, directory: str | Path) -> AceLoraModel:
    """Load adapters written by [`save_adapters`] into `model` (same base architecture), checking everything."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not an ACE-LoRA adapter folder.")
    if model.lora_merged:
        raise ValueError("LoRA is merged into the base weights; call `model.unmerge_lora()` before loading adapters.")
    saved = json.loads(config_path.read_text())["structure"]
    expected = _structure(model)
    differences = [f"{key}: adapters {saved.get(key)!r}, model {value!r}" for key, value in expected.items()
                   if saved.get(key) != value]
    if differences:
        raise AdapterMismatchError(f"{config_path}: adapters do not fit this model ({'; '.join(differences)}).")
    tensors = load_file(weights_path)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if tensors.keys() != parameters.keys():
        missing, unexpected = parameters.keys() - tensors.keys(), tensors.keys() - parameters.keys()
        raise AdapterMismatchError(
            f"{weights_path}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}."
        )
    for name, tensor in tensors.items():  # all checked before any is copied: a bad file leaves the model as it was
        if tensor.shape != parameters[name].shape:
            raise AdapterMismatchError(
                f"{weights_path}: {name} has shape {list(tensor.shape)}, the model {list(parameters[name].shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise AdapterMismatchError(f"{weights_path}: {name} contains NaN or infinite values.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    return model


__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "load_adapters", "save_adapters"]
