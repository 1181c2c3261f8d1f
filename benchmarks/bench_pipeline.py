#!/usr/bin/env python
"""Pipeline benchmark: dataset-scale zero-shot inference, from files on disk to probabilities.

- "decode + preprocess per worker": images/s of one process on one thread, from a file on disk to `pixel_values`,
  for 1024² 16-bit DICOMs with a VOI window and 1024² 8-bit grayscale PNGs, the old path (`legacy_image_path.py`,
  frozen) against the new one (`load_image` then `AceLoraImageProcessor`), with the largest difference between their
  pixel values.
- "end to end": `ZeroShotClassifier` over 128 such files (half DICOM, half PNG, decoded in DataLoader workers) against
  the model alone on the same number of preprocessed images, float32 and bfloat16, timed in turns; their ratio is how
  much of the model's throughput the whole pipeline keeps. Also LoRA merged against unmerged, and glibc's allocator
  tuned (`malloc_tuning`) against its defaults, each in its own process, taking turns.

    python benchmarks/bench_pipeline.py [--rounds N] [--images N] [--size PIXELS] [--e2e-images N] [--json FILE]

The inputs are synthetic (a smooth field plus noise, about as compressible as the NIH sample PNGs), written afresh
from fixed seeds into a temporary folder. Old and new are timed in turns (see `interleaved_seconds`); the speed-up is
the median of the per-round ratios.
"""

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation

from transformers import AutoModel, AutoProcessor

from ace_lora_hf import AceLoraImageProcessor
from ace_lora_hf.models.ace_lora.batch_inference import default_num_workers
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.inference.malloc_tuning import keep_freed_memory_for_reuse
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier
from _common import (base_parser, interleaved_seconds, median_ratio, print_table, resolve_model, synchronize,
                     write_json)
from legacy_image_path import LegacyImageProcessor, legacy_load_image


def radiograph(size: int, high: int, seed: int) -> np.ndarray:
    """A smooth field in [0, high] with noise of 3% of the range, different for every seed."""
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size] / size
    phase = generator.uniform(0, 2 * np.pi, 2)
    smooth = (np.sin(20 * columns + phase[0]) + np.cos(14 * rows + phase[1]) + 2) / 4
    return np.clip(smooth * high + generator.normal(0, 0.03 * high, (size, size)), 0, high)


def write_windowed_dicom(path: Path, size: int, seed: int) -> Path:
    """A 16-bit MONOCHROME2 DX image with a window centre and width (the VOI step of the old path)."""
    dataset = Dataset()
    dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.set_pixel_data(radiograph(size, 60000, seed).astype(np.uint16), "MONOCHROME2", 16)
    dataset.WindowCenter, dataset.WindowWidth = 30000, 40000
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_gray_png(path: Path, size: int, seed: int) -> Path:
    Image.fromarray(radiograph(size, 255, seed).astype(np.uint8)).save(path)
    return path


INPUTS = {"16-bit DICOM, VOI window": (write_windowed_dicom, "dcm"), "8-bit grayscale PNG": (write_gray_png, "png")}


def write_inputs(folder: Path, kind: str, images: int, size: int) -> list[Path]:
    write, suffix = INPUTS[kind]
    return [write(folder / f"{suffix}_{seed}.{suffix}", size, seed) for seed in range(images)]


def image_path(load, processor, paths: list[Path]):
    """One worker's job on `paths`: every file loaded, then the batch preprocessed in one call, as
    `ZeroShotClassifier` and `ImageTextCollator` do."""

    def run():
        processor([load(path) for path in paths], return_tensors="pt")

    return run


def max_pixel_value_difference(paths: list[Path], old_processor, new_processor) -> float:
    return max(
        float((old_processor(legacy_load_image(path), return_tensors="pt")["pixel_values"]
               - new_processor(load_image(path), return_tensors="pt")["pixel_values"]).abs().max())
        for path in paths
    )


def old_against_new(label: str, paths: list[Path], rounds: int) -> dict:
    old_processor, new_processor = LegacyImageProcessor(), AceLoraImageProcessor()
    times = interleaved_seconds({"old": image_path(legacy_load_image, old_processor, paths),
                                 "new": image_path(load_image, new_processor, paths)}, rounds)
    return {
        "input": label,
        "old_images_per_s": len(paths) / statistics.median(times["old"]),
        "new_images_per_s": len(paths) / statistics.median(times["new"]),
        "speedup": median_ratio(times["old"], times["new"]),
        "max_abs_pixel_value_difference": max_pixel_value_difference(paths, old_processor, new_processor),
    }


