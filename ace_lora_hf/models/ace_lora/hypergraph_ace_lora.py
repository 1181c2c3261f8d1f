# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""ACE-HGNN, the attention-guided hypergraph of one ACE-LoRA tower, and its adapters."""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError


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


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tokens[b, index[b, i]]` for `tokens` `[B, N, D]` and `index` `[B, M]`."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


__all__ = ["AceHypergraph", "AceHypergraphAdapter", "AceHypergraphAdapterLinear"]
