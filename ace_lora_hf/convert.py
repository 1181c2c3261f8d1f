"""Convert BiomedCLIP (open_clip format) and the authors' ACE-LoRA adapters into an `AceLoraModel` folder.

    python -m ace_lora_hf.convert --biomedclip DIR [--ace-checkpoint ACE_LoRA.pt] --output OUT_DIR

`DIR` is laid out like the Hub repo `microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`
(`open_clip_pytorch_model.bin`, `open_clip_config.json`, optionally a BERT `config.json` and tokenizer files).
Without `--ace-checkpoint` the result is BiomedCLIP with fresh adapters: the starting point for training.
"""

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import BertTokenizer
from transformers.utils import logging

from .configuration_ace_lora import AceLoraConfig
from .errors import CheckpointError
from .image_processing_ace_lora import AceLoraImageProcessor
from .modeling_ace_lora import AceLoraModel, AceLoraTextModel, AceLoraVisionModel
from .processing_ace_lora import AceLoraProcessor


logger = logging.get_logger(__name__)

OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Where a BiomedCLIP folder may keep its text tower's BERT config (the Hub repo itself has none).
BERT_CONFIG_CANDIDATES = ("pubmedbert_config/config.json", "text_config.json", "bert_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Buffers some open_clip exports carry; the towers rebuild them.
IGNORED_OPEN_CLIP_KEYS = re.compile(r"text\.transformer\.embeddings\.(position_ids|token_type_ids)$")
ADAPTER_KEYS = {
    "img_edge_adapter": "vision_model.hypergraph.edge_adapter",
    "img_node_adapter": "vision_model.hypergraph.node_adapter",
    "text_edge_adapter": "text_model.hypergraph.edge_adapter",
    "text_node_adapter": "text_model.hypergraph.node_adapter",
}


# --------------------------------------------------------------------------------------------------- BiomedCLIP


def _timm_vision_config(vision_cfg: dict, path: Path) -> dict:
    name = vision_cfg.get("timm_model_name", "")
    match = re.fullmatch(r"vit_base_patch(\d+)_(\d+)", name)
    if match is None:
        raise CheckpointError(f"{path}: vision tower {name!r} is not supported; expected a timm vit_base_patchP_S.")
    patch_size, image_size = map(int, match.groups())
    return {"patch_size": patch_size, "image_size": int(vision_cfg.get("image_size", image_size))}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}).") from error


def biomedclip_config(biomedclip_dir: Path, **config_overrides) -> AceLoraConfig:
    """An `AceLoraConfig` for the BiomedCLIP folder (its adapters and hypergraph at the released defaults unless
    `config_overrides` set them)."""
    config_path = biomedclip_dir / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --biomedclip must be a BiomedCLIP (open_clip) folder.")
    model_cfg = _read_json(config_path).get("model_cfg", {})
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_proj_type", "mlp") != "mlp":
        raise CheckpointError(f"{config_path}: text projection {text_cfg['hf_proj_type']!r} is not supported (mlp).")
    text_config = {}
    for candidate in BERT_CONFIG_CANDIDATES:
        if (biomedclip_dir / candidate).is_file():
            text_config = _read_json(biomedclip_dir / candidate)
            logger.info("Text tower config from %s", biomedclip_dir / candidate)
            break
    else:
        logger.info("No BERT config in %s: using PubMedBERT's (BERT-base uncased) defaults.", biomedclip_dir)
    # Dropout of the released training recipe, whatever the stock BERT config says.
    text_config = {**text_config, "attention_probs_dropout_prob": 0.0}
    return AceLoraConfig(
        vision_config=_timm_vision_config(model_cfg.get("vision_cfg", {}), config_path),
        text_config=text_config,
        projection_dim=model_cfg.get("embed_dim", 512),
        **{"text_context_length": text_cfg.get("context_length", 256), **config_overrides},
    )


