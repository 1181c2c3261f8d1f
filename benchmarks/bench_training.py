#!/usr/bin/env python
"""Training-step benchmark: one step of 8 images + 8 reports of 256 tokens (forward, label-guided loss,
backward, AdamW), in float32 (SDPA), with activation checkpointing and with bfloat16 autocast.

    python benchmarks/bench_training.py [--model DIR] [--device cuda --batch-size 64] [--json results.json]

The step times of all configurations come from one process, timed in turns with the float32 GEMM roofline (this
machine's speed drifts). Peak memory is measured for each configuration in a process of its own: peak resident
memory on the CPU, peak allocated memory on a GPU. The original implementation's step took about 10 s at a
6.4 GB peak on the 2-core CPU, at a GEMM peak of 197 GFLOP/s.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModel

import ace_lora_hf  # noqa: F401
from _common import (ORIGINAL, base_parser, gemm, interleaved_seconds, median_ratio, original_at_equal_peak,
                     print_table, resolve_model, synchronize, write_json)


REPORT_TOKENS = 119  # padded to the 256-token context, as the released code always pads
CONFIGURATIONS = {
    "float32": {"checkpointing": False, "bf16": False},
    "float32 + checkpointing": {"checkpointing": True, "bf16": False},
    "bf16 autocast": {"checkpointing": False, "bf16": True},
    "bf16 autocast + checkpointing": {"checkpointing": True, "bf16": True},
}


def peak_gb(device: str) -> float:
    if device != "cpu":
        return torch.cuda.max_memory_allocated() / 1e9
    status = Path("/proc/self/status")
    if status.is_file():  # VmHWM counts this program alone; ru_maxrss starts from the parent's size at fork
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)


class TrainingStep:
    """A loaded model, its optimizer and one random batch of the shape the benchmark describes."""

    def __init__(self, model_dir: str, device: str, batch_size: int):
        torch.manual_seed(0)
        self.device = device
        self.model = AutoModel.from_pretrained(model_dir).to(device).train()
        config = self.model.config
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3,
                                           weight_decay=1e-2)
        size, length = config.vision_config.image_size, config.text_config.context_length
        self.pixels = torch.randn(batch_size, 3, size, size, device=device)
        self.input_ids = torch.randint(5, config.text_config.vocab_size, (batch_size, length), device=device)
        sep = min(REPORT_TOKENS + 1, length - 1)  # [CLS] report [SEP] [PAD]...
        self.input_ids[:, 0], self.input_ids[:, sep], self.input_ids[:, sep + 1:] = 2, 3, 0
        self.labels = torch.randint(0, 2, (batch_size, 14), device=device).float()
        self.bf16 = False

    def configure(self, checkpointing: bool, bf16: bool) -> "TrainingStep":
        if checkpointing:
            self.model.activation_checkpointing_enable()
        else:
            self.model.activation_checkpointing_disable()
        self.bf16 = bf16
        return self

    def __call__(self) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(input_ids=self.input_ids, pixel_values=self.pixels, labels=self.labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)


def step_times(model_dir: str, device: str, batch_size: int, rounds: int, gemm_size: int) -> dict[str, dict]:
    step = TrainingStep(model_dir, device, batch_size)
    multiply, gemm_flops = gemm(torch.float32, device, gemm_size)

    def configured(settings):
        return lambda: step.configure(**settings)()

    times = interleaved_seconds({"gemm": multiply, **{name: configured(settings)
                                                      for name, settings in CONFIGURATIONS.items()}}, rounds)
    original = original_at_equal_peak(times["gemm"], gemm_flops, ORIGINAL["train_step_s"])
    return {name: {"step_s": statistics.median(times[name]),
                   "speedup_over_float32": median_ratio(times["float32"], times[name]),
                   "speedup_over_original": ORIGINAL["train_step_s"] / statistics.median(times[name]),
                   "speedup_over_original_at_equal_peak": median_ratio(original, times[name])}
            for name in CONFIGURATIONS}


def peak_memory(model_dir: str, device: str, batch_size: int, configuration: str) -> dict:
    """Two steps (the second with AdamW's state allocated) of one configuration in this fresh process."""
    step = TrainingStep(model_dir, device, batch_size).configure(**CONFIGURATIONS[configuration])
    loaded = peak_gb(device)
    step()
    step()
    return {"peak_gb": peak_gb(device), "after_loading_gb": loaded}


def print_results(results: dict, device: str, batch_size: int) -> None:
    print_table(f"Training step, batch {batch_size} ({device}); original: {ORIGINAL['train_step_s']} s, "
                f"{ORIGINAL['train_peak_gb']} GB peak, at a {ORIGINAL['gemm_flops'] / 1e9:.0f} GFLOP/s GEMM peak",
                ["configuration", "step s", "vs float32", "vs original", "vs original at equal peak", "peak GB",
                 "of original's peak"],
                [[name, f"{r['step_s']:.2f}", f"{r['speedup_over_float32']:.2f}x", f"{r['speedup_over_original']:.2f}x",
                  f"{r['speedup_over_original_at_equal_peak']:.2f}x", f"{r['peak_gb']:.2f}",
                  f"{r['peak_gb'] / ORIGINAL['train_peak_gb']:.0%}"] for name, r in results.items()])


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(rounds=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-of", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model_dir = str(resolve_model(args))
    if args.memory_of:  # a child process measuring one configuration's peak memory
        print(json.dumps(peak_memory(model_dir, args.device, args.batch_size, args.memory_of)))
        return {}
    results = step_times(model_dir, args.device, args.batch_size, args.rounds, args.gemm_size)
    for name in CONFIGURATIONS:
        command = [sys.executable, __file__, "--model", model_dir, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--memory-of", name]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[name].update(json.loads(output.strip().splitlines()[-1]))
    print_results(results, args.device, args.batch_size)
    write_json(args.json, {"device": args.device, "batch_size": args.batch_size, "steps": results})
    return results


if __name__ == "__main__":
    main()