@contextmanager
def one_thread():
    """One worker's share of the CPU: torch on one thread (PIL and numpy use one here anyway), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def decode_and_preprocess(images: int, size: int, rounds: int) -> list[dict]:
    """Section "decode + preprocess per worker": the old path against the new, per input kind."""
    with one_thread(), tempfile.TemporaryDirectory() as folder:
        return [old_against_new(f"{size}x{size} {kind}", write_inputs(Path(folder), kind, images, size), rounds)
                for kind in INPUTS]


def print_decode_and_preprocess(rows: list[dict], images: int, rounds: int) -> None:
    print_table(f"Decode + preprocess per worker (one process, one thread; {images} images per kind, {rounds} rounds)",
                ["input", "old img/s", "new img/s", "new/old", "old ms/img", "new ms/img", "max |d pixel_values|"],
                [[r["input"], f"{r['old_images_per_s']:.1f}", f"{r['new_images_per_s']:.1f}", f"{r['speedup']:.2f}x",
                  f"{1e3 / r['old_images_per_s']:.1f}", f"{1e3 / r['new_images_per_s']:.1f}",
                  f"{r['max_abs_pixel_value_difference']:.1e}"] for r in rows])


# ------------------------------------------------------------------------------------------------- end to end


def model_and_processor(model_dir: Path, device: str, dtype: torch.dtype, merged: bool = True):
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if merged:
        model.merge_lora()
    return model, AutoProcessor.from_pretrained(model_dir)


def model_only(model, pixel_batches: list[torch.Tensor], device: str):
    def run():
        with torch.no_grad():
            for pixels in pixel_batches:
                model.get_image_features(pixels.to(device)).pooler_output.cpu()
        synchronize(device)

    return run


def end_to_end(classifier: ZeroShotClassifier, files: list[Path], device: str):
    def run():
        for _ in classifier.classify(files, ["No Finding", "pneumonia"]):
            pass
        synchronize(device)

    return run


def mixed_files(folder: Path, count: int, size: int) -> list[Path]:
    """`count` files, DICOM and PNG alternating, as a hospital export mixes them."""
    half = count // 2
    dicoms = write_inputs(folder, "16-bit DICOM, VOI window", count - half, size)
    pngs = write_inputs(folder, "8-bit grayscale PNG", half, size)
    return [path for pair in zip(dicoms, pngs) for path in pair] + dicoms[half:]


def pipeline_against_model(model_dir: Path, files: list[Path], device: str, dtype: torch.dtype, batch_size: int,
                           num_workers: int, rounds: int) -> dict:
    model, processor = model_and_processor(model_dir, device, dtype)
    classifier = ZeroShotClassifier(model, processor, batch_size=batch_size, num_workers=num_workers)
    pixels = processor.image_processor([load_image(path) for path in files[:batch_size]], return_tensors="pt")
    batches = [pixels["pixel_values"]] * -(-len(files) // batch_size)
    times = interleaved_seconds({"model": model_only(model, batches, device),
                                 "pipeline": end_to_end(classifier, files, device)}, rounds)
    return {
        "dtype": str(dtype).removeprefix("torch."), "images": len(files), "batch": batch_size, "workers": num_workers,
        "model_images_per_s": len(files) / statistics.median(times["model"]),
        "pipeline_images_per_s": len(files) / statistics.median(times["pipeline"]),
        "pipeline_over_model": median_ratio(times["model"], times["pipeline"]),
    }


def merged_against_unmerged(model_dir: Path, device: str, batch_size: int, rounds: int) -> dict:
    merged, processor = model_and_processor(model_dir, device, torch.float32, merged=True)
    unmerged, _ = model_and_processor(model_dir, device, torch.float32, merged=False)
    size = processor.image_processor.crop_size["height"]
    batches = [torch.randn(batch_size, 3, size, size)]
    times = interleaved_seconds({"merged": model_only(merged, batches, device),
                                 "unmerged": model_only(unmerged, batches, device)}, rounds)
    return {"batch": batch_size, "merged_speedup": median_ratio(times["unmerged"], times["merged"])}


# --------------------------------------------------------------------------------------------------- allocator


def timing_worker(model_dir: Path, batch_size: int, tuned: bool) -> None:
    """A child process: the model alone, one timed batch per `go` line on stdin, its seconds on stdout."""
    if tuned:
        keep_freed_memory_for_reuse()
    model, processor = model_and_processor(model_dir, "cpu", torch.float32)
    size = processor.image_processor.crop_size["height"]
    run = model_only(model, [torch.randn(batch_size, 3, size, size)], "cpu")
    run()
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        run()
        print(time.perf_counter() - start, flush=True)


def allocator_tuned_against_default(model_dir: Path, batch_size: int, rounds: int) -> dict:
    """The same batch in two processes, glibc's allocator tuned in one, taking turns."""
    workers = {name: subprocess.Popen([sys.executable, __file__, "--timing-worker", str(model_dir), "--batch-size",
                                       str(batch_size), *(["--tuned"] if name == "tuned" else [])],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in ("default", "tuned")}
    for worker in workers.values():
        assert worker.stdout.readline().strip() == "ready"
    times = {name: [] for name in workers}
    for _ in range(rounds):
        for name, worker in workers.items():
            worker.stdin.write("go\n")
            worker.stdin.flush()
            times[name].append(float(worker.stdout.readline()))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    return {"batch": batch_size, "tuned_speedup": median_ratio(times["default"], times["tuned"])}


def print_end_to_end(rows: list[dict], merge: dict, allocator: dict | None) -> None:
    print_table("End to end: ZeroShotClassifier over the files against the model alone on as many images",
                ["dtype", "images", "batch", "workers", "model img/s", "pipeline img/s", "pipeline/model"],
                [[r["dtype"], r["images"], r["batch"], r["workers"], f"{r['model_images_per_s']:.2f}",
                  f"{r['pipeline_images_per_s']:.2f}", f"{r['pipeline_over_model']:.3f}"] for r in rows])
    cheap = [["LoRA merged / unmerged (model alone)", f"{merge['merged_speedup']:.3f}x"]]
    if allocator is not None:
        cheap.append(["glibc allocator tuned / default (model alone)", f"{allocator['tuned_speedup']:.3f}x"])
    print_table(f"Cheap wins, batch {merge['batch']}", ["", "speed-up"], cheap)


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(rounds=30)
    parser.add_argument("--images", type=int, default=16,
                        help="Images of each kind, preprocessed as one batch (default: %(default)s).")
    parser.add_argument("--size", type=int, default=1024, help="Side of the square inputs (default: %(default)s).")
    parser.add_argument("--e2e-images", type=int, default=128, help="Files of the end-to-end run (default: %(default)s).")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="Rounds of the end-to-end run (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, help="Model batch (default: 16, 256 on a GPU).")
    parser.add_argument("--num-workers", type=int, help="Decoding workers (default: the classifier's own choice).")
    parser.add_argument("--timing-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (16 if args.device == "cpu" else 256)
    if args.timing_worker:
        return timing_worker(args.timing_worker, batch_size, args.tuned)
    decoding = decode_and_preprocess(args.images, args.size, args.rounds)
    print_decode_and_preprocess(decoding, args.images, args.rounds)
    model_dir = resolve_model(args)
    dtypes = [torch.float32, torch.bfloat16]
    with tempfile.TemporaryDirectory() as folder:
        files = mixed_files(Path(folder), args.e2e_images, args.size)
        workers = default_num_workers(args.device) if args.num_workers is None else args.num_workers
        pipeline = [pipeline_against_model(model_dir, files, args.device, dtype, batch_size, workers,
                                           args.e2e_rounds) for dtype in dtypes]
    merge = merged_against_unmerged(model_dir, args.device, batch_size, args.e2e_rounds * 3)
    allocator = allocator_tuned_against_default(model_dir, batch_size, args.e2e_rounds * 3) \
        if args.device == "cpu" and sys.platform.startswith("linux") else None
    print_end_to_end(pipeline, merge, allocator)
    results = {"decode_and_preprocess": decoding, "end_to_end": pipeline, "lora_merge": merge,
               "allocator": allocator}
    if args.device != "cpu":
        slowest = min(row["new_images_per_s"] for row in decoding)
        fastest = max(row["model_images_per_s"] for row in pipeline)
        results["workers_to_stay_compute_bound"] = math.ceil(fastest / slowest)
        print(f"\nworkers a GPU needs to stay compute-bound: {results['workers_to_stay_compute_bound']}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
