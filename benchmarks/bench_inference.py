#!/usr/bin/env python
"""Inference benchmark: ACE image embeddings against the plain ViT and the machine's GEMM roofline, the
class-embedding cache, and bfloat16 loading (`from_pretrained(dtype=torch.bfloat16)`) with its fidelity on the
reference case.

    python benchmarks/bench_inference.py [--model DIR] [--device cuda] [--json results.json]

Figures that are compared are timed in turns within this run (see `interleaved_seconds`); ratios are medians of
the per-round ratios. The original implementation's figures (issue #7) were taken at a float32 GEMM peak of
197 GFLOP/s; "at equal peak" rescales them to the peak measured here.
"""

import statistics

import numpy as np
import torch
from transformers import AutoModel

import ace_lora_hf  # noqa: F401
from _common import (ORIGINAL, SHARED, base_parser, gemm, interleaved_seconds, median_ratio, original_at_equal_peak,
                     print_table, resolve_model, synchronize, vit_forward_flops, write_json)


def load(model_dir, device: str, bf16: bool = False):
    model = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32).to(device).eval()
    model.merge_lora()
    return model


def random_pixels(model, batch_size: int, device: str) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.randn(batch_size, 3, size, size, device=device)


def timed(function, device: str):
    def run():
        with torch.no_grad():
            function()
        synchronize(device)

    return run


@torch.no_grad()
def ace_only_work(model, pixels: torch.Tensor, device: str):
    """What the ACE embedding adds to the plain ViT, on one batch's ViT outputs: the last layer's CLS attention row,
    projecting every token (not only CLS) and the hypergraph. Timed alone, its cost is not lost in the towers'
    round-to-round noise (about 5% here)."""
    vision = model.vision_model
    outputs = vision.backbone_outputs(pixels)
    return timed(lambda: vision.pool(vision.project_backbone_outputs(outputs)), device)


def image_encoding(model, device: str, batch_sizes, rounds: int, gemm_size: int) -> list[dict]:
    flops = vit_forward_flops(model.config)
    multiply, gemm_flops = gemm(torch.float32, device, gemm_size)
    rows = []
    for batch_size in batch_sizes:
        pixels = random_pixels(model, batch_size, device)
        times = interleaved_seconds({"gemm": multiply,
                                     "ace": timed(lambda: model.get_image_features(pixels), device),
                                     "plain": timed(lambda: model.vision_model.backbone_outputs(pixels), device),
                                     "ace_only": ace_only_work(model, pixels, device)},
                                    rounds if batch_size > 1 else 3 * rounds)
        plain = statistics.median(times["plain"])
        ace_per_image = [seconds / batch_size for seconds in times["ace"]]
        original = original_at_equal_peak(times["gemm"], gemm_flops, ORIGINAL["ace_s_per_image"])
        rows.append({
            "batch": batch_size,
            "ace_s_per_image": statistics.median(ace_per_image),
            "plain_s_per_image": plain / batch_size,
            "ace_over_plain": median_ratio(times["ace"], times["plain"]),
            "ace_only_s_per_image": statistics.median(times["ace_only"]) / batch_size,
            "plain_plus_ace_only_over_plain": 1 + statistics.median(times["ace_only"]) / plain,
            "gemm_gflops": gemm_flops / statistics.median(times["gemm"]) / 1e9,
            "vit_fraction_of_gemm_peak": median_ratio([flops * batch_size / s for s in times["plain"]],
                                                      [gemm_flops / s for s in times["gemm"]]),
            "speedup_over_original": ORIGINAL["ace_s_per_image"] / statistics.median(ace_per_image),
            "speedup_over_original_at_equal_peak": median_ratio(original, ace_per_image),
        })
    return rows


