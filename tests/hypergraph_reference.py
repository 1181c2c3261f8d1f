"""The full `[B, N, N]` ACE hypergraph, built as the paper describes it, which `AceHypergraph.forward` never builds
(it computes only the rows the CLS node depends on): the tests compare the two."""

import torch
import torch.nn.functional as F

from ace_lora_hf import AceHypergraph


def incidence_matrix(hypergraph: AceHypergraph, tokens: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
    """Row 0 the CLS attention row, the other rows token cosine similarities; each row keeps its `top_k` entries (self
    and CLS excluded), softmax-normalised; then the diagonal is 1 and column 0 mirrors row 0."""
    unit = F.normalize(tokens.float(), dim=-1)
    scores = unit @ unit.transpose(1, 2)
    scores[:, 0, 1:] = cls_attention
    scores[:, 1:, 0] = float("-inf")
    scores.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    top_scores, top_index = scores.topk(hypergraph.top_k, dim=-1)
    incidence = torch.zeros_like(scores).scatter_(-1, top_index, top_scores.softmax(dim=-1))
    incidence.diagonal(dim1=1, dim2=2).fill_(1.0)
    incidence[:, 1:, 0] = incidence[:, 0, 1:]
    return incidence
