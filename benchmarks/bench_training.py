#!/usr/bin/env python
"""Training-step benchmark: one step of 8 images + 8 reports of 256 tokens (forward, label-guided loss,
backward, AdamW), in float32 (SDPA), with activation checkpointing and with bfloat16 autocast.

    python benchmarks/bench_training.py [--model DIR] [--device cuda --batch-size 64] [--json results.json]

Each configuration runs in its own process so that its peak resident memory (CPU) or peak allocated memory
(GPU) is its own. The original implementation's step on the 2-core CPU took about 10 s at a 6.4 GB peak.
"""

import argparse
import json
import resource
import subprocess
import sys

import torch
from transformers import AutoModel

import ace_lora_hf  # noqa: F401
from _common import base_parser, median_seconds, print_table, resolve_model, write_json


ORIGINAL = {"step_s": 10.0, "peak_gb": 6.4}
CONFIGURATIONS = {
    "float32": {"checkpointing": False, "bf16": False},
    "float32 + checkpointing": {"checkpointing": True, "bf16": False},
    "bf16 autocast": {"checkpointing": False, "bf16": True},
    "bf16 autocast + checkpointing": {"checkpointing": True, "bf16": True},
}


def peak_gb(device: str) -> float:
    if device != "cpu":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def one_configuration(model_dir: str, device: str, batch_size: int, checkpointing: bool, bf16: bool) -> dict:
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_dir).to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    pixels = torch.randn(batch_size, 3, 224, 224, device=device)
    input_ids = torch.randint(5, model.config.text_config.vocab_size, (batch_size, 256), device=device)
    input_ids[:, 0], input_ids[:, 120], input_ids[:, 121:] = 2, 3, 0  # [CLS] ... [SEP] [PAD]...
    labels = torch.randint(0, 2, (batch_size, 14), device=device).float()
    loaded_gb = peak_gb(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()

    seconds = median_seconds(step, repeats=3)
    return {"step_s": seconds, "peak_gb": peak_gb(device), "after_loading_gb": loaded_gb}


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:  # a child process measuring one configuration
        print(json.dumps(one_configuration(str(resolve_model(args)), args.device, args.batch_size,
                                           **CONFIGURATIONS[args.only])))
        return {}
    model_dir = resolve_model(args)
    results = {}
    for name in CONFIGURATIONS:
        command = [sys.executable, __file__, "--model", str(model_dir), "--device", args.device,
                   "--batch-size", str(args.batch_size), "--only", name]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    baseline = results["float32"]
    print_table(f"Training step, batch {args.batch_size} ({args.device})",
                ["configuration", "step s", "vs float32", "vs original 10 s", "peak GB", "of original 6.4 GB"],
                [[name, f"{r['step_s']:.2f}", f"{baseline['step_s'] / r['step_s']:.2f}x",
                  f"{ORIGINAL['step_s'] / r['step_s']:.2f}x", f"{r['peak_gb']:.2f}",
                  f"{r['peak_gb'] / ORIGINAL['peak_gb']:.0%}"] for name, r in results.items()])
    write_json(args.json, {"device": args.device, "batch_size": args.batch_size, "steps": results})
    return results


if __name__ == "__main__":
    main()
