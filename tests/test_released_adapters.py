"""The authors' adapters shipped with the package are their ACE_LoRA.pt, tensor by tensor."""

import hashlib

import torch
from safetensors import safe_open

from ace_lora_hf.sources.released_adapters import SHIPPED_ADAPTERS, flatten, read_adapter_checkpoint

from conftest import ACE_CHECKPOINT


def test_the_shipped_adapters_are_the_released_pickle():
    original = torch.load(ACE_CHECKPOINT, map_location="cpu", weights_only=True)
    shipped = read_adapter_checkpoint("released")
    expected = flatten(original["weights"])
    assert shipped.tensors.keys() == expected.keys() and len(expected) == 161
    assert all(torch.equal(shipped.tensors[name], tensor) for name, tensor in expected.items())
    assert shipped.config_updates() == {"lora_rank": 4, "hypergraph_top_k": 5, "lora_target_projections": ["q", "k", "v"]}
    with safe_open(SHIPPED_ADAPTERS, "pt") as file:
        recorded = file.metadata()["source_sha256"]
    assert recorded == hashlib.sha256(ACE_CHECKPOINT.read_bytes()).hexdigest()
    assert (SHIPPED_ADAPTERS.parent / "LICENSE").read_text().startswith("MIT License")
