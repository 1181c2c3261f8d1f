# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""PyTorch ACE-LoRA: BiomedCLIP's towers with LoRA adapters and an attention-guided hypergraph on each tower."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_ace_lora import AceLoraConfig
from .errors import InvalidArgumentError
from .hub_pipeline import pipeline_recorded
from .loss_ace_lora import label_guided_infonce
from .modeling_ace_lora_base import AceLoraModelMixin
# The modeling module stays the public home of every model class (as in transformers), so it exports these too.
from .hypergraph_ace_lora import AceHypergraph
from .modeling_ace_lora_base import AceLoraTokenFeatures
from .modeling_ace_lora_towers import AceLoraTextModel, AceLoraVisionModel


@dataclass
class AceLoraOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss` is `True` or `labels` is given):
        Contrastive loss: label-guided InfoNCE when `labels` is given, plain symmetric InfoNCE otherwise.
    logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
        Scaled cosine similarities between the ACE image and text embeddings (when both are given).
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
        The transpose of `logits_per_image`.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised text embeddings (the `pooler_output` of [`AceLoraTextModel`]).
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised image embeddings (the `pooler_output` of [`AceLoraVisionModel`]).
    text_model_output (`BaseModelOutputWithPooling`):
        The output of the [`AceLoraTextModel`].
    vision_model_output (`BaseModelOutputWithPooling`):
        The output of the [`AceLoraVisionModel`].
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[key] if key not in ("text_model_output", "vision_model_output") else getattr(self, key).to_tuple()
            for key in self.keys()
        )

# ------------------------------------------------------------------------------------------------- composite


class AceLoraPreTrainedModel(AceLoraModelMixin, PreTrainedModel):
    config_class = AceLoraConfig
    config: AceLoraConfig
    base_model_prefix = "ace_lora"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer", "BertEmbeddings", "BertLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _keep_in_fp32_modules_strict = ["logit_scale"]  # `post_init` adds the towers' lists

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AceLoraModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class AceLoraModel(AceLoraPreTrainedModel):
    r"""
    ACE-LoRA: BiomedCLIP's ViT-B/16 and PubMedBERT towers with rank-stabilised LoRA on their attention projections, an
    attention-guided hypergraph (ACE-HGNN) on the tokens of each tower and a learnable logit scale. Only the adapters,
    the hypergraphs and the logit scale are trainable.

    `logit_scale` holds the scale itself (`logits = logit_scale * cosine`, 78.35 in the released model), not its log
    as CLIP's `logit_scale` does: code written for CLIP that calls `logit_scale.exp()` would overflow to `inf`.

    On disk (ACE-LoRA format 1, written by ace-lora-hf 0.1 and 0.2; `config.json` says `ace_lora_format_version`,
    and a folder without it is format 1): `model.safetensors` holds (float32 as converted) the tensors

    - `vision_model.*`: the ViT in transformers' `ViTModel` layout (`encoder.layer.N.attention.attention.query`, ...);
    - `text_model.*`: PubMedBERT in `BertModel`'s layout (no pooler);
    - LoRA inside both towers as PEFT names it: `<projection>.base_layer.{weight,bias}`, `<projection>.lora_A.default
      .weight` `[r, in]` and `<projection>.lora_B.default.weight` `[out, r]`, unmerged;
    - `visual_projection.weight` `[projection_dim, hidden]` and `text_projection.fc1.weight`, `.fc2.weight` (no
      biases): the projections of every token;
    - `vision_hypergraph.*` and `text_hypergraph.*`: `{edge,node}_adapter.{down,up}.{weight,bias}`;
    - `logit_scale`: a scalar, the scale itself (see above).

    Example:

    ```python
    >>> import ace_lora_hf

    >>> model, processor, _ = ace_lora_hf.load("released")  # BiomedCLIP with the authors' adapters, converted once
    >>> # or a folder written by ace-lora-convert or save_pretrained: AutoModel.from_pretrained("path/to/ace-lora")
    ```
    """

    _extra_auto_classes = ("AutoModelForZeroShotImageClassification",)

    def __init__(self, config: AceLoraConfig):
        super().__init__(config)
        self.vision_model = AceLoraVisionModel._from_config(config.vision_config)
        self.text_model = AceLoraTextModel._from_config(config.text_config)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value, dtype=torch.float32))
        self.post_init()
        # transformers' PEFT integration sees both towers' adapters as one adapter of this model.
        vision_targets = self.vision_model.lora_target_pattern("vision_model.")
        text_targets = self.text_model.lora_target_pattern("text_model.")
        self.peft_config = {"default": self.vision_model.lora_config(f"{vision_targets}|{text_targets}")}
        self._hf_peft_config_loaded = True
        self.mark_trainable_parameters()

    # How the ace-lora-hf package builds the released model's folder (BiomedCLIP converted with the shipped adapters,
    # cached); `import ace_lora_hf` sets it. Remote code alone cannot convert BiomedCLIP.
    released_model_folder: Callable[..., str] | None = None

    @classmethod
    def from_biomedclip(
        cls,
        biomedclip: str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        adapters: str | None = "released",
        revision: str | None = None,
        tokenizer: str | None = None,
        **kwargs,
    ) -> "AceLoraModel":
        r"""
        The released ACE-LoRA model as it exists today: BiomedCLIP (a Hub id or an open_clip folder) with the authors'
        adapters (`"released"`, shipped with the ace-lora-hf package, or the path of an `ACE_LoRA.pt`). Converted on
        the first call and kept in the Hugging Face cache; later calls, offline ones included, load it from there.
        `kwargs` go to `from_pretrained` (e.g. `dtype`). `ace_lora_hf.load("released")` does the same and also returns
        the processor. Needs the ace-lora-hf package.
        """
        if AceLoraModel.released_model_folder is None:
            raise ImportError("AceLoraModel.from_biomedclip converts BiomedCLIP with the ace-lora-hf package: install "
                              "it from a checkout of its repository (pip install -e .), then import ace_lora_hf.")
        folder = AceLoraModel.released_model_folder(biomedclip, adapters, revision=revision, tokenizer=tokenizer)
        return cls.from_pretrained(folder, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`save_pretrained`, recording the zero-shot pipeline too (`custom_pipelines` in config.json and its code), so
        that `pipeline("zero-shot-image-classification", model=FOLDER_OR_REPO, trust_remote_code=True)` builds
        ACE-LoRA's pipeline without the ace-lora-hf package; after `import ace_lora_hf` the package serves it."""
        with pipeline_recorded(self.config, save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        use_hgnn: bool = True,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        The vision tower's output: `pooler_output` is the L2-normalised ACE image embedding (`use_hgnn=False`: the
        projected CLS token, i.e. BiomedCLIP with LoRA). See [`AceLoraVisionModel.forward`].
        """
        outputs = self.vision_model(pixel_values, use_hgnn, output_hidden_states, output_attentions, return_dict=True)
        return outputs if self._return_dict(return_dict) else outputs.to_tuple()

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        use_hgnn: bool = True,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        The text tower's output: `pooler_output` is the L2-normalised ACE text embedding (`use_hgnn=False`: the
        projected CLS token). See [`AceLoraTextModel.forward`].
        """
        outputs = self.text_model(input_ids, attention_mask, token_type_ids, use_hgnn, output_hidden_states,
                                  output_attentions, return_dict=True)
        return outputs if self._return_dict(return_dict) else outputs.to_tuple()

    def get_class_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool | None = None
    ) -> BaseModelOutputWithPooling | tuple:
        r"""Zero-shot class embeddings in `pooler_output`; see [`AceLoraTextModel.get_class_embeddings`]."""
        outputs = self.text_model.get_class_embeddings(input_ids, attention_mask, return_dict=True)
        return outputs if self._return_dict(return_dict) else outputs.to_tuple()

    def _return_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> AceLoraOutput | tuple:
        r"""
        Either tower alone, or both with their similarities (and the contrastive loss).

        labels (`torch.Tensor` of shape `(batch_size, num_labels)`, *optional*):
            Finding labels of each image-report pair (CheXpert style: 1, 0, -1 uncertain, NaN missing). Pairs
            with identical label vectors are not used as each other's negatives (label-guided InfoNCE).
        return_loss (`bool`, *optional*):
            Whether to return the contrastive loss; implied by `labels`.
        """
        if input_ids is None and pixel_values is None:
            raise InvalidArgumentError("AceLoraModel needs pixel_values, input_ids or both.")
        output_flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        vision_outputs = text_outputs = image_embeds = text_embeds = None
        if pixel_values is not None:
            vision_outputs = self.vision_model(pixel_values, **output_flags, return_dict=True)
            image_embeds = vision_outputs.pooler_output
        if input_ids is not None:
            text_outputs = self.text_model(input_ids, attention_mask, token_type_ids, **output_flags, return_dict=True)
            text_embeds = text_outputs.pooler_output
        logits_per_image = loss = None
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = self.logit_scale * image_embeds @ text_embeds.t()
        if return_loss or labels is not None:
            if logits_per_image is None:
                raise InvalidArgumentError("The contrastive loss needs both pixel_values and input_ids.")
            loss = label_guided_infonce(logits_per_image, labels)
        output = AceLoraOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=None if logits_per_image is None else logits_per_image.t(),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if self._return_dict(return_dict) else output.to_tuple()


def _register_checkpoint_layouts() -> None:
    """Keep the on-disk key names of ace-lora-hf 0.1 through transformers' own key-renaming mechanism.

    Saved files keep 0.1's names (`visual_projection`, `vision_hypergraph`, ...; the towers register the ViT's legacy
    layout), which the renamings map to the modules at load and back at save, so folders of either release load with
    either release.
    """
    register_checkpoint_conversion_mapping(
        "AceLoraModel",
        [
            WeightRenaming(r"^visual_projection\.", "vision_model.projection."),
            WeightRenaming(r"^vision_hypergraph\.", "vision_model.hypergraph."),
            WeightRenaming(r"^text_projection\.", "text_model.projection."),
            WeightRenaming(r"^text_hypergraph\.", "text_model.hypergraph."),
        ],
        overwrite=True,
    )


_register_checkpoint_layouts()


__all__ = [
    "AceHypergraph",
    "AceLoraModel",
    "AceLoraOutput",
    "AceLoraPreTrainedModel",
    "AceLoraTextModel",
    "AceLoraTokenFeatures",
    "AceLoraVisionModel",
]
