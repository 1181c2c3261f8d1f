"""Shared pieces of the benchmarks: timing, the GEMM roofline, FLOP counts and the model to measure."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
GEMM_SIZE = 4096
# What the issue measured on this machine for the original code (float32): its GEMM peak and the figures at it.
ORIGINAL = {"gemm_flops": 197e9, "ace_s_per_image": 0.22, "train_step_s": 10.0,
            "train_peak_gb": 6.4}


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_seconds(functions: dict, rounds: int) -> dict[str, list[float]]:
    """Time every function once per round, after one warm-up round: `{name: [seconds per round]}`.

    This machine's speed drifts by 10-20% over minutes (a shared VM), so figures that are compared are measured
    in turns and compared round by round (see `median_ratio`), never from two separate stretches of time.
    """
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            times[name].append(seconds(function))
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def gemm(dtype: torch.dtype, device: str, size: int):
    """One size^3 matrix multiply (the roofline the towers are compared with) and its FLOP count."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def multiply():
        a @ b
        synchronize(device)

    return multiply, 2 * size**3


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def original_at_equal_peak(gemm_seconds: list[float], gemm_flops: float, original_seconds: float) -> list[float]:
    """The original's time rescaled from its 197 GFLOP/s GEMM peak to the peak of each round here."""
    return [original_seconds * ORIGINAL["gemm_flops"] / (gemm_flops / seconds) for seconds in gemm_seconds]


def vit_forward_flops(config) -> float:
    """Multiply-add FLOPs (x2) of one image through the ViT: patch embedding, attention and MLP of every layer."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    hidden, inner = vision.hidden_size, vision.intermediate_size
    patch = (tokens - 1) * hidden * 3 * vision.patch_size**2
    per_layer = 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 2 * tokens * hidden * inner
    return 2 * (patch + vision.num_hidden_layers * per_layer)


def stand_in_model_dir(cache: Path) -> Path:
    """BiomedCLIP's deterministic stand-in with the released adapters, converted once into `cache`."""
    converted = cache / "ace_lora_stand_in"
    if (converted / "model.safetensors").is_file():
        return converted
    biomedclip = cache / "biomedclip_stand_in"
    subprocess.run([sys.executable, str(SHARED / "reference" / "make_random_biomedclip.py"), str(biomedclip)],
                   check=True, capture_output=True)
    # A stand-in tokenizer: PubMedBERT's special tokens (ids 0-4) and single letters; timings do not depend on it.
    (biomedclip / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]))
    subprocess.run([sys.executable, "-m", "ace_lora_hf.convert", "--biomedclip", str(biomedclip), "--ace-checkpoint",
                    str(SHARED / "checkpoints" / "ACE_LoRA.pt"), "--output", str(converted), "--overwrite"],
                   check=True, capture_output=True)
    return converted


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, help="Converted model folder (default: the reference stand-in).")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ace_lora_bench",
                        help="Where the stand-in model is built once (default: %(default)s).")
    parser.add_argument("--json", type=Path, help="Also write the results as JSON here.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds per comparison (default: %(default)s).")
    parser.add_argument("--gemm-size", type=int, default=GEMM_SIZE,
                        help="Side of the square matrix product taken as the roofline (default: %(default)s; a "
                             "bfloat16 product of that size takes minutes on CPUs without bfloat16 instructions).")
    return parser


def resolve_model(args) -> Path:
    return args.model or stand_in_model_dir(args.cache)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def write_json(path: Path | None, results: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {path}")
