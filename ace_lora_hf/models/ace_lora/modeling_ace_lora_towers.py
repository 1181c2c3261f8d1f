# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""The two towers of ACE-LoRA: BiomedCLIP's ViT-B/16 and PubMedBERT, each with LoRA, a projection of every token and
the ACE hypergraph."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, ViTModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_ace_lora import AceLoraTextConfig, AceLoraVisionConfig
from .errors import InvalidArgumentError
from .modeling_ace_lora_base import AceLoraEncoderMixin, AceLoraTokenFeatures, cls_attention_scores, float32_only


class AceLoraTextProjection(nn.Module):
    """BiomedCLIP's text projection: `Linear -> GELU -> Linear`, no biases, applied to every token."""

    def __init__(self, hidden_size: int, intermediate_size: int, projection_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate_size, projection_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class AceLoraVisionModel(AceLoraEncoderMixin, ViTModel):
    r"""
    The vision tower of ACE-LoRA: BiomedCLIP's ViT-B/16 with LoRA on its attention, the projection of every token
    and the ACE hypergraph, whose CLS node is the image embedding.

    Args:
        config ([`AceLoraVisionConfig`]): the tower's configuration.
        add_embedding_head (`bool`, *optional*, defaults to `True`):
            Whether to build the projection and the hypergraph (task heads use the backbone and LoRA only).
    """

    config_class = AceLoraVisionConfig
    config: AceLoraVisionConfig
    base_model_prefix = "vision_model"
    _keep_in_fp32_modules_strict = ["embeddings", "layernorm_before", "layernorm_after", "layernorm", "projection",
                                    "hypergraph", "lora_A", "lora_B"]
    _lora_layer_path = ("layers", "attention")
    _lora_module_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}

    def __init__(self, config: AceLoraVisionConfig, add_embedding_head: bool = True):
        super().__init__(config, add_pooling_layer=False)
        projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False) if add_embedding_head else None
        self._add_ace_modules(projection)

    def _matmul_dtype(self) -> torch.dtype:
        return self.layers[0].mlp.fc1.weight.dtype

    def _run_backbone(self, inputs: dict[str, torch.Tensor], **output_flags) -> BaseModelOutputWithPooling:
        return super().forward(**inputs, **output_flags)

    def _cls_query_and_keys(self, last_layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[-1]
        normed = layer.layernorm_before(last_layer_input)  # ViT blocks are pre-norm
        return layer.attention.q_proj(normed[:, :1]), layer.attention.k_proj(normed)

    def _cls_attention(self, cls_query: torch.Tensor, keys: torch.Tensor, attention_mask: None) -> torch.Tensor:
        """Pre-softmax scores of the last layer, averaged over heads (as the released model was trained: the vision row
        is not softmax-normalised, unlike the text row)."""
        num_heads = self.layers[-1].attention.num_attention_heads
        return cls_attention_scores(cls_query, keys, num_heads).mean(dim=1)[:, 1:]

    def backbone_outputs(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | list[int] = (-2,)
    ) -> BaseModelOutputWithPooling:
        """The ViT alone (LoRA included, no projection or hypergraph): its last hidden state and the hidden states
        `output_hidden_states` selects (indices into embeddings + every layer; by default the last layer's input,
        which `project_backbone_outputs` needs). Task heads read their feature maps here."""
        if not isinstance(output_hidden_states, bool):
            output_hidden_states = list(output_hidden_states)
        with self._half_precision_autocast(pixel_values.device):
            return self._run_backbone({"pixel_values": pixel_values}, output_hidden_states=output_hidden_states)

    def get_token_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> AceLoraTokenFeatures:
        r"""
        The inputs of the vision hypergraph: every token projected and L2-normalised, and the CLS attention row
        (the last layer's pre-softmax scores of CLS to each patch, averaged over heads). For explanations and analysis.
        """
        return self._token_features({"pixel_values": pixel_values}, output_hidden_states, output_attentions)

    def forward(
        self,
        pixel_values: torch.Tensor,
        use_hgnn: bool = True,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Normalised pixels (see `AceLoraImageProcessor`).
            use_hgnn (`bool`, *optional*, defaults to `True`):
                `True`: the ACE embedding (CLS node of the hypergraph). `False`: the projected CLS token (BiomedCLIP
                with LoRA).
        Returns:
            [`BaseModelOutputWithPooling`] (a tuple with `return_dict=False`): `pooler_output` is the L2-normalised
            embedding `(batch_size, projection_dim)`, `last_hidden_state` the backbone's last hidden state,
            `hidden_states` / `attentions` the backbone's when asked for.
        """
        return self._encode({"pixel_values": pixel_values}, use_hgnn, output_hidden_states, output_attentions,
                            return_dict)


class AceLoraTextModel(AceLoraEncoderMixin, BertModel):
    r"""
    The text tower of ACE-LoRA: PubMedBERT with LoRA on its self-attention, BiomedCLIP's projection MLP on every token
    and the ACE hypergraph over the whole (padded) context, whose CLS node is the text embedding.

    Args:
        config ([`AceLoraTextConfig`]): the tower's configuration.
        add_embedding_head (`bool`, *optional*, defaults to `True`):
            Whether to build the projection and the hypergraph.
    """

    config_class = AceLoraTextConfig
    config: AceLoraTextConfig
    base_model_prefix = "text_model"
    _keep_in_fp32_modules_strict = ["embeddings", "LayerNorm", "projection", "hypergraph", "lora_A", "lora_B"]
    _lora_layer_path = ("encoder.layer", "attention.self")
    _lora_module_names = {"q": "query", "k": "key", "v": "value"}

    def __init__(self, config: AceLoraTextConfig, add_embedding_head: bool = True):
        super().__init__(config, add_pooling_layer=False)
        for layer in self.encoder.layer:
            layer.attention.output.dropout = nn.Dropout(config.attention_output_dropout)
        projection = None
        if add_embedding_head:
            projection = AceLoraTextProjection(config.hidden_size, config.projection_hidden_size, config.projection_dim)
        self._add_ace_modules(projection)

    def _matmul_dtype(self) -> torch.dtype:
        return self.encoder.layer[0].intermediate.dense.weight.dtype

    def _run_backbone(self, inputs: dict[str, torch.Tensor], **output_flags) -> BaseModelOutputWithPooling:
        return super().forward(**inputs, **output_flags)

    def _cls_query_and_keys(self, last_layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.encoder.layer[-1].attention.self  # BERT layers are post-norm: attention sees the input
        return attention.query(last_layer_input[:, :1]), attention.key(last_layer_input)

    def _cls_attention(self, cls_query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last layer (padding keys masked), averaged over heads, as released."""
        num_heads = self.encoder.layer[-1].attention.self.num_attention_heads
        scores = cls_attention_scores(cls_query, keys, num_heads)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)[:, 1:]

    def _padded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Ids, mask (and segment ids) padded to the context length, which the text hypergraph's size depends on."""
        context_length = self.config.context_length
        length = input_ids.shape[-1]
        if length > context_length:
            raise InvalidArgumentError(
                f"input_ids has {length} tokens but the model's text context is {context_length}; "
                f"tokenize with truncation=True, max_length={context_length} (AceLoraProcessor does)."
            )
        pad_token_id = self.config.pad_token_id
        if attention_mask is None:
            attention_mask = input_ids != pad_token_id
        padding = (0, context_length - length)
        padded = {"input_ids": F.pad(input_ids, padding, value=pad_token_id),
                  "attention_mask": F.pad(attention_mask.long(), padding, value=0)}
        if token_type_ids is not None:
            padded["token_type_ids"] = F.pad(token_type_ids, padding, value=0)
        return padded

    def get_token_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> AceLoraTokenFeatures:
        r"""
        The inputs of the text hypergraph: every token of the padded context projected and L2-normalised, and the CLS
        attention row (the last layer's probabilities of CLS to each token, padding masked, averaged over heads).
        """
        return self._token_features(self._padded(input_ids, attention_mask), output_hidden_states, output_attentions)

    def forward(
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
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids, one text per row; padded here to `config.context_length`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Defaults to `input_ids != pad_token_id`.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                BERT's segment ids as the tokenizer returns them (all 0 for one text; the default).
            use_hgnn (`bool`, *optional*, defaults to `True`):
                `True`: the ACE embedding (CLS node of the hypergraph). `False`: the projected CLS token.
        Returns:
            [`BaseModelOutputWithPooling`] (a tuple with `return_dict=False`): `pooler_output` is the L2-normalised
            embedding `(batch_size, projection_dim)`, `last_hidden_state` the backbone's last hidden state,
            `hidden_states` / `attentions` the backbone's when asked for.
        """
        return self._encode(self._padded(input_ids, attention_mask, token_type_ids), use_hgnn, output_hidden_states,
                            output_attentions, return_dict)

    def get_class_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool | None = None
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Zero-shot class embeddings from several prompt templates per class, as the released zero-shot evaluation
        computed them: the templates' projected tokens and CLS attention rows are averaged per class before the
        hypergraph runs once per class (without a hypergraph: the normalised mean of the template embeddings).

        Args:
            input_ids (`torch.LongTensor` of shape `(num_classes, num_templates, sequence_length)`):
                Token ids of every template filled with every class name.
            attention_mask (`torch.Tensor` of the same shape, *optional*):
                Defaults to `input_ids != pad_token_id`.

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` the L2-normalised class embeddings
            `(num_classes, projection_dim)`, `last_hidden_state` the backbone's, `(num_classes, num_templates,
            context_length, hidden_size)`.
        """
        num_classes, num_templates = input_ids.shape[:2]
        flat_mask = None if attention_mask is None else attention_mask.flatten(0, 1)
        features = self._token_features(self._padded(input_ids.flatten(0, 1), flat_mask))
        per_class = (num_classes, num_templates)
        tokens = features.tokens.unflatten(0, per_class).mean(dim=1)
        if self.hypergraph is None:
            embeddings = F.normalize(tokens[:, 0], dim=-1)
        else:
            with float32_only(tokens.device):
                embeddings = self.hypergraph(tokens, features.cls_attention.unflatten(0, per_class).mean(dim=1))
        output = BaseModelOutputWithPooling(
            last_hidden_state=features.last_hidden_state.unflatten(0, per_class), pooler_output=embeddings
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


# Saved files keep the ViT's legacy key layout (as transformers' own ViT checkpoints do).
register_checkpoint_conversion_mapping("AceLoraVisionModel", get_checkpoint_conversion_mapping("ViTModel"),
                                       overwrite=True)


__all__ = ["AceLoraTextModel", "AceLoraTextProjection", "AceLoraVisionModel"]
