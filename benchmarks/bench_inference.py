#!/usr/bin/env python
"""Inference benchmark: ACE image embeddings against the plain towers and the machine's GEMM roofline,
the class-embedding cache, and the bfloat16-tower mode with its fidelity on the reference case.

    python benchmarks/bench_inference.py [--model DIR] [--device cuda] [--json results.json]

Every figure is measured in this run; ratios compare numbers from the same process. The original
implementation's figures on the 2-core CPU (issue #7) are printed for reference only.
"""

import statistics

import numpy as np
import torch
from transformers import AutoModel

import ace_lora_hf  # noqa: F401
from _common import (SHARED, base_parser, gemm_flops_per_second, median_seconds, print_table, resolve_model,
                     vit_forward_flops, write_json)


ORIGINAL_SECONDS_PER_IMAGE = {"ace": 0.22, "plain": 0.21}  # the authors' code, float32, this CPU (issue #7)


def load(model_dir, device: str):
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    model.merge_lora()
    return model


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def image_encoding(model, device: str, batch_sizes, peak: float) -> list[dict]:
    flops = vit_forward_flops(model.config)
    rows = []
    for batch_size in batch_sizes:
        pixels = torch.randn(batch_size, 3, 224, 224, device=device)
        repeats = 5 if batch_size > 1 else 15

        def ace():
            model.get_image_features(pixels)
            synchronize(device)

        def plain():
            model.get_image_features(pixels, use_hgnn=False)
            synchronize(device)

        with torch.no_grad():  # interleaved, so that both see the same machine load
            pairs = [(median_seconds(ace, 1), median_seconds(plain, 1)) for _ in range(repeats)]
        ace_time, plain_time = (statistics.median(times) for times in zip(*pairs))
        rate = flops * batch_size / plain_time
        rows.append({"batch": batch_size, "ace_s_per_image": ace_time / batch_size,
                     "plain_s_per_image": plain_time / batch_size, "ace_over_plain": ace_time / plain_time,
                     "vit_gflops": rate / 1e9, "vit_fraction_of_gemm_peak": rate / peak})
    return rows


def class_embedding_cache(model, device: str, seconds_per_image: float, images: int = 1000, batch: int = 16) -> dict:
    """Class prompts of the reference case (3 classes x 2 templates) and what caching them saves over N images."""
    prompt_ids = torch.from_numpy(np.load(SHARED / "reference" / "case_a.npz")["input_prompt_ids"]).to(device)

    def encode():
        model.get_class_embeddings(prompt_ids)
        synchronize(device)

    with torch.no_grad():
        class_time = median_seconds(encode, repeats=3)
    batches = -(-images // batch)
    cached = class_time + images * seconds_per_image
    uncached = batches * class_time + images * seconds_per_image
    return {"class_embeddings_s": class_time, "images": images, "batch": batch, "cached_total_s": cached,
            "uncached_total_s": uncached, "uncached_over_cached": uncached / cached}


def reduced_precision(model_dir, device: str, fp32_seconds: float) -> dict:
    """bfloat16 towers: speed at batch 16 and fidelity against float32 on the reference case."""
    reference = np.load(SHARED / "reference" / "case_a.npz")
    pixels = torch.from_numpy(reference["input_images"]).to(device)
    prompt_ids = torch.from_numpy(reference["input_prompt_ids"]).to(device)
    model = load(model_dir, device)
    with torch.no_grad():
        expected = (model.logit_scale * model.get_image_features(pixels) @ model.get_class_embeddings(prompt_ids).t())
        model.cast_towers(torch.bfloat16)
        actual = model.logit_scale * model.get_image_features(pixels) @ model.get_class_embeddings(prompt_ids).t()
        batch = torch.randn(16, 3, 224, 224, device=device)

        def encode():
            model.get_image_features(batch)
            synchronize(device)

        seconds = median_seconds(encode, repeats=3) / 16
    expected, actual = expected.softmax(-1), actual.softmax(-1)
    return {"bf16_s_per_image": seconds, "speedup_over_fp32": fp32_seconds / seconds,
            "speedup_over_original": ORIGINAL_SECONDS_PER_IMAGE["ace"] / seconds,
            "argmax_identical": bool(torch.equal(expected.argmax(-1), actual.argmax(-1))),
            "max_abs_probability_difference": float((expected - actual).abs().max())}


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    args = parser.parse_args(argv)
    model_dir = resolve_model(args)
    fp32_peak = gemm_flops_per_second(torch.float32, args.device)
    bf16_peak = gemm_flops_per_second(torch.bfloat16, args.device)
    model = load(model_dir, args.device)
    config = model.config
    encoding = image_encoding(model, args.device, args.batch_sizes, fp32_peak)
    at_16 = next((row for row in encoding if row["batch"] == 16), encoding[-1])
    cache = class_embedding_cache(model, args.device, at_16["ace_s_per_image"])
    del model
    bf16 = reduced_precision(model_dir, args.device, at_16["ace_s_per_image"])

    print(f"GEMM roofline at 4096^3: float32 {fp32_peak / 1e9:.0f} GFLOP/s, bfloat16 {bf16_peak / 1e9:.0f} GFLOP/s "
          f"(bf16/fp32 {bf16_peak / fp32_peak:.2f}x); ViT forward {vit_forward_flops(config) / 1e9:.1f} GFLOP/image")
    print_table("Image encoding, float32, LoRA merged", ["batch", "ACE s/img", "plain s/img", "ACE/plain", "ViT GFLOP/s",
                "of GEMM peak", "original ACE/ours"],
                [[r["batch"], f"{r['ace_s_per_image']:.4f}", f"{r['plain_s_per_image']:.4f}", f"{r['ace_over_plain']:.3f}",
                  f"{r['vit_gflops']:.0f}", f"{r['vit_fraction_of_gemm_peak']:.1%}",
                  f"{ORIGINAL_SECONDS_PER_IMAGE['ace'] / r['ace_s_per_image']:.2f}x"] for r in encoding])
    print_table(f"Class embeddings (3 classes x 2 templates) over {cache['images']} images at batch {cache['batch']}",
                ["class embeddings s", "cached total s", "re-encoded per batch s", "saving"],
                [[f"{cache['class_embeddings_s']:.3f}", f"{cache['cached_total_s']:.1f}",
                  f"{cache['uncached_total_s']:.1f}", f"{cache['uncached_over_cached']:.2f}x"]])
    print_table("bfloat16 towers (projections, attention row and hypergraph in float32), batch 16",
                ["s/img", "vs float32", "vs original", "argmax identical", "max |dprob| (case_a)"],
                [[f"{bf16['bf16_s_per_image']:.4f}", f"{bf16['speedup_over_fp32']:.2f}x",
                  f"{bf16['speedup_over_original']:.2f}x", bf16["argmax_identical"],
                  f"{bf16['max_abs_probability_difference']:.2e}"]])
    results = {"device": args.device, "gemm_fp32_flops": fp32_peak, "gemm_bf16_flops": bf16_peak,
               "image_encoding": encoding, "class_embedding_cache": cache, "bf16_towers": bf16}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
