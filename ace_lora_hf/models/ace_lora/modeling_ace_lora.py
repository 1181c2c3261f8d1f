# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""PyTorch ACE-LoRA: BiomedCLIP's towers with LoRA adapters and an attention-guided hypergraph on each tower."""

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BertModel, PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from .configuration_ace_lora import AceLoraConfig, AceLoraTextConfig, AceLoraTowerFields, AceLoraVisionConfig
from .errors import CheckpointError, InvalidArgumentError
from .loss_ace_lora import label_guided_infonce


logger = logging.get_logger(__name__)

# Tokens per tower call in CPU inference (see `AceLoraEncoderMixin._inference_chunks`).
CPU_CHUNK_TOKENS = 1024
HALF_DTYPES = (torch.float16, torch.bfloat16)


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


@dataclass
class AceLoraTokenFeatures(ModelOutput):
    r"""
    What a tower's hypergraph is built from.

    tokens (`torch.FloatTensor` of shape `(batch_size, num_tokens, projection_dim)`):
        Every token of the last hidden state, projected into the shared space and L2-normalised (CLS first).
    cls_attention (`torch.FloatTensor` of shape `(batch_size, num_tokens - 1)`):
        The last layer's attention of CLS to every other token, averaged over heads: pre-softmax scores for images,
        probabilities (padding masked) for texts. Row 0 of the hypergraph.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
        The backbone's last hidden state.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The backbone's hidden states (embeddings, then every layer).
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        The backbone's attention probabilities of every layer.
    """

    tokens: torch.FloatTensor | None = None
    cls_attention: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class AceLoraDropout(nn.Dropout):
    """`nn.Dropout` that draws its CPU mask from `torch.rand`: the same distribution, drawn 2.5x faster off Intel.

    PyTorch takes MKL's vectorised Bernoulli only on Intel CPUs; elsewhere (AMD, ARM) it samples one element at a
    time: 12.7 ms for a `[8, 197, 768]` input on the 2-core AMD development CPU against 5 ms here, and a training
    step runs 85 of them (LoRA's input dropout on 72 projections, PubMedBERT's hidden dropout). Other devices keep
    PyTorch's fused dropout.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0, 1) or hidden_states.device.type != "cpu":
            return super().forward(hidden_states)
        dropped = torch.rand(hidden_states.shape, device=hidden_states.device) < self.p
        return hidden_states.masked_fill(dropped, 0).mul_(1 / (1 - self.p))


def use_fast_dropout(model: nn.Module) -> None:
    """Replace every `nn.Dropout` inside `model` with an [`AceLoraDropout`] of the same rate."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, AceLoraDropout(child.p, child.inplace))


# ---------------------------------------------------------------------------------------------------- hypergraph


class AceHypergraphAdapterLinear(nn.Linear):
    """A `Linear` of a hypergraph adapter: Kaiming-normal weight and PyTorch's default bias, as released."""


class AceHypergraphAdapter(nn.Module):
    """Bottleneck MLP `up(LeakyReLU_0.2(down(x)))` that maps hyperedge or node features (no residual)."""

    def __init__(self, dim: int, hidden_size: int):
        super().__init__()
        self.down = AceHypergraphAdapterLinear(dim, hidden_size)
        self.act = nn.LeakyReLU(0.2)
        self.up = AceHypergraphAdapterLinear(hidden_size, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden_states)))


