"""PyTorch ACE-LoRA: BiomedCLIP with LoRA adapters and an attention-guided hypergraph on each tower."""

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BertModel, PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_ace_lora import AceLoraConfig
from .loss_ace_lora import label_guided_infonce


logger = logging.get_logger(__name__)

# Tokens per tower call in CPU inference (see `AceLoraModel._inference_chunks`).
CPU_CHUNK_TOKENS = 1024
# Names of the attention projections that LoRA adapts, per tower (`AceLoraConfig.lora_target_projections`).
VISION_PROJECTION_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
TEXT_PROJECTION_NAMES = {"q": "query", "k": "key", "v": "value"}


@dataclass
class AceLoraOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True` or `labels` is given):
        Contrastive loss: label-guided InfoNCE when `labels` is given, plain symmetric InfoNCE otherwise.
    logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
        Scaled cosine similarities between the ACE image and text embeddings.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
        The transpose of `logits_per_image`.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised image embeddings (see [`AceLoraModel.get_image_features`]).
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised text embeddings (see [`AceLoraModel.get_text_features`]).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


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
            raise ValueError(f"The hypergraph keeps top_k={self.top_k} neighbours but got only {num_tokens} tokens.")

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
        similarity.scatter_(-1, neighbour_index.unsqueeze(-1), float("-inf"))
        second_scores, second_index = similarity.topk(self.top_k, dim=-1)  # [B, k, k]
        second_weight = second_scores.softmax(dim=-1)
        second_neighbours = _gather_tokens(patch_tokens, second_index.flatten(1)).unflatten(1, second_index.shape[1:])

        cls_edge = cls_token + torch.einsum("bk,bkd->bd", neighbour_weight, neighbours)
        neighbour_edges = (
            neighbours
            + neighbour_weight.unsqueeze(-1) * cls_token.unsqueeze(1)
            + torch.einsum("bkj,bkjd->bkd", second_weight, second_neighbours)
        )
        cls_edge, neighbour_edges = self.edge_adapter(cls_edge), self.edge_adapter(neighbour_edges)
        cls_node = self.node_adapter(cls_edge + torch.einsum("bk,bkd->bd", neighbour_weight, neighbour_edges))
        return F.normalize(cls_node, dim=-1)

    def incidence_matrix(self, tokens: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
        """The full `[B, N, N]` hypergraph `A` (for inspection and explanations; `forward` never builds it)."""
        self._check_size(tokens.shape[1])
        unit = F.normalize(tokens, dim=-1)
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


@contextmanager
def recording_outputs(**modules: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named module during the forward passes run inside the block."""
    outputs: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            outputs[name] = output

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _map_chunks(function, chunks: int, *tensors: torch.Tensor) -> tuple:
    """`function` over `chunks` near-equal parts of `tensors` (along dim 0), each output concatenated (None stays)."""
    if chunks <= 1:
        return function(*tensors)
    outputs = [function(*parts) for parts in zip(*(tensor.tensor_split(chunks) for tensor in tensors))]
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs))


def cls_attention_scores(query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot products of the CLS query with every key, per head: `[B, heads, N]` from `[B, N, hidden]` q, k."""
    batch_size, num_tokens, hidden_size = key.shape
    head_dim = hidden_size // num_heads
    cls_query = query[:, 0].view(batch_size, num_heads, 1, head_dim)
    keys = key.view(batch_size, num_tokens, num_heads, head_dim).transpose(1, 2)
    return (cls_query @ keys.transpose(-1, -2)).squeeze(2) * head_dim**-0.5


class AceLoraPreTrainedModel(PreTrainedModel):
    config_class = AceLoraConfig
    _extra_auto_classes: tuple[str, ...] = ()
    config: AceLoraConfig
    base_model_prefix = "ace_lora"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, AceHypergraphAdapterLinear):
            init.kaiming_normal_(module.weight)
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)
        if isinstance(module, AceLoraModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)

    def mark_trainable_parameters(self) -> None:
        """Set `requires_grad` on what this model trains (after construction and after loading)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces every parameter with a new, trainable one.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.mark_trainable_parameters()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        if any(isinstance(m, LoraLayer) and m.merged for m in self.modules()):
            raise ValueError(
                "LoRA is merged into the base weights; saving now would apply it twice when loading. "
                "Call `unmerge_lora()` before `save_pretrained`."
            )
        if any(getattr(m, "tower_dtype", None) is not None for m in self.modules()):
            raise ValueError("The towers were cast with `cast_towers` for inference; save the float32 model instead.")
        if self._auto_class is not None:
            # One class may serve several auto classes; `register_for_auto_class` records only one of them.
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                **{auto: f"{module}.{type(self).__name__}" for auto in self._extra_auto_classes},
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # The towers' own init treats LoRA's A/B as ordinary Linears (normal, std 0.02). Restore LoRA's init
        # (Kaiming-uniform A, zero B) on every adapter not loaded from a checkpoint, so a fresh adapter is a no-op.
        super().initialize_weights()
        with init.guard_torch_init_functions():
            for module in self.modules():
                if isinstance(module, LoraLayer):
                    for adapter_name in module.lora_A:
                        module.reset_lora_parameters(adapter_name, init_lora_weights=True)


class AceLoraModel(AceLoraPreTrainedModel):
    r"""
    ACE-LoRA: BiomedCLIP's ViT-B/16 and PubMedBERT towers with rank-stabilised LoRA on their attention
    projections, an attention-guided hypergraph (ACE-HGNN) on the tokens of each tower and a learnable logit
    scale. Only the adapters, the hypergraphs and the logit scale are trainable.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("aydnarda/ACE-LoRA", trust_remote_code=True)
    ```
    """

    _extra_auto_classes = ("AutoModelForZeroShotImageClassification",)

    def __init__(self, config: AceLoraConfig):
        super().__init__(config)
        self.vision_model = ViTModel(config.vision_config, add_pooling_layer=False)
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        for layer in self.text_model.encoder.layer:
            layer.attention.output.dropout = nn.Dropout(config.text_attention_output_dropout)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = AceLoraTextProjection(
            config.text_config.hidden_size, config.text_projection_hidden_size, config.projection_dim
        )
        hypergraph_args = (config.projection_dim, config.hypergraph_hidden_size, config.hypergraph_top_k)
        self.vision_hypergraph = AceHypergraph(*hypergraph_args) if config.vision_uses_hypergraph else None
        self.text_hypergraph = AceHypergraph(*hypergraph_args) if config.text_uses_hypergraph else None
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.tower_dtype: torch.dtype | None = None  # set by `cast_towers`
        self.post_init()
        self._inject_lora()

    def _lora_target_pattern(self) -> str:
        config = self.config
        vision_layers = config.lora_layers or range(config.vision_config.num_hidden_layers)
        text_layers = config.lora_layers or range(config.text_config.num_hidden_layers)
        vision = "|".join(VISION_PROJECTION_NAMES[p] for p in config.lora_target_projections)
        text = "|".join(TEXT_PROJECTION_NAMES[p] for p in config.lora_target_projections)
        return (
            rf"vision_model\.layers\.({'|'.join(map(str, vision_layers))})\.attention\.({vision})"
            rf"|text_model\.encoder\.layer\.({'|'.join(map(str, text_layers))})\.attention\.self\.({text})"
        )

    def _inject_lora(self) -> None:
        lora_config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            use_rslora=self.config.use_rslora,
            target_modules=self._lora_target_pattern(),
            bias="none",
        )
        inject_adapter_in_model(lora_config, self)
        use_fast_dropout(self)
        # The adapters belong to this model and are saved in its own state dict; transformers must not mistake
        # the model for a PEFT-wrapped one.
        del self.peft_config
        self.mark_trainable_parameters()

    def mark_trainable_parameters(self) -> None:
        """Freeze every base weight; LoRA, the hypergraph adapters and the logit scale train."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad = self._is_trainable(name)

    @staticmethod
    def _is_trainable(parameter_name: str) -> bool:
        return (
            ".lora_A." in parameter_name
            or ".lora_B." in parameter_name
            or parameter_name.startswith(("vision_hypergraph.", "text_hypergraph."))
            or parameter_name == "logit_scale"
        )

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

    def cast_towers(self, dtype: torch.dtype = torch.bfloat16) -> "AceLoraModel":
        """Run the ViT and BERT towers' matrix products in `dtype` (bfloat16 or float16) for fast inference.

        The towers' `Linear`/`Conv2d` weights are stored in `dtype` and the towers run under autocast, so their
        residual stream and normalisations stay in float32; the projections, the CLS attention row and the
        hypergraph stay float32 too (the hypergraph's top-k choices are precision-sensitive). Call
        [`merge_lora`] first so that the adapters are folded in at full precision. The rounding of the weights
        is not undone: reload the model to return to float32.
        """
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cast_towers takes torch.bfloat16 or torch.float16, got {dtype}.")
        for tower in (self.vision_model, self.text_model):
            for module in tower.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.to(dtype)
        self.tower_dtype = dtype
        return self

    def _tower_autocast(self, device: torch.device):
        # A disabled autocast block would also switch off a caller's autocast (mixed-precision training).
        return nullcontext() if self.tower_dtype is None else torch.autocast(device.type, dtype=self.tower_dtype)

    @property
    def lora_merged(self) -> bool:
        return any(layer.merged for layer in self.lora_layers())

    # ----------------------------------------------------------------------------------------------------- vision

    def _inference_chunks(self, batch_size: int, tokens_per_sample: int, device: torch.device) -> int:
        """How many tower calls a batch takes: one, except for CPU inference, which runs best in small chunks.

        On the CPU, the activations of a large batch exceed glibc's mmap threshold so that every allocation
        page-faults; equal chunks of at most about `CPU_CHUNK_TOKENS` tokens keep the GEMMs near peak. Outputs are
        unchanged.
        """
        if torch.is_grad_enabled() or device.type != "cpu":
            return 1
        return math.ceil(batch_size * tokens_per_sample / max(CPU_CHUNK_TOKENS, tokens_per_sample))

    def _image_tokens(self, pixel_values: torch.Tensor, with_cls_attention: bool):
        """Normalised projected tokens `[B, N, D]` and, if asked, the last layer's pre-softmax CLS row `[B, N-1]`."""
        embeddings = self.vision_model.embeddings
        num_tokens = embeddings.patch_embeddings.num_patches + 1
        chunks = self._inference_chunks(pixel_values.shape[0], num_tokens, pixel_values.device)
        return _map_chunks(lambda pixels: self._image_tokens_chunk(pixels, with_cls_attention), chunks, pixel_values)

    def _image_tokens_chunk(self, pixel_values: torch.Tensor, with_cls_attention: bool):
        attention = self.vision_model.layers[-1].attention
        with recording_outputs(query=attention.q_proj, key=attention.k_proj) as recorded:
            with self._tower_autocast(pixel_values.device):
                hidden_states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self._project_image_tokens(hidden_states, recorded["query"], recorded["key"], with_cls_attention)

    def _project_image_tokens(
        self, hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor, with_cls_attention: bool
    ):
        """The image path after the ViT: normalised projected tokens and the CLS row from the last layer's q, k."""
        hidden_states = hidden_states.to(self.visual_projection.weight.dtype)
        if not with_cls_attention:
            return F.normalize(self.visual_projection(hidden_states[:, :1]), dim=-1), None
        num_heads = self.vision_model.layers[-1].attention.num_attention_heads
        scores = cls_attention_scores(query.float(), key.float(), num_heads)
        return F.normalize(self.visual_projection(hidden_states), dim=-1), scores.mean(dim=1)[:, 1:]

    def get_image_features(self, pixel_values: torch.Tensor, use_hgnn: bool = True) -> torch.Tensor:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, 224, 224)`):
                Normalised pixels (see `AceLoraImageProcessor`).
            use_hgnn (`bool`, *optional*, defaults to `True`):
                `True`: the ACE embedding (CLS node of the vision hypergraph). `False`: the projected CLS token,
                i.e. BiomedCLIP with LoRA.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, projection_dim)`: L2-normalised image embeddings.
        """
        use_hgnn = use_hgnn and self.vision_hypergraph is not None
        tokens, cls_attention = self._image_tokens(pixel_values, with_cls_attention=use_hgnn)
        if not use_hgnn:
            return tokens[:, 0]
        return self.vision_hypergraph(tokens, cls_attention)

    @torch.no_grad()
    def get_image_attention(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        What the ACE image embedding looks at, for explanations.

        Returns:
            `cls_attention` (`torch.FloatTensor` of shape `(batch_size, num_patches)`): the last layer's
            head-averaged, pre-softmax attention scores of CLS to each patch (the hypergraph's row 0), and
            `neighbours` (`torch.LongTensor` of shape `(batch_size, top_k)`): the patches (0-based) the hypergraph
            connects to CLS, or `None` without a vision hypergraph.
        """
        _, cls_attention = self._image_tokens(pixel_values, with_cls_attention=True)
        if self.vision_hypergraph is None:
            return cls_attention, None
        neighbours, _ = self.vision_hypergraph.cls_neighbours(cls_attention)
        return cls_attention, neighbours - 1

    # ------------------------------------------------------------------------------------------------------- text

    def _pad_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad ids and mask to the context length, which the text hypergraph's size depends on."""
        context_length = self.config.text_context_length
        length = input_ids.shape[-1]
        if length > context_length:
            raise ValueError(
                f"input_ids has {length} tokens but the model's text context is {context_length}; "
                f"tokenize with truncation=True, max_length={context_length} (AceLoraProcessor does)."
            )
        pad_token_id = self.config.text_config.pad_token_id
        if attention_mask is None:
            attention_mask = input_ids != pad_token_id
        padding = (0, context_length - length)
        return F.pad(input_ids, padding, value=pad_token_id), F.pad(attention_mask.long(), padding, value=0)

    def _text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_cls_attention: bool):
        """Normalised projected tokens `[B, L, D]` and, if asked, the last layer's CLS attention probabilities."""
        chunks = self._inference_chunks(input_ids.shape[0], input_ids.shape[1], input_ids.device)
        return _map_chunks(lambda ids, mask: self._text_tokens_chunk(ids, mask, with_cls_attention), chunks,
                           input_ids, attention_mask)

    def _text_tokens_chunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_cls_attention: bool):
        attention = self.text_model.encoder.layer[-1].attention.self
        with recording_outputs(query=attention.query, key=attention.key) as recorded:
            with self._tower_autocast(input_ids.device):
                hidden_states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden_states = hidden_states.to(self.text_projection.fc1.weight.dtype)
        if not with_cls_attention:
            return F.normalize(self.text_projection(hidden_states[:, :1]), dim=-1), None
        scores = cls_attention_scores(recorded["query"].float(), recorded["key"].float(), attention.num_attention_heads)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        cls_attention = scores.softmax(dim=-1).mean(dim=1)[:, 1:]
        return F.normalize(self.text_projection(hidden_states), dim=-1), cls_attention

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_hgnn: bool = True
    ) -> torch.Tensor:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids, one text per row; padded here to `config.text_context_length`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Defaults to `input_ids != pad_token_id`.
            use_hgnn (`bool`, *optional*, defaults to `True`):
                `True`: the ACE embedding (CLS node of the text hypergraph). `False`: the projected CLS token.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, projection_dim)`: L2-normalised text embeddings.
        """
        use_hgnn = use_hgnn and self.text_hypergraph is not None
        input_ids, attention_mask = self._pad_text(input_ids, attention_mask)
        tokens, cls_attention = self._text_tokens(input_ids, attention_mask, with_cls_attention=use_hgnn)
        if not use_hgnn:
            return tokens[:, 0]
        return self.text_hypergraph(tokens, cls_attention)

    def get_class_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""
        Zero-shot class embeddings from several prompt templates per class.

        The templates' token features and CLS attention rows are averaged per class before the text hypergraph
        runs once per class (without a hypergraph: the normalised mean of the template embeddings).

        Args:
            input_ids (`torch.LongTensor` of shape `(num_classes, num_templates, sequence_length)`):
                Token ids of every template filled with every class name.
            attention_mask (`torch.Tensor` of the same shape, *optional*):
                Defaults to `input_ids != pad_token_id`.

        Returns:
            `torch.FloatTensor` of shape `(num_classes, projection_dim)`: L2-normalised class embeddings.
        """
        num_classes, num_templates = input_ids.shape[:2]
        flat_mask = None if attention_mask is None else attention_mask.flatten(0, 1)
        flat_ids, flat_mask = self._pad_text(input_ids.flatten(0, 1), flat_mask)
        use_hgnn = self.text_hypergraph is not None
        tokens, cls_attention = self._text_tokens(flat_ids, flat_mask, with_cls_attention=use_hgnn)
        tokens = tokens.unflatten(0, (num_classes, num_templates)).mean(dim=1)
        if not use_hgnn:
            return F.normalize(tokens[:, 0], dim=-1)
        cls_attention = cls_attention.unflatten(0, (num_classes, num_templates)).mean(dim=1)
        return self.text_hypergraph(tokens, cls_attention)

    # ---------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> AceLoraOutput:
        r"""
        labels (`torch.Tensor` of shape `(batch_size, num_labels)`, *optional*):
            Finding labels of each image-report pair (CheXpert style: 1, 0, -1 uncertain, NaN missing). Pairs
            with identical label vectors are not used as each other's negatives (label-guided InfoNCE).
        return_loss (`bool`, *optional*):
            Whether to return the contrastive loss; implied by `labels`.
        """
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids, attention_mask)
        logits_per_image = self.logit_scale * image_embeds @ text_embeds.t()
        loss = None
        if return_loss or labels is not None:
            loss = label_guided_infonce(logits_per_image, labels)
        return AceLoraOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )


__all__ = ["AceLoraModel", "AceLoraOutput", "AceLoraPreTrainedModel", "AceHypergraph"]
