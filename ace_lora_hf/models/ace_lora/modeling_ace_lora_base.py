# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""What every ACE-LoRA tower and model shares: the float32 parts, LoRA's lifecycle, saving, and a tower's path from
backbone outputs to projected tokens, CLS attention row and hypergraph embedding."""

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from .configuration_ace_lora import AceLoraTowerFields
from .errors import CheckpointError, InvalidArgumentError
from .hypergraph_ace_lora import AceHypergraph, AceHypergraphAdapterLinear


HALF_DTYPES = (torch.float16, torch.bfloat16)


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

def cls_attention_scores(cls_query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot products of the CLS query `[B, 1, hidden]` with every key `[B, N, hidden]`, per head:
    `[B, heads, N]`."""
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
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        except SafetensorError as error:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise CheckpointError(f"{where}: its weights file is unreadable ({error}); it may be truncated: download "
                                  "or save it again.") from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Weights missing from the checkpoint are created in the requested dtype; loading replaces every parameter
        # with a new, trainable one.
        model._restore_float32_parts()
        model.mark_trainable_parameters()
        return loaded

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
        """`nn.Module._apply` (behind `.to()`, `.half()`, `.bfloat16()`, `.cuda()`) that keeps the float32 parts.

        This is the model's precision contract, not a speed trick: the CLS attention row, the top-k choices and the
        hypergraph decide which tokens an embedding is built from, and in float16/bfloat16 near-ties among the scores
        flip, changing embeddings far beyond half precision's rounding. So a cast to a half dtype moves these parts
        to the target device but leaves them float32, as `from_pretrained(dtype=...)` does through
        `_keep_in_fp32_modules_strict`; every other cast (a device, float32, float64) applies to all tensors.
        """
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

    def _token_features(
        self, inputs: dict[str, torch.Tensor], output_hidden_states: bool = False, output_attentions: bool = False
    ) -> AceLoraTokenFeatures:
        """Projected tokens and CLS row of a batch of backbone `inputs`."""
        if self.projection is None:
            raise InvalidArgumentError(f"This {type(self).__name__} was built without its embedding head "
                                       "(add_embedding_head=False): it has no projection or hypergraph.")
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


__all__ = ["AceLoraEncoderMixin", "AceLoraModelMixin", "AceLoraTokenFeatures", "cls_attention_scores", "float32_only"]
