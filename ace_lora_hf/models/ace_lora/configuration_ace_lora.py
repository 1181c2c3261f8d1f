# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""ACE-LoRA model configuration: one sub-configuration per tower and the composite model's."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from transformers import BertConfig, PreTrainedConfig, ViTConfig

from .errors import ConfigError, FormatVersionError


LORA_PROJECTION_CHOICES = ("q", "k", "v")
HYPERGRAPH_TOWER_CHOICES = {
    "both": (True, True), "vision": (True, False), "text": (False, True), "none": (False, False)
}
# Top-level keys of configs written by ace-lora-hf 0.1 (and accepted as conveniences): which tower fields they set.
TOWER_SHORTHANDS = {
    "lora_rank": ("vision_config", "text_config"),
    "lora_alpha": ("vision_config", "text_config"),
    "lora_dropout": ("vision_config", "text_config"),
    "use_rslora": ("vision_config", "text_config"),
    "lora_target_projections": ("vision_config", "text_config"),
    "lora_layers": ("vision_config", "text_config"),
    "hypergraph_top_k": ("vision_config", "text_config"),
    "hypergraph_hidden_size": ("vision_config", "text_config"),
}
TEXT_SHORTHANDS = {
    "text_context_length": "context_length",
    "text_projection_hidden_size": "projection_hidden_size",
    "text_attention_output_dropout": "attention_output_dropout",
}
# The on-disk format this code reads and writes (see `AceLoraModel`); config.json records it as
# `ace_lora_format_version`, and a folder without it is format 1 (ace-lora-hf 0.1.0).
FORMAT_VERSION = 1
# LoRA settings that the two towers must share: the model has one LoRA configuration (one PEFT adapter).
SHARED_LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "use_rslora")


@dataclass(kw_only=True, repr=False)
class AceLoraTowerFields:
    r"""
    The ACE-LoRA settings of one tower, on top of its backbone's configuration.

    Args:
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension of the shared image-text embedding space.
        lora_rank (`int`, *optional*, defaults to 4):
            Rank `r` of every LoRA adapter.
        lora_alpha (`float`, *optional*, defaults to 1.0):
            LoRA alpha. With `use_rslora` the update is scaled by `alpha / sqrt(r)` (0.5 by default).
        lora_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the input of the LoRA branch.
        use_rslora (`bool`, *optional*, defaults to `True`):
            Rank-stabilised scaling `alpha / sqrt(r)` instead of `alpha / r`.
        lora_target_projections (`list[str]`, *optional*, defaults to `["q", "k", "v"]`):
            Which attention projections carry an adapter.
        lora_layers (`list[int]`, *optional*):
            Indices of the layers that carry adapters. `None` adapts every layer.
        use_hypergraph (`bool`, *optional*, defaults to `True`):
            Whether the tower's embedding is the CLS node of the ACE hypergraph (`False`: the projected CLS token).
        hypergraph_top_k (`int`, *optional*, defaults to 5):
            Number of neighbours kept in each row of the hypergraph.
        hypergraph_hidden_size (`int`, *optional*, defaults to 128):
            Bottleneck width of the hyperedge and node adapters.
    """

    projection_dim: int = 512
    lora_rank: int = 4
    lora_alpha: float | int = 1.0
    lora_dropout: float | int = 0.1
    use_rslora: bool = True
    lora_target_projections: list[str] = field(default_factory=lambda: list(LORA_PROJECTION_CHOICES))
    lora_layers: list[int] | None = None
    use_hypergraph: bool = True
    hypergraph_top_k: int = 5
    hypergraph_hidden_size: int = 128

    @property
    def num_tokens(self) -> int:
        """Tokens the hypergraph spans (CLS included)."""
        raise NotImplementedError

    def validate_lora(self):
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank={self.lora_rank}: the LoRA rank must be at least 1.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha}: must be positive.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout}: must be in [0, 1).")
        unknown = sorted(set(self.lora_target_projections) - set(LORA_PROJECTION_CHOICES))
        if unknown or not self.lora_target_projections:
            raise ConfigError(f"lora_target_projections={self.lora_target_projections}: choose a non-empty subset "
                              f"of {list(LORA_PROJECTION_CHOICES)}.")
        outside = [layer for layer in self.lora_layers or () if not 0 <= layer < self.num_hidden_layers]
        if outside:
            raise ConfigError(f"lora_layers has {outside}: the tower has layers 0..{self.num_hidden_layers - 1}.")

    def validate_hypergraph(self):
        if self.projection_dim < 1 or self.hypergraph_hidden_size < 1:
            raise ConfigError(f"projection_dim={self.projection_dim} and hypergraph_hidden_size="
                              f"{self.hypergraph_hidden_size} must be at least 1.")
        # Each neighbour's row ranks the other non-CLS tokens, so k can be at most the token count minus two.
        largest = self.num_tokens - 2
        if not 1 <= self.hypergraph_top_k <= largest:
            raise ConfigError(f"{self.base_config_key}.hypergraph_top_k={self.hypergraph_top_k}: the tower has "
                              f"{self.num_tokens} tokens, so top-k must be between 1 and {largest}.")


