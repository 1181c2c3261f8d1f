#!/usr/bin/env python
"""Data-loading benchmark: a prepared training set (`ace-lora-prepare training-set`) against full-resolution files.

    python benchmarks/bench_data.py [--count 24] [--height 3000 --width 2500] [--model DIR] [--json results.json]

Writes `--count` synthetic grayscale JPEGs of MIMIC-CXR's size (about 2,500 x 3,000) with reports, prepares them
once, then measures, timed in turns in one process: the time and CPU time to turn one sample into a training row
(pixel values and tokens) from each route, the cores each route needs to feed 1,000 images/s (CPU seconds per image
x 1,000), and the throughput of CPU training steps (loading included) from each. The prepared route's loader only
decodes PNGs and tokenizes; its 8-bit pixels become pixel values in the training step (`PixelTable`, on the GPU in
`pretrain.py`). It also checks that both routes give the same pixel values (max |d| = 0). The goal: the prepared route at least 20x faster per sample and at most
0.5 cores per 1,000 images/s.
"""

import csv
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import ace_lora_hf  # noqa: F401
from _common import base_parser, interleaved_seconds, median_ratio, print_table, resolve_model, write_json
from ace_lora_hf.data.image_tables import ImageTextCollator, ImageTextColumns, load_image_text_dataset
from ace_lora_hf.data.pixels import PixelTable
from ace_lora_hf.data.prepared import prepare_training_set


REPORT = "heart size is normal. there is mild atelectasis at the left lung base. no pneumothorax."


def synthetic_xrays(folder: Path, count: int, height: int, width: int) -> Path:
    """`count` X-ray-like JPEGs (smooth anatomy-like shading plus noise, quality 95) and their table."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = np.linspace(-1, 1, height)[:, None]
    columns = np.linspace(-1, 1, width)[None, :]
    shading = 120 + 80 * np.cos(2.5 * columns) * np.exp(-rows**2)
    for index in range(count):
        name = folder / f"{index:05d}.jpg"
        if not name.is_file():
            noise = rng.normal(0, 12, (height, width))
            Image.fromarray(np.clip(shading + noise, 0, 255).astype(np.uint8)).save(name, quality=95)
    table = folder / "table.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "report"])
        writer.writerows([f"{index:05d}.jpg", REPORT] for index in range(count))
    return table


def load_routes(table: Path, output: Path, processor) -> tuple[list[dict], list[dict], float]:
    """The rows of each route, and the seconds the one-off preparation took."""
    files = list(load_image_text_dataset(table, ImageTextColumns(labels=())))
    start = time.perf_counter()
    prepare_training_set(load_image_text_dataset(table, ImageTextColumns(labels=())), processor.image_processor,
                         output, ImageTextColumns(labels=()), {"table": table.name})
    preparation = time.perf_counter() - start
    prepared = datasets.load_from_disk(str(output))["train"].cast_column("image", datasets.Image(decode=False))
    return files, list(prepared), preparation


def per_sample(collate, rows: list[dict], batch_size: int):
    """Collate `rows` in batches, as a loader's worker does: one pass, its CPU seconds per sample kept."""
    def run():
        start = time.process_time()
        for first in range(0, len(rows), batch_size):
            collate(rows[first:first + batch_size])
        run.cpu_seconds.append((time.process_time() - start) / len(rows))
    run.cpu_seconds = []
    return run


def training_steps(model, collate, rows: list[dict], batch_size: int, finish=None):
    """Load batches of `rows` and train on them (`finish` turns a prepared batch's pixels into pixel values in the
    step, as `pretrain.py` does on the device): one pass."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run():
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            batch = collate(rows[start:start + batch_size])
            pixels = finish(batch["pixel_values"]) if finish else batch["pixel_values"]
            loss = model(input_ids=batch["input_ids"], pixel_values=pixels, return_loss=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(rounds=3)
    parser.add_argument("--count", type=int, default=24, help="Synthetic images (default: %(default)s).")
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=4, help="Training step batch (default: %(default)s).")
    parser.add_argument("--load-batch", type=int, default=8, help="Rows a loader collates at once (default: "
                                                                   "%(default)s).")
    args = parser.parse_args(argv)
    model_dir = str(resolve_model(args))
    processor = AutoProcessor.from_pretrained(model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    table = synthetic_xrays(args.cache / f"xrays_{args.height}x{args.width}", args.count, args.height, args.width)
    files, prepared, preparation = load_routes(table, work / "prepared", processor)
    from_files = ImageTextCollator(processor)
    from_set = ImageTextCollator(processor, columns=ImageTextColumns(labels=()), uint8_pixels=True)
    finish = PixelTable(processor.image_processor)
    difference = (from_files(files)["pixel_values"] - finish(from_set(prepared)["pixel_values"])).abs().max().item()

    loads = {"files": per_sample(from_files, files, args.load_batch),
             "prepared": per_sample(from_set, prepared, args.load_batch)}
    load_times = interleaved_seconds(loads, args.rounds)
    model = AutoModel.from_pretrained(model_dir).train()
    steps = {"files": training_steps(model, from_files, files, args.batch_size),
             "prepared": training_steps(model, from_set, prepared, args.batch_size, finish)}
    step_times = interleaved_seconds(steps, args.rounds)
    images_per_pass = len(files) // args.batch_size * args.batch_size
    results = {"images": len(files), "height": args.height, "width": args.width, "batch_size": args.batch_size,
               "max_abs_pixel_difference": difference, "preparation_s_per_image": preparation / len(files),
               "routes": {}}
    for route in ("files", "prepared"):
        cpu = statistics.median(loads[route].cpu_seconds[1:])  # the first entry is the warm-up round's
        results["routes"][route] = {
            "load_s_per_sample": statistics.median(load_times[route]) / len(files),
            "cores_per_1000_images_per_s": cpu * 1000,
            "train_images_per_s": images_per_pass / statistics.median(step_times[route])}
    results["prepared_speedup_per_sample"] = median_ratio(load_times["files"], load_times["prepared"])
    results["prepared_speedup_training"] = median_ratio(step_times["files"], step_times["prepared"])
    print_table(f"Data loading, {len(files)} JPEGs of {args.width} x {args.height}, one process "
                f"(prepared route {results['prepared_speedup_per_sample']:.1f}x faster per sample; "
                f"pixel values max |d| = {difference:g}; preparation {results['preparation_s_per_image']:.3f} s/image "
                "once)",
                ["route", "load ms/sample", "cores per 1,000 images/s", f"CPU train images/s (batch {args.batch_size})"],
                [[route, f"{r['load_s_per_sample'] * 1e3:.2f}", f"{r['cores_per_1000_images_per_s']:.2f}",
                  f"{r['train_images_per_s']:.2f}"] for route, r in results["routes"].items()])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