class AceHypergraph(nn.Module):
    """ACE-HGNN: a hypergraph over the tokens of one tower whose CLS row is the tower's attention to its tokens.

    Row 0 of the score matrix is the CLS attention row, the other rows are token cosine similarities; each row
    keeps its `top_k` entries (self and CLS excluded) and is softmax-normalised. The diagonal is then set to 1
    and column 0 mirrors row 0. Hyperedges `E = edge(A X)` are aggregated back to nodes `Y = node(A^T E)`.

    Only the CLS node `Y[0]` is the tower's embedding, and it depends on row 0 and on the rows of CLS's `top_k`
    neighbours alone, so `forward` builds just those rows instead of the `N x N` graph.
    """

    def __init__(self, dim: int, hidden_size: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.edge_adapter = AceHypergraphAdapter(dim, hidden_size)
        self.node_adapter = AceHypergraphAdapter(dim, hidden_size)

    def _check_size(self, num_tokens: int) -> None:
        if num_tokens - 2 < self.top_k:
            raise InvalidArgumentError(
                f"The hypergraph keeps top_k={self.top_k} neighbours but got only {num_tokens} tokens."
            )

    def cls_neighbours(self, cls_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (1-based, CLS is 0) of CLS's `top_k` neighbours and their softmax weights, `[B, top_k]`."""
        scores, indices = cls_attention.topk(self.top_k, dim=-1)
        return indices + 1, scores.softmax(dim=-1)

    def forward(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLS node of the hypergraph.

        Args:
            tokens: `[B, N, D]` token features, CLS first.
            cls_attention: `[B, N - 1]` attention of CLS to tokens `1..N-1`.

        Returns:
            `[B, D]` embeddings.
        """
        self._check_size(tokens.shape[1])
        cls_token, patch_tokens = tokens[:, 0], tokens[:, 1:]
        neighbour_index, neighbour_weight = self.cls_neighbours(cls_attention)
        neighbour_index = neighbour_index - 1  # into patch_tokens
        neighbours = _gather_tokens(patch_tokens, neighbour_index)  # [B, k, D]

        # Rows of the neighbours: themselves, CLS (mirrored column 0) and their own top-k patches.
        unit_patches = F.normalize(patch_tokens, dim=-1)
        similarity = _gather_tokens(unit_patches, neighbour_index) @ unit_patches.transpose(1, 2)  # [B, k, N-1]
        similarity = similarity.scatter(-1, neighbour_index.unsqueeze(-1), float("-inf"))
        second_scores, second_index = similarity.topk(self.top_k, dim=-1)  # [B, k, k]
        second_weight = second_scores.softmax(dim=-1)
        second_neighbours = _gather_tokens(patch_tokens, second_index.flatten(1)).unflatten(1, second_index.shape[1:])

        cls_edge = cls_token + torch.einsum("bk,bkd->bd", neighbour_weight.to(tokens.dtype), neighbours)
        neighbour_edges = (
            neighbours
            + neighbour_weight.unsqueeze(-1).to(tokens.dtype) * cls_token.unsqueeze(1)
            + torch.einsum("bkj,bkjd->bkd", second_weight.to(tokens.dtype), second_neighbours)
        )
        cls_edge, neighbour_edges = self.edge_adapter(cls_edge), self.edge_adapter(neighbour_edges)
        cls_node = self.node_adapter(
            cls_edge + torch.einsum("bk,bkd->bd", neighbour_weight.to(cls_edge.dtype), neighbour_edges)
        )
        return F.normalize(cls_node, dim=-1)

    def incidence_matrix(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
        """The full `[B, N, N]` hypergraph `A` (for inspection and explanations; `forward` never builds it)."""
        self._check_size(tokens.shape[1])
        unit = F.normalize(tokens.float(), dim=-1)
        scores = unit @ unit.transpose(1, 2)
        scores[:, 0, 1:] = cls_attention
        scores[:, 1:, 0] = float("-inf")
        scores.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        top_scores, top_index = scores.topk(self.top_k, dim=-1)
        incidence = torch.zeros_like(scores).scatter_(-1, top_index, top_scores.softmax(dim=-1))
        incidence.diagonal(dim1=1, dim2=2).fill_(1.0)
        incidence[:, 1:, 0] = incidence[:, 0, 1:]
        return incidence


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tokens[b, index[b, i]]` for `tokens` `[B, N, D]` and `index` `[B, M]`."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class AceLoraTextProjection(nn.Module):
    """BiomedCLIP's text projection: `Linear -> GELU -> Linear`, no biases, applied to every token."""

    def __init__(self, hidden_size: int, intermediate_size: int, projection_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate_size, projection_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


def cls_attention_scores(cls_query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot products of the CLS query `[B, 1, hidden]` with every key `[B, N, hidden]`, per head: `[B, heads, N]`."""
    batch_size, num_tokens, hidden_size = key.shape
    head_dim = hidden_size // num_heads
    cls_query = cls_query.view(batch_size, num_heads, 1, head_dim)
    keys = key.view(batch_size, num_tokens, num_heads, head_dim).transpose(1, 2)
    return (cls_query @ keys.transpose(-1, -2)).squeeze(2) * head_dim**-0.5


def first_device(inputs: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(inputs.values())).device


def float32_only(device: torch.device):
    """Switch a caller's autocast off: the CLS row, the top-k choices and the hypergraph are precision-sensitive."""
    return torch.autocast(device.type, enabled=False)


def _with_last_layer_input(output_hidden_states: bool | list[int]) -> bool | list[int]:
    """The hidden states to record: the ones asked for (all, none or a list of indices) and the last layer's input."""
    return True if output_hidden_states is True else [*(output_hidden_states or ()), -2]


def _requested_hidden_states(
    hidden_states: tuple[torch.Tensor | None, ...], output_hidden_states: bool | list[int]
) -> tuple[torch.Tensor | None, ...] | None:
    """The recorded hidden states the caller asked for (`None` in place of the others), or `None` for none."""
    if output_hidden_states is True or not output_hidden_states:
        return hidden_states if output_hidden_states else None
    kept = {index % len(hidden_states) for index in output_hidden_states}
    return tuple(state if index in kept else None for index, state in enumerate(hidden_states))


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


# ------------------------------------------------------------------------------------------------ shared behaviour


class AceLoraModelMixin:
    """What every ACE-LoRA model class shares: which parameters train, LoRA's lifecycle, the float32 parts, saving.

    The precision-sensitive parts (CLS attention row, top-k, hypergraph, projections, embeddings and normalisations,
    logit scale) stay in float32 when the model is loaded or cast to float16/bfloat16: `from_pretrained(dtype=...)`
    keeps them through `_keep_in_fp32_modules_strict`, and `.to(dtype)`, `.half()` and `.bfloat16()` leave them alone
    (see `_apply`). The towers then run their matrix products in the half dtype under autocast, so their residual
    stream stays float32.
    """

    # Auto classes besides the one `register_for_auto_class` records, written into `auto_map` on save.
    _extra_auto_classes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._refuse_non_finite_weights()
        # Weights missing from the checkpoint are created in the requested dtype; loading replaces every parameter
        # with a new, trainable one.
        model._restore_float32_parts()
        model.mark_trainable_parameters()
        return loaded

    def _refuse_non_finite_weights(self) -> None:
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{self.config.name_or_path}: weight {name} contains NaN or infinite values; the "
                                      "checkpoint is damaged or comes from a diverged training run.")

    # ----------------------------------------------------------------------------------------- float32 parts

    def _float32_tensor_ids(self) -> set[int]:
        """Tensors inside a module named in `_keep_in_fp32_modules_strict` (a whole component of the dotted name, as
        transformers matches it)."""
        names = "|".join(map(re.escape, sorted(self._keep_in_fp32_modules_strict)))
        pattern = re.compile(rf"(?:^|\.)(?:{names})(?:\.|$)")
        named = [*self.named_parameters(), *self.named_buffers()]
        return {id(tensor) for name, tensor in named if pattern.search(name)}

    def post_init(self) -> None:
        super().post_init()
        # Built under a half default dtype (`from_config(dtype=...)`, `torch.set_default_dtype`), the float32 parts
        # would start in that dtype: every construction path ends with them in float32.
        self._restore_float32_parts()

    def _apply(self, fn, recurse: bool = True):
        target = fn(torch.zeros((), dtype=torch.float32))
        if target.dtype not in HALF_DTYPES:
            return super()._apply(fn, recurse)
        keep = self._float32_tensor_ids()
        return super()._apply(lambda tensor: tensor.to(target.device) if id(tensor) in keep else fn(tensor), recurse)

    @torch.no_grad()
    def _restore_float32_parts(self) -> None:
        keep = self._float32_tensor_ids()
        for tensor in [*self.parameters(), *self.buffers()]:
            if id(tensor) in keep and tensor.dtype in HALF_DTYPES:
                tensor.data = tensor.data.float()

    # --------------------------------------------------------------------------------------------------- LoRA

    def lora_layers(self) -> list[LoraLayer]:
        return [module for module in self.modules() if isinstance(module, LoraLayer)]

    def merge_lora(self) -> None:
        """Fold every LoRA update into its base weight: same outputs, no adapter cost (for inference)."""
        for layer in self.lora_layers():
            layer.merge()

    def unmerge_lora(self) -> None:
        """Undo [`merge_lora`] (needed before training or saving)."""
        for layer in self.lora_layers():
            layer.unmerge()

    @property
    def lora_merged(self) -> bool:
        return any(layer.merged for layer in self.lora_layers())

    def mark_trainable_parameters(self) -> None:
        """Set `requires_grad` on what this model trains (after construction and after loading)."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad = self._is_trainable(name)

    def _is_trainable(self, parameter_name: str) -> bool:
        """LoRA, the hypergraph adapters and the logit scale train; every base weight is frozen."""
        return (
            ".lora_A." in parameter_name
            or ".lora_B." in parameter_name
            or parameter_name.startswith("hypergraph.")
            or ".hypergraph." in parameter_name
            or parameter_name == "logit_scale"
        )

    # ------------------------------------------------------------------------------------------------- saving

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self.lora_merged:
            raise InvalidArgumentError(
                "LoRA is merged into the base weights; saving now would apply it twice when loading. "
                "Call `unmerge_lora()` before `save_pretrained`."
            )
        if self._auto_class is not None and self._extra_auto_classes:
            # One class may serve several auto classes; `register_for_auto_class` records only one of them.
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                **{auto: f"{module}.{type(self).__name__}" for auto in self._extra_auto_classes},
            }
        # transformers' PEFT integration would save only the adapter; this model owns its adapters and saves whole.
        peft_visible, self._hf_peft_config_loaded = self._hf_peft_config_loaded, False
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._hf_peft_config_loaded = peft_visible


# ----------------------------------------------------------------------------------------------------- towers


class AceLoraEncoderMixin(AceLoraModelMixin):
    """One ACE-LoRA tower, mixed into the library backbone class it extends (`ViTModel`, `BertModel`): LoRA on the
    attention projections, the projection of every token, the last layer's CLS attention row and the hypergraph.

    A tower class provides the backbone call (`_run_backbone`), the last layer's CLS query and keys computed from
    that layer's input (`_cls_query_and_keys`), the CLS row (`_cls_attention`) and where LoRA goes
    (`_lora_layer_path`, `_lora_module_names`).
    """

    _lora_layer_path: tuple[str, str]  # (the layer list, the attention module inside a layer)
    _lora_module_names: dict[str, str]  # "q"/"k"/"v" -> the projection's module name

    def _add_ace_modules(self, projection: nn.Module | None) -> None:
        """Add projection, hypergraph and LoRA to the just-built backbone, then initialise what is new."""
        config: AceLoraTowerFields = self.config
        self.projection = projection
        use_hypergraph = projection is not None and config.use_hypergraph
        self.hypergraph = (
            AceHypergraph(config.projection_dim, config.hypergraph_hidden_size, config.hypergraph_top_k)
            if use_hypergraph else None
        )
        self._inject_lora()
        use_fast_dropout(self)
        self.post_init()
        self.mark_trainable_parameters()
        # Every call records the last layer's input; installing the recording hooks now (as transformers' backbones
        # do) rather than lazily keeps a compiled first call free of the lazy installation's lock.
        maybe_install_capturing_hooks(self)

    # ---------------------------------------------------------------------------------------------------- LoRA

    def lora_target_pattern(self, prefix: str = "") -> str:
        """Regular expression of the module names (under `prefix`) that carry LoRA, as PEFT's `target_modules`."""
        config: AceLoraTowerFields = self.config
        layers = config.lora_layers if config.lora_layers is not None else range(config.num_hidden_layers)
        layer_list, attention = self._lora_layer_path
        names = "|".join(self._lora_module_names[projection] for projection in config.lora_target_projections)
        return (rf"{re.escape(prefix)}{layer_list}\.({'|'.join(map(str, layers))})\.{attention}\.({names})")

    def lora_config(self, target_modules: str | None = None) -> LoraConfig:
        config: AceLoraTowerFields = self.config
        return LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            target_modules=target_modules or self.lora_target_pattern(),
            bias="none",
        )

    def _inject_lora(self) -> None:
        inject_adapter_in_model(self.lora_config(), self)  # leaves `self.peft_config`
        for layer in self.lora_layers():
            for name in layer.lora_A:
                layer.lora_A[name].ace_lora_role = "lora_A"
                layer.lora_B[name].ace_lora_role = "lora_B"
        # transformers' PEFT integration (active_adapters, disable_adapters, get_adapter_state_dict) sees the adapter.
        self._hf_peft_config_loaded = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        role = getattr(module, "ace_lora_role", None)
        if role == "lora_A":
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif role == "lora_B":
            init.zeros_(module.weight)
        elif isinstance(module, AceHypergraphAdapterLinear):
            init.kaiming_normal_(module.weight)
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)

    # -------------------------------------------------------------------------------------------------- tokens

    def _matmul_dtype(self) -> torch.dtype:
        """The dtype the backbone's `Linear` weights are stored in (and its matrix products run in)."""
        raise NotImplementedError

    def _half_precision_autocast(self, device: torch.device):
        # A disabled autocast block would also switch off a caller's autocast (mixed-precision training).
        dtype = self._matmul_dtype()
        return torch.autocast(device.type, dtype=dtype) if dtype in HALF_DTYPES else nullcontext()

    def _inference_chunks(self, batch_size: int, tokens_per_sample: int, device: torch.device) -> int:
        """How many backbone calls a batch takes: one, except for eager CPU inference, which runs best in chunks.

        On the CPU, the activations of a large batch exceed glibc's mmap threshold so that every allocation
        page-faults; equal chunks of at most about `CPU_CHUNK_TOKENS` tokens keep the GEMMs near peak. Outputs are
        unchanged. Compiled and exported graphs keep one call, so that their batch size stays free.
        """
        if torch.is_grad_enabled() or device.type != "cpu" or _is_tracing():
            return 1
        return math.ceil(batch_size * tokens_per_sample / max(CPU_CHUNK_TOKENS, tokens_per_sample))

    def _token_features(
        self, inputs: dict[str, torch.Tensor], output_hidden_states: bool = False, output_attentions: bool = False
    ) -> AceLoraTokenFeatures:
        """Projected tokens and CLS row of a batch of backbone `inputs` (in CPU chunks when nothing else is asked)."""
        if self.projection is None:
            raise InvalidArgumentError(f"This {type(self).__name__} was built without its embedding head "
                                       "(add_embedding_head=False): it has no projection or hypergraph.")
        first = next(iter(inputs.values()))
        chunks = 1
        if not (output_hidden_states or output_attentions):
            chunks = self._inference_chunks(first.shape[0], self.config.num_tokens, first.device)
        if chunks == 1:
            return self._token_features_chunk(inputs, output_hidden_states, output_attentions)
        parts = [
            self._token_features_chunk(dict(zip(inputs, chunk)), False, False)
            for chunk in zip(*(tensor.tensor_split(chunks) for tensor in inputs.values()))
        ]
        return AceLoraTokenFeatures(
            **{key: torch.cat([part[key] for part in parts]) for key in ("tokens", "cls_attention", "last_hidden_state")}
        )

    def _token_features_chunk(
        self, inputs: dict[str, torch.Tensor], output_hidden_states: bool, output_attentions: bool
    ) -> AceLoraTokenFeatures:
        # The CLS row comes from the last layer's input, so the backbone always records it besides what is asked for.
        with self._half_precision_autocast(first_device(inputs)):
            outputs = self._run_backbone(
                inputs, output_hidden_states=_with_last_layer_input(output_hidden_states),
                output_attentions=output_attentions,
            )
        features = self.project_backbone_outputs(outputs, inputs.get("attention_mask"))
        features.hidden_states = _requested_hidden_states(outputs.hidden_states, output_hidden_states)
        features.attentions = outputs.attentions if output_attentions else None
        return features

    def project_backbone_outputs(
        self, outputs: BaseModelOutputWithPooling, attention_mask: torch.Tensor | None = None
    ) -> AceLoraTokenFeatures:
        """The step after the backbone: the CLS attention row from the last layer's input (`outputs.hidden_states[-2]`)
        and every token projected and normalised, in float32."""
        device = outputs.last_hidden_state.device
        with self._half_precision_autocast(device):
            cls_query, keys = self._cls_query_and_keys(outputs.hidden_states[-2])
        with float32_only(device):
            cls_attention = self._cls_attention(cls_query.float(), keys.float(), attention_mask)
            tokens = F.normalize(self.projection(outputs.last_hidden_state.float()), dim=-1)
        return AceLoraTokenFeatures(
            tokens=tokens, cls_attention=cls_attention, last_hidden_state=outputs.last_hidden_state
        )

    def pool(self, features: AceLoraTokenFeatures, use_hgnn: bool = True) -> torch.Tensor:
        """The tower's L2-normalised embedding: the hypergraph's CLS node, or (`use_hgnn=False`) the projected CLS."""
        if use_hgnn and self.hypergraph is not None:
            with float32_only(features.tokens.device):
                return self.hypergraph(features.tokens.float(), features.cls_attention.float())
        return features.tokens[:, 0]

    def _encode(
        self,
        inputs: dict[str, torch.Tensor],
        use_hgnn: bool,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
        return_dict: bool | None,
    ) -> BaseModelOutputWithPooling | tuple:
        config = self.config
        features = self._token_features(
            inputs,
            output_hidden_states=config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            output_attentions=config.output_attentions if output_attentions is None else output_attentions,
        )
        output = BaseModelOutputWithPooling(
            last_hidden_state=features.last_hidden_state,
            pooler_output=self.pool(features, use_hgnn),
            hidden_states=features.hidden_states,
            attentions=features.attentions,
        )
        return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()





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
        """Pre-softmax scores of the last layer, averaged over heads (SPEC §4)."""
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
        """Attention probabilities of the last layer (padding keys masked), averaged over heads (SPEC §4)."""
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
        Zero-shot class embeddings from several prompt templates per class (SPEC §6): the templates' projected tokens
        and CLS attention rows are averaged per class before the hypergraph runs once per class (without a
        hypergraph: the normalised mean of the template embeddings).

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

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("aydnarda/ACE-LoRA", trust_remote_code=True)
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
            raise ImportError("AceLoraModel.from_biomedclip converts BiomedCLIP with the ace-lora-hf package: "
                              "pip install ace-lora-hf, then import ace_lora_hf.")
        folder = AceLoraModel.released_model_folder(biomedclip, adapters, revision=revision, tokenizer=tokenizer)
        return cls.from_pretrained(folder, **kwargs)

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

    Saved files keep 0.1's names (`visual_projection`, `vision_hypergraph`, the ViT's legacy layout, ...), which the
    renamings map to the modules at load and back at save, so folders of either release load with either release.
    """
    vit_layout = get_checkpoint_conversion_mapping("ViTModel")
    register_checkpoint_conversion_mapping("AceLoraVisionModel", vit_layout, overwrite=True)
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
