"""BiomedCLIP as open_clip saves it (`microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`): its config, weights
and tokenizer turned into ACE-LoRA's.

The folder holds `open_clip_pytorch_model.bin` (a state dict, read with `weights_only=True`) and
`open_clip_config.json`, optionally a BERT `config.json` for the text tower and tokenizer files. The Hub repository has
no tokenizer: its `open_clip_config.json` names the tokenizer's repository in `model_cfg.text_cfg.hf_tokenizer_name`.
"""

import json
import re
from pathlib import Path

import torch
from transformers import BertTokenizer
from transformers.utils import logging

from ..models.ace_lora.configuration_ace_lora import AceLoraConfig
from ..errors import CheckpointError, ModelSourceError
from .hub import local_folder
from ..models.ace_lora.image_processing_ace_lora import AceLoraImageProcessor
from ..models.ace_lora.modeling_ace_lora import AceLoraModel


logger = logging.get_logger(__name__)

OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
BIOMEDCLIP_FILES = [OPEN_CLIP_WEIGHTS, "*.json", "*.txt"]
# Where a BiomedCLIP folder may keep its text tower's BERT config (the Hub repo itself has none).
BERT_CONFIG_CANDIDATES = ("pubmedbert_config/config.json", "text_config.json", "bert_config.json")
TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# Buffers some open_clip exports carry; the towers rebuild them.
IGNORED_OPEN_CLIP_KEYS = re.compile(r"text\.transformer\.embeddings\.(position_ids|token_type_ids)$")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}).") from None


def read_open_clip_config(folder: Path) -> dict:
    path = folder / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise ModelSourceError(f"--biomedclip {folder}: no {OPEN_CLIP_CONFIG}; expected a BiomedCLIP folder in "
                               "open_clip's layout (open_clip_pytorch_model.bin + open_clip_config.json).")
    return read_json(path)


# ------------------------------------------------------------------------------------------------------ config


def _timm_vision_config(vision_cfg: dict, path: Path) -> dict:
    name = vision_cfg.get("timm_model_name", "")
    match = re.fullmatch(r"vit_base_patch(\d+)_(\d+)", name)
    if match is None:
        raise CheckpointError(f"{path}: vision tower {name!r} is not supported; expected a timm vit_base_patchP_S.")
    patch_size, image_size = map(int, match.groups())
    return {"patch_size": patch_size, "image_size": int(vision_cfg.get("image_size", image_size))}


def _bert_config(folder: Path) -> dict:
    for candidate in BERT_CONFIG_CANDIDATES:
        if (folder / candidate).is_file():
            logger.info("Text tower config from %s", folder / candidate)
            return read_json(folder / candidate)
    logger.info("No BERT config in %s: using PubMedBERT's (BERT-base uncased) defaults.", folder)
    return {}


def biomedclip_config(folder: Path, **config_overrides) -> AceLoraConfig:
    """An `AceLoraConfig` for the BiomedCLIP folder (adapters and hypergraph at the released defaults unless
    `config_overrides` set them)."""
    model_cfg = read_open_clip_config(folder).get("model_cfg", {})
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_proj_type", "mlp") != "mlp":
        raise CheckpointError(f"{folder / OPEN_CLIP_CONFIG}: text projection {text_cfg['hf_proj_type']!r} is not "
                              "supported (mlp).")
    # Dropout of the released training recipe, whatever the stock BERT config says.
    text_config = {**_bert_config(folder), "attention_probs_dropout_prob": 0.0}
    return AceLoraConfig(
        vision_config=_timm_vision_config(model_cfg.get("vision_cfg", {}), folder / OPEN_CLIP_CONFIG),
        text_config=text_config,
        projection_dim=model_cfg.get("embed_dim", 512),
        **{"text_context_length": text_cfg.get("context_length", 256), **config_overrides},
    )


# --------------------------------------------------------------------------------------------------- processor


def tokenizer_folder(folder: Path, explicit: str | Path | None = None, revision: str | None = None) -> Path:
    """Where the tokenizer comes from: `explicit` (a folder or Hub id) if given, else the BiomedCLIP folder when it
    has tokenizer files, else the repository its `open_clip_config.json` names (`text_cfg.hf_tokenizer_name`)."""
    if explicit is not None:
        tokenizer = local_folder(explicit, "--tokenizer", revision, allow_patterns=TOKENIZER_FILES)
        if not _has_tokenizer_files(tokenizer):
            raise ModelSourceError(f"--tokenizer {explicit}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                                   "pass PubMedBERT's tokenizer (a folder or "
                                   "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract).")
        return tokenizer
    if _has_tokenizer_files(folder):
        return folder
    named = read_open_clip_config(folder).get("model_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if not named:
        raise ModelSourceError(f"--biomedclip {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) and its "
                               f"{OPEN_CLIP_CONFIG} names none (text_cfg.hf_tokenizer_name); pass --tokenizer with "
                               "PubMedBERT's tokenizer (a folder or "
                               "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract).")
    return local_folder(named, f"--biomedclip {folder}: the tokenizer it names,", allow_patterns=TOKENIZER_FILES)


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES[:2])


def load_tokenizer(folder: Path) -> BertTokenizer:
    try:
        return BertTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{folder}: not a usable BERT tokenizer ({error}).") from None


def biomedclip_image_processor(folder: Path) -> AceLoraImageProcessor:
    """BiomedCLIP's preprocessing with the image size and normalisation its open_clip config records."""
    open_clip_config = read_open_clip_config(folder)
    model_cfg, preprocess = open_clip_config.get("model_cfg", {}), open_clip_config.get("preprocess_cfg", {})
    image_size = int(model_cfg.get("vision_cfg", {}).get("image_size", 224))
    return AceLoraImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **{f"image_{key}": preprocess[key] for key in ("mean", "std") if key in preprocess},
    )


# ----------------------------------------------------------------------------------------------------- weights


def _open_clip_key_to_hf(key: str) -> list[tuple[str, int | None]]:
    """Our parameter name(s) for an open_clip key; a fused qkv maps to three names with their row block."""
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
        return [(f"vision_model.layers.{block}.attention.{name}.{kind}", index)
                for index, name in enumerate(("q_proj", "k_proj", "v_proj"))]
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


def _load_open_clip_weights(path: Path) -> dict:
    if not path.is_file():
        raise ModelSourceError(f"--biomedclip {path.parent}: no {OPEN_CLIP_WEIGHTS}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt pickles
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({error}).") from None
    if not isinstance(state, dict) or "weights" in state:
        raise CheckpointError(f"{path}: expected an open_clip state dict of tensors.")
    return state


def biomedclip_state_dict(folder: Path, model: AceLoraModel) -> dict[str, torch.Tensor]:
    """BiomedCLIP's open_clip weights renamed (and qkv split) to `model`'s state-dict keys, shape-checked."""
    path = folder / OPEN_CLIP_WEIGHTS
    state = _load_open_clip_weights(path)
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
                raise CheckpointError(f"{path}: key {key!r} has shape {list(value.shape)}, the model expects "
                                      f"{list(model_state[name].shape)} for {name!r}.")
            converted[name] = value
    missing = sorted(key for key in model_state if not model._is_trainable(key) and key not in converted)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing weights for {shown}.")
    if "logit_scale" in state:
        converted["logit_scale"] = state["logit_scale"].exp()
    return converted


__all__ = ["BIOMEDCLIP_FILES", "biomedclip_config", "biomedclip_image_processor", "biomedclip_state_dict",
           "load_tokenizer", "read_open_clip_config", "tokenizer_folder"]