@strict
class AceLoraVisionConfig(AceLoraTowerFields, ViTConfig):
    r"""
    The vision tower of ACE-LoRA: BiomedCLIP's ViT-B/16 (timm `vit_base_patch16_224`: LayerNorm eps 1e-6, exact GELU,
    q/k/v biases, no dropout) with the ACE-LoRA fields of [`AceLoraTowerFields`].
    """

    model_type = "ace_lora_vision_model"
    base_config_key = "vision_config"

    layer_norm_eps: float = 1e-6

    @property
    def num_tokens(self) -> int:
        image_size, patch_size = self.image_size, self.patch_size
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        patch_height, patch_width = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        return (height // patch_height) * (width // patch_width) + 1


@strict
class AceLoraTextConfig(AceLoraTowerFields, BertConfig):
    r"""
    The text tower of ACE-LoRA: PubMedBERT (BERT-base uncased) with the ACE-LoRA fields of [`AceLoraTowerFields`].

    Args:
        projection_hidden_size (`int`, *optional*, defaults to 640):
            Hidden size of the text projection MLP (`Linear -> GELU -> Linear`, no biases).
        context_length (`int`, *optional*, defaults to 256):
            Every text is padded (or must fit) to this many tokens; the text hypergraph spans all of them.
        attention_output_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after BERT's attention output projection (BERT's stock value would be `hidden_dropout_prob`).
    """

    model_type = "ace_lora_text_model"
    base_config_key = "text_config"

    # The released model was trained without dropout on BERT's attention probabilities (the authors' training code
    # built PubMedBERT with attention_probs_dropout_prob=0), so its default is 0 here too.
    attention_probs_dropout_prob: float | int = 0.0
    projection_hidden_size: int = 640
    context_length: int = 256
    attention_output_dropout: float | int = 0.0

    @property
    def num_tokens(self) -> int:
        return self.context_length

    def validate_context_length(self):
        if not 3 <= self.context_length <= self.max_position_embeddings:
            raise ConfigError(f"context_length={self.context_length}: must be between 3 and the text tower's "
                              f"max_position_embeddings={self.max_position_embeddings}.")


@strict
class AceLoraConfig(PreTrainedConfig):
    r"""
    Configuration of an [`AceLoraModel`]: BiomedCLIP's two towers with LoRA adapters, the ACE hypergraph on each tower
    and a learnable logit scale. The defaults describe the released ACE-LoRA model.

    The tower fields (`lora_rank`, `lora_alpha`, `lora_dropout`, `use_rslora`, `lora_target_projections`,
    `lora_layers`, `hypergraph_top_k`, `hypergraph_hidden_size`) may also be given here: they then apply to both
    towers (an explicit value in a tower's sub-config wins). `hypergraph_towers` (`"both"`, `"vision"`, `"text"` or
    `"none"`) sets each tower's `use_hypergraph`, and `text_context_length`, `text_projection_hidden_size` and
    `text_attention_output_dropout` set the text tower's fields; configs written by ace-lora-hf 0.1 use these keys.

    Args:
        vision_config (`dict` or [`AceLoraVisionConfig`], *optional*):
            The vision tower. Missing entries take BiomedCLIP's ViT-B/16 values.
        text_config (`dict` or [`AceLoraTextConfig`], *optional*):
            The text tower. Missing entries take PubMedBERT's values.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension of the shared image-text embedding space (both towers project to it).
        logit_scale_init_value (`float`, *optional*, defaults to 1/0.07):
            Initial value of the learnable logit scale. The model's `logit_scale` holds the scale itself
            (BiomedCLIP's `exp(logit_scale)`; the released checkpoint learned 78.3486), not its log as in CLIP: do
            not call `.exp()` on it.
        head_feature_layers (`list[int]`, *optional*):
            ViT layers (1-based) whose patch tokens feed the segmentation decoder of `AceLoraForSegmentation`;
            by default the ends of the four quarters of the tower (3, 6, 9 and 12 for ViT-B).
        head_hidden_size (`int`, *optional*, defaults to 256):
            Channels of the downstream segmentation and detection heads.
        ace_lora_format_version (`int`, *optional*, defaults to 1):
            The on-disk format of the folder (tensor names and meanings, see [`AceLoraModel`]). Absent in folders of
            ace-lora-hf 0.1.0, which are format 1; a folder of a newer format than this code reads is refused.

    Example:

    ```python
    >>> from ace_lora_hf import AceLoraConfig, AceLoraModel

    >>> config = AceLoraConfig()
    >>> model = AceLoraModel(config)
    ```"""

    model_type = "ace_lora"
    sub_configs_defaults = {"vision_config": AceLoraVisionConfig, "text_config": AceLoraTextConfig}

    vision_config: dict | AceLoraVisionConfig | None = None
    text_config: dict | AceLoraTextConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float | int = 1 / 0.07
    head_feature_layers: list[int] | None = None
    head_hidden_size: int = 256
    ace_lora_format_version: int = FORMAT_VERSION

    # Set when this process serves the zero-shot pipeline from the installed package (`import ace_lora_hf` registers
    # it): the config then drops the `custom_pipelines` record, which is for processes without the package and would
    # make `pipeline()` demand trust_remote_code. Models write it again when saved.
    pipeline_served_in_process: ClassVar[bool] = False

    def __post_init__(self, **kwargs):
        self._check_format_version()
        if self.pipeline_served_in_process:
            kwargs.pop("custom_pipelines", None)
        # transformers looks a dtype name up on torch; a name that is none there is a mistake in config.json.
        if isinstance(self.dtype, str) and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ConfigError(f"dtype={self.dtype!r}: not a torch dtype; use float32, bfloat16 or float16.")
        self.vision_config, self.text_config = self._tower_dicts(kwargs)
        super().__post_init__(**kwargs)
        if self.head_feature_layers is None:
            layers = self.vision_config.num_hidden_layers
            self.head_feature_layers = sorted({max(1, layers * quarter // 4) for quarter in range(1, 5)})

    def _check_format_version(self) -> None:
        version = self.ace_lora_format_version
        if version < 1:
            raise ConfigError(f"config.json: ace_lora_format_version={version!r} is not a format version (1, 2, ...); "
                              "use the config.json saved with the weights.")
        if version > FORMAT_VERSION:
            raise FormatVersionError(f"config.json: ace_lora_format_version={version} is newer than this ace-lora-hf "
                                  f"reads (format {FORMAT_VERSION}); upgrade ace-lora-hf to load this folder.")

    def _tower_dicts(self, kwargs: dict) -> tuple:
        """The tower sub-configs with the top-level shorthands (consumed from `kwargs`) applied beneath them."""
        defaults = {"vision_config": {"projection_dim": self.projection_dim},
                    "text_config": {"projection_dim": self.projection_dim}}
        for key, towers in TOWER_SHORTHANDS.items():
            if key in kwargs:
                value = kwargs.pop(key)
                for tower in towers:
                    defaults[tower][key] = value
        for key, text_field in TEXT_SHORTHANDS.items():
            if key in kwargs:
                defaults["text_config"][text_field] = kwargs.pop(key)
        if "hypergraph_towers" in kwargs:
            towers = kwargs.pop("hypergraph_towers")
            if towers not in HYPERGRAPH_TOWER_CHOICES:
                raise ConfigError(f"hypergraph_towers={towers!r}: choose one of {', '.join(HYPERGRAPH_TOWER_CHOICES)}.")
            vision, text = HYPERGRAPH_TOWER_CHOICES[towers]
            defaults["vision_config"]["use_hypergraph"], defaults["text_config"]["use_hypergraph"] = vision, text
        names = ("vision_config", "text_config")
        return tuple(self._with_defaults(getattr(self, name), defaults[name]) for name in names)

    @staticmethod
    def _with_defaults(tower, defaults: dict):
        if tower is None:
            return defaults
        if isinstance(tower, dict):
            # 0.1 configs name the library's model type ("vit", "bert") inside the tower dicts.
            return {**defaults, **{key: value for key, value in tower.items() if key != "model_type"}}
        return tower

    def validate_towers(self):
        towers = {"vision_config": self.vision_config, "text_config": self.text_config}
        for name, tower in towers.items():
            if tower.projection_dim != self.projection_dim:
                raise ConfigError(f"{name}.projection_dim={tower.projection_dim} differs from projection_dim="
                                  f"{self.projection_dim}: both towers project to the shared embedding space.")
        for name in SHARED_LORA_FIELDS:
            vision, text = getattr(self.vision_config, name), getattr(self.text_config, name)
            if vision != text:
                raise ConfigError(f"{name} is {vision} in vision_config but {text} in text_config; the model has one "
                                  "LoRA configuration, so give both towers the same value.")

    def validate_heads(self):
        layers = self.vision_config.num_hidden_layers
        if self.head_feature_layers is not None and not all(1 <= layer <= layers
                                                            for layer in self.head_feature_layers):
            raise ConfigError(f"head_feature_layers={self.head_feature_layers}: the vision tower has layers "
                              f"1..{layers}.")
        if self.head_hidden_size < 8 or self.head_hidden_size % 8:
            raise ConfigError(f"head_hidden_size={self.head_hidden_size}: must be a positive multiple of 8 "
                              "(the heads normalise in 8 groups).")


__all__ = ["FORMAT_VERSION", "AceLoraConfig", "AceLoraTextConfig", "AceLoraTowerFields", "AceLoraVisionConfig"]