def class_embedding_cache(model, device: str, seconds_per_image: float, rounds: int, images: int = 1000,
                          batch: int = 16) -> dict:
    """Class prompts of the reference case (3 classes x 2 templates) and what caching them saves over N images."""
    prompt_ids = torch.from_numpy(np.load(SHARED / "reference" / "case_a.npz")["input_prompt_ids"]).to(device)

    encode = timed(lambda: model.get_class_embeddings(prompt_ids), device)
    class_time = statistics.median(interleaved_seconds({"classes": encode}, rounds)["classes"])
    batches = -(-images // batch)
    cached = class_time + images * seconds_per_image
    uncached = batches * class_time + images * seconds_per_image
    return {"class_embeddings_s": class_time, "images": images, "batch": batch, "cached_total_s": cached,
            "uncached_total_s": uncached, "uncached_over_cached": uncached / cached}


@torch.no_grad()
def bf16_fidelity(fp32_model, bf16_model, device: str) -> dict:
    """Zero-shot probabilities of the reference case with a bfloat16 model against float32."""
    reference = np.load(SHARED / "reference" / "case_a.npz")
    pixels = torch.from_numpy(reference["input_images"]).to(device)
    prompt_ids = torch.from_numpy(reference["input_prompt_ids"]).to(device)
    expected, actual = (
        (model.logit_scale * model.get_image_features(pixels).pooler_output
         @ model.get_class_embeddings(prompt_ids).pooler_output.t()).softmax(-1)
        for model in (fp32_model, bf16_model)
    )
    return {"argmax_identical": bool(torch.equal(expected.argmax(-1), actual.argmax(-1))),
            "max_abs_probability_difference": float((expected - actual).abs().max())}


def reduced_precision(fp32_model, model_dir, device: str, batch_size: int, rounds: int, gemm_size: int) -> dict:
    """A bfloat16 model against float32, both with merged LoRA, timed in turns with both GEMM rooflines."""
    bf16_model = load(model_dir, device, bf16=True)
    fidelity = bf16_fidelity(fp32_model, bf16_model, device)
    pixels = random_pixels(fp32_model, batch_size, device)
    fp32_gemm, gemm_flops = gemm(torch.float32, device, gemm_size)
    bf16_gemm, _ = gemm(torch.bfloat16, device, gemm_size)
    times = interleaved_seconds({"gemm_fp32": fp32_gemm, "gemm_bf16": bf16_gemm,
                                 "fp32": timed(lambda: fp32_model.get_image_features(pixels), device),
                                 "bf16": timed(lambda: bf16_model.get_image_features(pixels), device)}, rounds)
    per_image = [seconds / batch_size for seconds in times["bf16"]]
    flops = vit_forward_flops(fp32_model.config) * batch_size
    original = original_at_equal_peak(times["gemm_fp32"], gemm_flops, ORIGINAL["ace_s_per_image"])
    return {
        "batch": batch_size,
        "bf16_s_per_image": statistics.median(per_image),
        "bf16_images_per_s": 1 / statistics.median(per_image),
        "speedup_over_fp32": median_ratio(times["fp32"], times["bf16"]),
        "bf16_gemm_over_fp32_gemm": median_ratio(times["gemm_fp32"], times["gemm_bf16"]),
        "vit_fraction_of_bf16_gemm_peak": median_ratio([flops / s for s in times["bf16"]],
                                                       [gemm_flops / s for s in times["gemm_bf16"]]),
        "speedup_over_original": ORIGINAL["ace_s_per_image"] / statistics.median(per_image),
        "speedup_over_original_at_equal_peak": median_ratio(original, per_image),
        **fidelity,
    }


def print_results(encoding: list[dict], cache: dict, bf16: dict, vit_gflop: float) -> None:
    print(f"ViT forward {vit_gflop:.1f} GFLOP/image; original (issue #7): {ORIGINAL['ace_s_per_image']} s/image "
          f"at a {ORIGINAL['gemm_flops'] / 1e9:.0f} GFLOP/s GEMM peak")
    print_table("Image encoding, float32, LoRA merged", ["batch", "ACE s/img", "plain ViT s/img", "ACE/plain",
                "ACE-only ms/img", "(plain + ACE-only)/plain", "GEMM GFLOP/s", "ViT of GEMM peak", "vs original",
                "vs original at equal peak"],
                [[r["batch"], f"{r['ace_s_per_image']:.4f}", f"{r['plain_s_per_image']:.4f}",
                  f"{r['ace_over_plain']:.3f}", f"{r['ace_only_s_per_image'] * 1e3:.2f}",
                  f"{r['plain_plus_ace_only_over_plain']:.4f}", f"{r['gemm_gflops']:.0f}",
                  f"{r['vit_fraction_of_gemm_peak']:.1%}",
                  f"{r['speedup_over_original']:.2f}x", f"{r['speedup_over_original_at_equal_peak']:.2f}x"]
                 for r in encoding])
    print_table(f"Class embeddings (3 classes x 2 templates) over {cache['images']} images at batch {cache['batch']}",
                ["class embeddings s", "cached total s", "re-encoded per batch s", "saving"],
                [[f"{cache['class_embeddings_s']:.3f}", f"{cache['cached_total_s']:.1f}",
                  f"{cache['uncached_total_s']:.1f}", f"{cache['uncached_over_cached']:.2f}x"]])
    print_table(f"bfloat16 model (projections, attention row and hypergraph in float32), batch {bf16['batch']}",
                ["s/img", "img/s", "vs float32", "bf16/fp32 GEMM", "ViT of bf16 peak", "vs original",
                 "vs original at equal peak", "argmax identical", "max |dprob| (case_a)"],
                [[f"{bf16['bf16_s_per_image']:.4f}", f"{bf16['bf16_images_per_s']:.1f}",
                  f"{bf16['speedup_over_fp32']:.2f}x", f"{bf16['bf16_gemm_over_fp32_gemm']:.2f}x",
                  f"{bf16['vit_fraction_of_bf16_gemm_peak']:.1%}", f"{bf16['speedup_over_original']:.2f}x",
                  f"{bf16['speedup_over_original_at_equal_peak']:.2f}x", bf16["argmax_identical"],
                  f"{bf16['max_abs_probability_difference']:.2e}"]])


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--bf16-batch", type=int, help="Batch of the bfloat16 timing (default: 16, 256 on a GPU).")
    args = parser.parse_args(argv)
    model_dir = resolve_model(args)
    model = load(model_dir, args.device)
    encoding = image_encoding(model, args.device, args.batch_sizes, args.rounds, args.gemm_size)
    at_16 = next((row for row in encoding if row["batch"] == 16), encoding[-1])
    cache = class_embedding_cache(model, args.device, at_16["ace_s_per_image"], args.rounds)
    vit_gflop = vit_forward_flops(model.config) / 1e9
    bf16_batch = args.bf16_batch or (16 if args.device == "cpu" else 256)
    bf16 = reduced_precision(model, model_dir, args.device, bf16_batch, args.rounds, args.gemm_size)
    print_results(encoding, cache, bf16, vit_gflop)
    results = {"device": args.device, "image_encoding": encoding, "class_embedding_cache": cache, "bf16_towers": bf16}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
