"""ACE-LoRA for Hugging Face transformers: BiomedCLIP + LoRA + attention-guided hypergraphs."""

from transformers import AutoConfig, AutoModel

from .configuration_ace_lora import AceLoraConfig
from .loss_ace_lora import binarize_labels, false_negative_mask, label_guided_infonce
from .modeling_ace_lora import AceHypergraph, AceLoraModel, AceLoraOutput, AceLoraPreTrainedModel


AutoConfig.register(AceLoraConfig.model_type, AceLoraConfig, exist_ok=True)
AutoModel.register(AceLoraConfig, AceLoraModel, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the code, so a saved folder also loads as remote code.
AceLoraConfig.register_for_auto_class()
AceLoraModel.register_for_auto_class("AutoModel")

__all__ = [
    "AceHypergraph",
    "AceLoraConfig",
    "AceLoraModel",
    "AceLoraOutput",
    "AceLoraPreTrainedModel",
    "binarize_labels",
    "false_negative_mask",
    "label_guided_infonce",
]
