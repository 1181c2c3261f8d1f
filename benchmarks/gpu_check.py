#!/usr/bin/env python
"""One check for any CUDA machine: correctness on the GPU and the figures that say whether it is kept fed.

    python benchmarks/gpu_check.py [--model DIR] [--prepared FOLDER] [--max-workers N] [--json results.json]
    python benchmarks/gpu_check.py --device cpu --quick     # the script itself, tiny, on any machine

It checks the model's probabilities on CUDA against the CPU (float32 within 1e-4; bfloat16 with the same argmax),
measures inference images/s at batch 256 in bfloat16 (SDPA attention), one training step's throughput and peak
memory at batch 128 (bfloat16 autocast, the loss and AdamW included), and the loader's throughput from a prepared
training set with 1..N DataLoader workers, and prints one markdown table, headed by the device's name, to paste into
the README. Without --model it uses BiomedCLIP's architecture with random weights (timings do not depend on the
weights); without --prepared it prepares synthetic 2,500 x 3,000 JPEGs first.
"""

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoProcessor, BertTokenizer

from _common import base_parser, synchronize, write_json
from ace_lora_hf import AceLoraConfig, AceLoraImageProcessor, AceLoraModel, AceLoraProcessor
from ace_lora_hf.data.image_tables import ImageTextCollator, ImageTextColumns
from bench_data import load_routes, synthetic_xrays
from bench_training import TrainingStep, peak_gb


PROMPTS = ["no finding", "pneumonia", "pneumothorax", "cardiomegaly", "pleural effusion"]
FULL = {"inference_batch": 256, "train_batch": 128, "loader_batch": 64, "loader_images": 1024,
        "synthetic": (64, 3000, 2500)}
QUICK = {"inference_batch": 4, "train_batch": 2, "loader_batch": 2, "loader_images": 8, "synthetic": (8, 300, 250)}


def model_folder(args, work: Path) -> str:
    """--model, or BiomedCLIP's architecture with random weights and a stand-in tokenizer, saved in `work`."""
    if args.model:
        return str(args.model)
    torch.manual_seed(0)
    folder = work / "random_biomedclip"
    AceLoraModel(AceLoraConfig()).save_pretrained(folder)
    (work / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PROMPTS, *"abcdefgh"]))
    AceLoraProcessor(AceLoraImageProcessor(), BertTokenizer(str(work / "vocab.txt"))).save_pretrained(folder)
    return str(folder)


def probabilities(model, processor, pixels: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    text = processor(text=PROMPTS, return_tensors="pt")
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                       pixel_values=pixels.to(device=device, dtype=dtype)).logits_per_image
    return logits.float().softmax(dim=-1).cpu()


def check_probabilities(model_dir: str, processor, device: str) -> dict:
    pixels = torch.randn(8, 3, processor.image_processor.crop_size.height, processor.image_processor.crop_size.width,
                         generator=torch.Generator().manual_seed(0))
    cpu = probabilities(AutoModel.from_pretrained(model_dir), processor, pixels, "cpu", torch.float32)
    fp32 = probabilities(AutoModel.from_pretrained(model_dir), processor, pixels, device, torch.float32)
    bf16 = probabilities(AutoModel.from_pretrained(model_dir), processor, pixels, device, torch.bfloat16)
    return {"fp32_max_abs_difference": (fp32 - cpu).abs().max().item(),
            "bf16_same_argmax": bool(torch.equal(bf16.argmax(-1), cpu.argmax(-1)))}


def inference_speed(model_dir: str, device: str, batch: int, rounds: int) -> dict:
    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16).to(device).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_image_features(pixels)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(rounds):
            model.get_image_features(pixels)
        synchronize(device)
    return {"images_per_s": batch * rounds / (time.perf_counter() - start),
            "attention": model.config._attn_implementation}


def training_speed(model_dir: str, device: str, batch: int, rounds: int) -> dict:
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    step = TrainingStep(model_dir, device, batch).configure(checkpointing=False, bf16=True)
    step()
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    return {"images_per_s": batch * rounds / (time.perf_counter() - start), "peak_gb": peak_gb(device)}


def loader_speed(dataset, collate, batch: int, workers: int, images: int) -> float:
    """Images/s of a DataLoader over the prepared set, `images` images after one warm-up batch."""
    repeats = math.ceil((images + batch) / len(dataset))
    rows = datasets.concatenate_datasets([dataset] * repeats)
    loader = DataLoader(rows, batch_size=batch, collate_fn=collate, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start, seen = time.perf_counter(), 0
    for batch_rows in batches:
        seen += len(batch_rows["pixel_values"])
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def prepared_set(args, processor, work: Path, synthetic: tuple[int, int, int]):
    if args.prepared:
        saved = datasets.load_from_disk(str(args.prepared))
    else:
        count, height, width = synthetic
        table = synthetic_xrays(args.cache / f"xrays_{height}x{width}", count, height, width)
        load_routes(table, work / "prepared", processor)
        saved = datasets.load_from_disk(str(work / "prepared"))
    return (saved["train"] if isinstance(saved, datasets.DatasetDict) else saved).cast_column(
        "image", datasets.Image(decode=False))


def markdown(device_name: str, results: dict, sizes: dict) -> str:
    probability, inference, training = results["probabilities"], results["inference"], results["training"]
    lines = [f"**{device_name}**", "", "| check | result | target |", "|---|---|---|",
             f"| CUDA vs CPU probabilities, float32 | max \\|d\\| = {probability['fp32_max_abs_difference']:.1e} | "
             "<= 1e-4 |",
             f"| CUDA bfloat16 vs CPU | same argmax: {probability['bf16_same_argmax']} | True |",
             f"| inference, batch {sizes['inference_batch']}, bfloat16, {inference['attention']} | "
             f"{inference['images_per_s']:.0f} images/s | |",
             f"| training step, batch {sizes['train_batch']}, bfloat16 autocast | {training['images_per_s']:.0f} "
             f"images/s, peak {training['peak_gb']:.1f} GB | |"]
    lines += [f"| loader from the prepared set, {workers} worker(s) | {speed:.0f} images/s | |"
              for workers, speed in results["loader_images_per_s"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(device="cuda")
    parser.add_argument("--quick", action="store_true", help="Tiny batches: checks that the script runs.")
    parser.add_argument("--prepared", type=Path, help="A prepared training set (default: synthetic JPEGs, prepared).")
    parser.add_argument("--max-workers", type=int, help="Loader workers to try, 1..N (default: the CPU count, up to 16).")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
                 "machine, or with --device cpu --quick to check the script.")
    sizes = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model_dir = model_folder(args, work)
    processor = AutoProcessor.from_pretrained(model_dir)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    results = {"device": device_name, "probabilities": check_probabilities(model_dir, processor, args.device),
               "inference": inference_speed(model_dir, args.device, sizes["inference_batch"], rounds),
               "training": training_speed(model_dir, args.device, sizes["train_batch"], rounds)}
    dataset = prepared_set(args, processor, work, sizes["synthetic"])
    collate = ImageTextCollator(processor, columns=ImageTextColumns(labels=()), uint8_pixels=True)
    max_workers = args.max_workers or (2 if args.quick else min(16, len(os.sched_getaffinity(0))))
    results["loader_images_per_s"] = {workers: loader_speed(dataset, collate, sizes["loader_batch"], workers,
                                                            sizes["loader_images"])
                                      for workers in range(1, max_workers + 1)}
    print(markdown(device_name, results, sizes))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
