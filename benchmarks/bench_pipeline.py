#!/usr/bin/env python
"""Pipeline benchmark. Section "decode + preprocess per worker": images/s of one process on one thread, from a file
on disk to `pixel_values`, for 1024² 16-bit DICOMs with a VOI window and 1024² 8-bit grayscale PNGs, the old path
(`legacy_image_path.py`, frozen) against the new one (`load_image` then `AceLoraImageProcessor`), with the largest
difference between their pixel values.

    python benchmarks/bench_pipeline.py [--rounds N] [--images N] [--size PIXELS] [--json results.json]

The inputs are synthetic (a smooth field plus noise, about as compressible as the NIH sample PNGs), written afresh
from fixed seeds into a temporary folder. Old and new are timed in turns (see `interleaved_seconds`); the speed-up is
the median of the per-round ratios.
"""

import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation

from ace_lora_hf import AceLoraImageProcessor
from ace_lora_hf.image_loading import load_image
from _common import base_parser, interleaved_seconds, median_ratio, print_table, write_json
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


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(rounds=30)
    parser.add_argument("--images", type=int, default=16,
                        help="Images of each kind, preprocessed as one batch (default: %(default)s).")
    parser.add_argument("--size", type=int, default=1024, help="Side of the square inputs (default: %(default)s).")
    args = parser.parse_args(argv)
    decoding = decode_and_preprocess(args.images, args.size, args.rounds)
    print_decode_and_preprocess(decoding, args.images, args.rounds)
    results = {"decode_and_preprocess": decoding}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
