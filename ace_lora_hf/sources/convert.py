"""Convert BiomedCLIP (open_clip format: a folder or a Hub repository) and the authors' ACE-LoRA adapters into an
`AceLoraModel` folder (safetensors, config, processor and the model code); the command is `ace-lora-convert`
(`ace_lora_hf.cli.convert`).

The adapters are "released" (shipped with this package) or an `ACE_LoRA.pt` (only tensors are read:
`weights_only=True`); without them the result is BiomedCLIP with fresh adapters, the starting point for training. The
tokenizer comes from the one given, else from the BiomedCLIP folder when it has one, else from the repository its
`open_clip_config.json` names (`text_cfg.hf_tokenizer_name`).
"""

from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from .biomedclip import (BIOMEDCLIP_FILES, biomedclip_config, biomedclip_image_processor, biomedclip_state_dict,
                         load_tokenizer, tokenizer_folder)
from ..errors import ModelSourceError
from .hub import local_folder
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from .released_adapters import AdapterCheckpoint, adapter_state_dict, read_adapter_checkpoint
from ..outputs.safe_outputs import atomic_folder


logger = logging.get_logger(__name__)


@dataclass
class ConversionSources:
    """Everything a conversion reads, resolved to local files (Hub repositories downloaded)."""

    biomedclip: Path
    tokenizer: Path
    adapters: AdapterCheckpoint | None


def resolve_sources(
    biomedclip: str | Path,
    adapters: str | Path | None = None,
    tokenizer: str | Path | None = None,
    revision: str | None = None,
) -> ConversionSources:
    """Download what is not local and read the adapters, so that a missing piece fails before any work."""
    folder = local_folder(biomedclip, "--biomedclip", revision, allow_patterns=BIOMEDCLIP_FILES)
    return ConversionSources(
        biomedclip=folder,
        tokenizer=tokenizer_folder(folder, tokenizer),
        adapters=None if adapters is None else read_adapter_checkpoint(adapters),
    )


def convert_sources(sources: ConversionSources, **config_overrides) -> tuple[AceLoraModel, AceLoraProcessor]:
    """An `AceLoraModel` (eval mode) and its processor from resolved sources; every tensor is checked."""
    if sources.adapters is not None:
        config_overrides = {**sources.adapters.config_updates(), **config_overrides}
    config = biomedclip_config(sources.biomedclip, **config_overrides)
    tokenizer = load_tokenizer(sources.tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ModelSourceError(f"{sources.tokenizer}: its {len(tokenizer)} tokens do not fit the text tower's "
                               f"{config.text_config.vocab_size} embeddings; pass the tokenizer BiomedCLIP was "
                               "trained with (--tokenizer).")
    processor = AceLoraProcessor(biomedclip_image_processor(sources.biomedclip), tokenizer,
                                 context_length=config.text_config.context_length)
    model = AceLoraModel(config)
    state = biomedclip_state_dict(sources.biomedclip, model)
    if sources.adapters is not None:
        state.update(adapter_state_dict(sources.adapters, config))
    elif "logit_scale" in state:
        config.logit_scale_init_value = float(state["logit_scale"])
    model.load_state_dict(state, strict=False)
    return model.eval(), processor


def save_model_folder(model: AceLoraModel, processor: AceLoraProcessor, target: Path) -> None:
    """`save_pretrained` of model and processor into `target`, which appears only once both are written."""
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)


__all__ = ["ConversionSources", "convert_sources", "resolve_sources", "save_model_folder"]
