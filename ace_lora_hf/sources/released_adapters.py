"""The authors' ACE-LoRA adapters (trained on MIMIC-CXR, MIT licence): read from their `ACE_LoRA.pt`, or from the
copy shipped in this package.

Both hold the same tensors under the same names: the `.pt` file nests them (`weights/layer_0/q_proj/w_lora_A`), the
shipped safetensors file flattens those names with `/` (`layer_0/q_proj/w_lora_A`) and keeps the metadata (rank,
top-k, adapted projections) as strings. Nothing here unpickles: `.pt` files are read with `weights_only=True`.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..models.ace_lora.configuration_ace_lora import AceLoraConfig
from ..errors import CheckpointError, ModelSourceError
from ..models.ace_lora.modeling_ace_lora import AceLoraTextModel, AceLoraVisionModel
from .tensors import check_weight


RELEASED = "released"
SHIPPED_ADAPTERS = Path(__file__).parent / "released" / "ace_lora_released.safetensors"
HYPERGRAPH_ADAPTERS = {
    "img_edge_adapter": "vision_model.hypergraph.edge_adapter",
    "img_node_adapter": "vision_model.hypergraph.node_adapter",
    "text_edge_adapter": "text_model.hypergraph.edge_adapter",
    "text_node_adapter": "text_model.hypergraph.node_adapter",
}


@dataclass
class AdapterCheckpoint:
    """The adapters of one file: tensors under the authors' (flattened) names and the metadata they were saved with."""

    path: Path
    tensors: dict[str, object]
    metadata: dict[str, str]

    def config_updates(self) -> dict:
        """`AceLoraConfig` fields the checkpoint's metadata records."""
        updates = {}
        if "r" in self.metadata:
            updates["lora_rank"] = int(self.metadata["r"])
        if "topk" in self.metadata:
            updates["hypergraph_top_k"] = int(self.metadata["topk"])
        if "params" in self.metadata:
            updates["lora_target_projections"] = self.metadata["params"].split(",")
        return updates

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def read_adapter_checkpoint(source: str | Path) -> AdapterCheckpoint:
    """`"released"` (the shipped copy), an `ACE_LoRA.pt`, or a safetensors file in the shipped layout."""
    path = SHIPPED_ADAPTERS if str(source) == RELEASED else Path(source)
    if not path.is_file():
        raise ModelSourceError(f"--ace-checkpoint {source}: file not found; pass 'released' for the authors' adapters "
                               "shipped with the package, or the path of an ACE_LoRA.pt.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch_checkpoint(path)


def _read_safetensors(path: Path) -> AdapterCheckpoint:
    try:
        with safe_open(path, "pt") as file:
            return AdapterCheckpoint(path, {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}); it may be truncated.") from None


def _read_torch_checkpoint(path: Path) -> AdapterCheckpoint:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt pickles
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({error}).") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("weights"), dict):
        looks_full = isinstance(checkpoint, dict) and any(str(k).startswith(("visual.", "text.")) for k in checkpoint)
        hint = " It looks like a full BiomedCLIP state dict: pass its folder with --biomedclip." if looks_full else ""
        raise CheckpointError(f"{path}: not an ACE-LoRA adapter checkpoint (no 'weights' entry).{hint}")
    metadata = {key: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
                for key, value in (checkpoint.get("metadata") or {}).items()}
    return AdapterCheckpoint(path, flatten(checkpoint["weights"]), metadata)


def flatten(nested: dict, prefix: str = "") -> dict[str, object]:
    """`{"a": {"b": x}}` -> `{"a/b": x}`."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}/") if isinstance(value, dict) else {name: value})
    return flat


def adapter_state_dict(checkpoint: AdapterCheckpoint, config: AceLoraConfig) -> dict[str, torch.Tensor]:
    """The adapters as `AceLoraModel` state-dict entries, every tensor checked against `config`."""
    reader = _TensorReader(checkpoint)
    converted = {}
    layers = [(AceLoraTextModel, config.text_config, "text_model.encoder.layer", "attention.self"),
              (AceLoraVisionModel, config.vision_config, "vision_model.layers", "attention")]
    index = 0  # the authors number the text tower's layers first, then the vision tower's
    for tower_class, tower, layer_list, attention in layers:
        for layer in range(tower.num_hidden_layers):
            if tower.lora_layers is None or layer in tower.lora_layers:
                for projection in tower.lora_target_projections:
                    module = f"{layer_list}.{layer}.{attention}.{tower_class._lora_module_names[projection]}"
                    converted.update(_lora_pair(reader, f"layer_{index}/{projection}_proj", module, tower))
            index += 1
    for source, target in HYPERGRAPH_ADAPTERS.items():
        tower = config.vision_config if target.startswith("vision") else config.text_config
        if tower.use_hypergraph:
            dim, hidden = tower.projection_dim, tower.hypergraph_hidden_size
            shapes = {"down.weight": (hidden, dim), "down.bias": (hidden,),
                      "up.weight": (dim, hidden), "up.bias": (dim,)}
            for leaf, shape in shapes.items():
                converted[f"{target}.{leaf}"] = reader.tensor(f"{source}/{leaf}", shape)
    converted["logit_scale"] = reader.tensor("logit_scale", ())
    return converted


def _lora_pair(reader: "_TensorReader", name: str, module: str, tower) -> dict[str, torch.Tensor]:
    rank, size = tower.lora_rank, tower.hidden_size
    lora_a = reader.tensor(f"{name}/w_lora_A", None)
    if lora_a.ndim == 2 and lora_a.shape[0] != rank:
        raise CheckpointError(f"{reader.path}: {name}/w_lora_A has rank {lora_a.shape[0]} but the config has "
                              f"lora_rank={rank}.")
    return {f"{module}.lora_A.default.weight": reader.tensor(f"{name}/w_lora_A", (rank, size)),
            f"{module}.lora_B.default.weight": reader.tensor(f"{name}/w_lora_B", (size, rank))}


class _TensorReader:
    """Named tensors of a checkpoint, each checked for presence, type, shape and finite values."""

    def __init__(self, checkpoint: AdapterCheckpoint):
        self.path, self.tensors = checkpoint.path, checkpoint.tensors

    def tensor(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {name}.")
        tensor = self.tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{self.path}: {name} is not a tensor.")
        if shape is not None and tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.path}: {name} has shape {list(tensor.shape)}, expected {list(shape)}.")
        return check_weight(str(self.path), name, tensor)


__all__ = ["RELEASED", "SHIPPED_ADAPTERS", "AdapterCheckpoint", "adapter_state_dict", "flatten",
           "read_adapter_checkpoint"]
