"""ACE-LoRA model configuration."""

from transformers import BertConfig, PreTrainedConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec


# BiomedCLIP's vision tower is timm's `vit_base_patch16_224`; timm uses LayerNorm eps 1e-6.
BIOMEDCLIP_VISION_DEFAULTS = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

# PubMedBERT (BERT-base uncased). The released training code ran BERT's attention without dropout on
# the attention probabilities; the attention output dropout is set by `text_attention_output_dropout`.
PUBMEDBERT_TEXT_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

HYPERGRAPH_TOWER_CHOICES = ("both", "vision", "text", "none")
LORA_PROJECTION_CHOICES = ("q", "k", "v")


class AceLoraConfig(PreTrainedConfig):
    r"""
    Configuration of an [`AceLoraModel`]: BiomedCLIP's two towers with LoRA adapters, the ACE hypergraph
    on each tower and a learnable logit scale. The defaults describe the released ACE-LoRA model.

    Args:
        vision_config (`dict` or [`ViTConfig`], *optional*):
            The vision tower. Missing entries of a dict take BiomedCLIP's ViT-B/16 values.
        text_config (`dict` or [`BertConfig`], *optional*):
            The text tower. Missing entries of a dict take PubMedBERT's values.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension of the shared image-text embedding space.
        text_projection_hidden_size (`int`, *optional*, defaults to 640):
            Hidden size of the text projection MLP (`Linear -> GELU -> Linear`, no biases).
        text_context_length (`int`, *optional*, defaults to 256):
            Every text is padded (or must fit) to this many tokens; the text hypergraph spans all of them.
        text_attention_output_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after BERT's attention output projection (BERT's stock value would be `hidden_dropout_prob`).
        lora_rank (`int`, *optional*, defaults to 4):
            Rank `r` of every LoRA adapter.
        lora_alpha (`float`, *optional*, defaults to 1.0):
            LoRA alpha. With `use_rslora` the update is scaled by `alpha / sqrt(r)` (0.5 by default).
        lora_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the input of the LoRA branch.
        use_rslora (`bool`, *optional*, defaults to `True`):
            Rank-stabilised scaling `alpha / sqrt(r)` instead of `alpha / r`.
        lora_target_projections (`list[str]`, *optional*, defaults to `["q", "k", "v"]`):
            Which attention projections of both towers carry an adapter.
        lora_layers (`list[int]`, *optional*):
            Indices of the layers that carry adapters, in both towers. `None` adapts every layer.
        hypergraph_top_k (`int`, *optional*, defaults to 5):
            Number of neighbours kept in each row of the hypergraph.
        hypergraph_hidden_size (`int`, *optional*, defaults to 128):
            Bottleneck width of the hyperedge and node adapters.
        hypergraph_towers (`str`, *optional*, defaults to `"both"`):
            Towers whose embedding goes through the hypergraph: `"both"`, `"vision"`, `"text"` or `"none"`.
        head_feature_layers (`list[int]`, *optional*):
            ViT layers (1-based) whose patch tokens feed the segmentation decoder of `AceLoraForSegmentation`;
            by default the ends of the four quarters of the tower (3, 6, 9 and 12 for ViT-B).
        head_hidden_size (`int`, *optional*, defaults to 256):
            Channels of the downstream segmentation and detection heads.
        logit_scale_init_value (`float`, *optional*, defaults to 1/0.07):
            Initial value of the learnable logit scale, stored on the exponentiated scale (BiomedCLIP's
            `exp(logit_scale)`; the released checkpoint learned 78.3486).

    Example:

    ```python
    >>> from ace_lora_hf import AceLoraConfig, AceLoraModel

    >>> config = AceLoraConfig()
    >>> model = AceLoraModel(config)
    ```"""

    model_type = "ace_lora"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(ViTConfig, init_kwargs=BIOMEDCLIP_VISION_DEFAULTS),
        "text_config": SubConfigSpec(BertConfig, init_kwargs=PUBMEDBERT_TEXT_DEFAULTS),
    }

    vision_config: dict | ViTConfig | None = None
    text_config: dict | BertConfig | None = None
    projection_dim: int = 512
    text_projection_hidden_size: int = 640
    text_context_length: int = 256
    text_attention_output_dropout: float = 0.0
    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_dropout: float = 0.1
    use_rslora: bool = True
    lora_target_projections: list[str] | tuple[str, ...] = LORA_PROJECTION_CHOICES
    lora_layers: list[int] | None = None
    hypergraph_top_k: int = 5
    hypergraph_hidden_size: int = 128
    hypergraph_towers: str = "both"
    logit_scale_init_value: float = 1 / 0.07
    head_feature_layers: list[int] | None = None
    head_hidden_size: int = 256

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            self.vision_config = {**BIOMEDCLIP_VISION_DEFAULTS, **self.vision_config}
        if isinstance(self.text_config, dict):
            self.text_config = {**PUBMEDBERT_TEXT_DEFAULTS, **self.text_config}
        self.lora_target_projections = list(self.lora_target_projections)
        super().__post_init__(**kwargs)
        self._check_choices()

    def _check_choices(self) -> None:
        if self.hypergraph_towers not in HYPERGRAPH_TOWER_CHOICES:
            raise ValueError(
                f"hypergraph_towers={self.hypergraph_towers!r}: choose one of {', '.join(HYPERGRAPH_TOWER_CHOICES)}."
            )
        unknown = set(self.lora_target_projections) - set(LORA_PROJECTION_CHOICES)
        if unknown:
            raise ValueError(
                f"lora_target_projections has {sorted(unknown)}: only {list(LORA_PROJECTION_CHOICES)} can be adapted."
            )
        layers = self.vision_config.num_hidden_layers
        if self.head_feature_layers is None:
            self.head_feature_layers = sorted({max(1, layers * quarter // 4) for quarter in range(1, 5)})
        if not all(1 <= layer <= layers for layer in self.head_feature_layers):
            raise ValueError(f"head_feature_layers={self.head_feature_layers}: the vision tower has layers 1..{layers}.")
        if self.text_context_length > self.text_config.max_position_embeddings:
            raise ValueError(
                f"text_context_length={self.text_context_length} exceeds the text tower's "
                f"max_position_embeddings={self.text_config.max_position_embeddings}."
            )

    @property
    def vision_uses_hypergraph(self) -> bool:
        return self.hypergraph_towers in ("both", "vision")

    @property
    def text_uses_hypergraph(self) -> bool:
        return self.hypergraph_towers in ("both", "text")


__all__ = ["AceLoraConfig"]