def biomedclip_processor(biomedclip_dir: Path) -> AceLoraProcessor | None:
    """The folder's tokenizer (BiomedCLIP ships PubMedBERT's) with its image preprocessing; `None` without one."""
    if not any((biomedclip_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    open_clip_config = _read_json(biomedclip_dir / OPEN_CLIP_CONFIG)
    model_cfg, preprocess = open_clip_config.get("model_cfg", {}), open_clip_config.get("preprocess_cfg", {})
    image_size = int(model_cfg.get("vision_cfg", {}).get("image_size", 224))
    image_processor = AceLoraImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **{f"image_{key}": preprocess[key] for key in ("mean", "std") if key in preprocess},
    )
    return AceLoraProcessor(image_processor, BertTokenizer.from_pretrained(biomedclip_dir))


def _open_clip_key_to_hf(key: str) -> list[tuple[str, slice | None]]:
    """Our parameter name(s) for an open_clip key; a fused qkv maps to three names with row slices."""
    rules = [
        (r"visual\.trunk\.cls_token", "vision_model.embeddings.cls_token"),
        (r"visual\.trunk\.pos_embed", "vision_model.embeddings.position_embeddings"),
        (r"visual\.trunk\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embeddings.projection.\1"),
        (r"visual\.trunk\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_model.layers.\1.layernorm_before.\2"),
        (r"visual\.trunk\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_model.layers.\1.layernorm_after.\2"),
        (r"visual\.trunk\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.layers.\1.attention.o_proj.\2"),
        (r"visual\.trunk\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.layers.\1.mlp.\2.\3"),
        (r"visual\.trunk\.norm\.(weight|bias)", r"vision_model.layernorm.\1"),
        (r"visual\.head\.proj\.weight", "vision_model.projection.weight"),
        (r"text\.transformer\.(.+)", r"text_model.\1"),
        (r"text\.proj\.0\.weight", "text_model.projection.fc1.weight"),
        (r"text\.proj\.2\.weight", "text_model.projection.fc2.weight"),
    ]
    qkv = re.fullmatch(r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
    if qkv:
        block, kind = qkv.groups()
        return [(f"vision_model.layers.{block}.attention.{name}.{kind}", index) for index, name in enumerate(
            ("q_proj", "k_proj", "v_proj"))]
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return [(re.sub(pattern, target, key), None)]
    return []


def _base_layer_name(name: str, model_keys: set[str]) -> str:
    """The state-dict key of a weight whose `Linear` may be wrapped by LoRA (`...q_proj.base_layer.weight`)."""
    if name in model_keys:
        return name
    module, leaf = name.rsplit(".", 1)
    return f"{module}.base_layer.{leaf}"


def _load_torch_file(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt pickles
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({error}).") from error


def biomedclip_state_dict(biomedclip_dir: Path, model: AceLoraModel) -> dict[str, torch.Tensor]:
    """BiomedCLIP's open_clip weights renamed (and qkv split) to `model`'s state-dict keys, shape-checked."""
    path = biomedclip_dir / OPEN_CLIP_WEIGHTS
    state = _load_torch_file(path)
    if not isinstance(state, dict) or "weights" in state:
        raise CheckpointError(f"{path}: expected an open_clip state dict of tensors.")
    model_state = model.state_dict()
    model_keys = set(model_state)
    converted = {}
    for key, tensor in state.items():
        if key == "logit_scale" or IGNORED_OPEN_CLIP_KEYS.fullmatch(key):
            continue
        targets = _open_clip_key_to_hf(key)
        if not targets:
            raise CheckpointError(f"{path}: unexpected key {key!r} (not part of BiomedCLIP's ViT-B/16 + BERT).")
        for name, part in targets:
            value = tensor if part is None else tensor.chunk(3, dim=0)[part]
            name = _base_layer_name(name, model_keys)
            if name not in model_state:
                raise CheckpointError(f"{path}: key {key!r} has no counterpart {name!r} in the model config.")
            if value.shape != model_state[name].shape:
                raise CheckpointError(
                    f"{path}: key {key!r} has shape {list(value.shape)}, the model expects "
                    f"{list(model_state[name].shape)} for {name!r}."
                )
            converted[name] = value
    _check_complete(path, converted, model_keys, expected=lambda k: not model._is_trainable(k))
    if "logit_scale" in state:
        converted["logit_scale"] = state["logit_scale"].exp()
    return converted


def _check_complete(path: Path, converted: dict, model_keys: set[str], expected) -> None:
    missing = sorted(k for k in model_keys if expected(k) and k not in converted)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing weights for {shown}.")


# --------------------------------------------------------------------------------------------- ACE-LoRA adapters


def _ace_weights(path: Path) -> tuple[dict, dict]:
    checkpoint = _load_torch_file(path)
    if not isinstance(checkpoint, dict) or "weights" not in checkpoint:
        looks_full = isinstance(checkpoint, dict) and any(str(k).startswith(("visual.", "text.")) for k in checkpoint)
        hint = " It looks like a full BiomedCLIP state dict: pass it with --biomedclip." if looks_full else ""
        raise CheckpointError(f"{path}: not an ACE-LoRA adapter checkpoint (no 'weights' entry).{hint}")
    return checkpoint["weights"], checkpoint.get("metadata", {})


def _require(path: Path, container: dict, key: str, where: str) -> object:
    if not isinstance(container, dict) or key not in container:
        raise CheckpointError(f"{path}: missing key {where}{key!r}.")
    return container[key]


def _checked(path: Path, tensor: object, where: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: {where} is not a tensor.")
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{path}: {where} has shape {list(tensor.shape)}, expected {list(shape)}.")
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: {where} contains NaN or infinite values.")
    return tensor


def ace_config_updates(metadata: dict) -> dict:
    """`AceLoraConfig` fields recorded in an ACE-LoRA checkpoint's metadata."""
    updates = {}
    if "r" in metadata:
        updates["lora_rank"] = int(metadata["r"])
    if "topk" in metadata:
        updates["hypergraph_top_k"] = int(metadata["topk"])
    if "params" in metadata:
        updates["lora_target_projections"] = list(metadata["params"])
    return updates


def _released_layer_module(config: AceLoraConfig, index: int) -> tuple[str, dict, int]:
    """Module prefix, projection names and layer index of the authors' `layer_{index}`: text first, then vision."""
    num_text_layers = config.text_config.num_hidden_layers
    if index < num_text_layers:
        return f"text_model.encoder.layer.{index}.attention.self.", AceLoraTextModel._lora_module_names, index
    layer = index - num_text_layers
    return f"vision_model.layers.{layer}.attention.", AceLoraVisionModel._lora_module_names, layer


def ace_state_dict(path: Path, config: AceLoraConfig) -> dict[str, torch.Tensor]:
    """The authors' adapters (SPEC §8 layout) as `AceLoraModel` state-dict entries, every shape checked."""
    weights, _ = _ace_weights(path)
    rank, hidden = config.vision_config.lora_rank, config.vision_config.hypergraph_hidden_size
    converted = {}
    for index in range(config.text_config.num_hidden_layers + config.vision_config.num_hidden_layers):
        prefix, names, layer = _released_layer_module(config, index)
        tower = config.text_config if names is AceLoraTextModel._lora_module_names else config.vision_config
        if tower.lora_layers is not None and layer not in tower.lora_layers:
            continue
        entry = _require(path, weights, f"layer_{index}", "weights/")
        size = tower.hidden_size
        for projection in tower.lora_target_projections:
            where = f"weights/layer_{index}/{projection}_proj/"
            adapter = _require(path, entry, f"{projection}_proj", f"weights/layer_{index}/")
            lora_a = _require(path, adapter, "w_lora_A", where)
            lora_b = _require(path, adapter, "w_lora_B", where)
            if isinstance(lora_a, torch.Tensor) and lora_a.ndim == 2 and lora_a.shape[0] != rank:
                raise CheckpointError(
                    f"{path}: {where}w_lora_A has rank {lora_a.shape[0]} but the config has lora_rank={rank}."
                )
            module = prefix + names[projection]
            converted[f"{module}.lora_A.default.weight"] = _checked(path, lora_a, where + "w_lora_A", (rank, size))
            converted[f"{module}.lora_B.default.weight"] = _checked(path, lora_b, where + "w_lora_B", (size, rank))
    for source, target in ADAPTER_KEYS.items():
        if not (config.vision_config if target.startswith("vision") else config.text_config).use_hypergraph:
            continue
        adapter = _require(path, weights, source, "weights/")
        dim = config.projection_dim
        shapes = {"down.weight": (hidden, dim), "down.bias": (hidden,), "up.weight": (dim, hidden), "up.bias": (dim,)}
        for leaf, shape in shapes.items():
            converted[f"{target}.{leaf}"] = _checked(
                path, _require(path, adapter, leaf, f"weights/{source}/"), f"weights/{source}/{leaf}", shape
            )
    scale = _checked(path, _require(path, weights, "logit_scale", "weights/"), "weights/logit_scale", ())
    converted["logit_scale"] = scale
    return converted


# ------------------------------------------------------------------------------------------------------- public


def conversion_config(
    biomedclip_dir: str | Path, ace_checkpoint: str | Path | None = None, **config_overrides
) -> AceLoraConfig:
    """The BiomedCLIP folder's config, updated by the checkpoint's metadata (rank, top-k, projections), then
    by `config_overrides`."""
    if ace_checkpoint is not None:
        _, metadata = _ace_weights(Path(ace_checkpoint))
        config_overrides = {**ace_config_updates(metadata), **config_overrides}
    return biomedclip_config(Path(biomedclip_dir), **config_overrides)


def convert_biomedclip(
    biomedclip_dir: str | Path, ace_checkpoint: str | Path | None = None, **config_overrides
) -> AceLoraModel:
    """Build an `AceLoraModel` from a BiomedCLIP folder and, optionally, the authors' `ACE_LoRA.pt`.

    Every tensor is checked; a wrong file fails naming the file and the key. Without a checkpoint the adapters
    are fresh (LoRA is a no-op) and the logit scale starts from BiomedCLIP's.
    """
    config = conversion_config(biomedclip_dir, ace_checkpoint, **config_overrides)
    model = AceLoraModel(config)
    state = biomedclip_state_dict(Path(biomedclip_dir), model)
    if ace_checkpoint is not None:
        state.update(ace_state_dict(Path(ace_checkpoint), config))
    else:
        config.logit_scale_init_value = float(state.get("logit_scale", config.logit_scale_init_value))
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ace_lora_hf.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--biomedclip", type=Path, required=True, help="BiomedCLIP folder (open_clip format).")
    parser.add_argument("--ace-checkpoint", type=Path, help="The authors' ACE_LoRA.pt adapters (optional).")
    parser.add_argument("--output", type=Path, required=True, help="Folder to write (save_pretrained layout).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the files of a non-empty --output.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.output} is not empty; pass --overwrite to replace its files.")
    model = convert_biomedclip(args.biomedclip, args.ace_checkpoint)
    model.save_pretrained(args.output)
    processor = biomedclip_processor(args.biomedclip)
    if processor is None:
        logger.warning(
            "%s has no tokenizer files (%s): the output has no processor. Copy PubMedBERT's tokenizer there and "
            "convert again, or save an AceLoraProcessor into %s yourself.",
            args.biomedclip, ", ".join(TOKENIZER_FILES), args.output,
        )
    else:
        processor.save_pretrained(args.output)
    print(f"Wrote ACE-LoRA ({'released adapters' if args.ace_checkpoint else 'fresh adapters'}) to {args.output}")


if __name__ == "__main__":
    main()
