"""Zero-shot classification of chest X-rays and pathology images (PNG/JPEG/TIFF/DICOM) with ACE-LoRA.

    ace-lora-classify --images a.dcm b.png scans/ --labels "No Finding" pneumonia
    ace-lora-classify --csv rsna_test.csv --image-root rsna/ --output results.csv
    python hf_model_inference.py --images examples/images/*.png examples/images/*.dcm

Without --model, the released ACE-LoRA model is built once from BiomedCLIP (downloaded from the Hub) and the authors'
adapters shipped with the package, and kept in the Hugging Face cache. The defaults reproduce the paper's RSNA
pneumonia setting: labels "No Finding" / "pneumonia" and the templates "a chest X-ray image of {}." and "Findings
suggesting {}.". With --csv (columns Path, Target) it also reports accuracy and the AUC of the last label.

Folders are searched recursively (image files and files without a suffix, or --pattern). An unreadable file is
reported and skipped (exit status 3 at the end; --strict stops at the first one). Results stream to a .csv or .jsonl
--output as each batch finishes, so an interrupted run keeps what it computed and --resume continues it.
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .common import EXIT_INPUTS_SKIPPED, run_cli
from ..errors import ImageLoadError
from ..inference.explain import explain, plot_explanation, require_plotting
from ..inference.image_inputs import ImageInputs, collect_images, read_image_list, read_labelled_table
from ..inference.malloc_tuning import keep_freed_memory_for_reuse
from ..evaluation.metrics import classification_metrics
from ..sources.folders import BIOMEDCLIP_REPO_ID, load_model_and_processor
from ..sources.released_adapters import RELEASED
from ..outputs.result_files import ResultsFile
from ..outputs.safe_outputs import check_output_file, ensure_folder, folder_lock
from ..models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier, checked_labels, checked_templates


DEFAULT_LABELS = ("No Finding", "pneumonia")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and what builds the released model without it; shared by the inference command lines."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="A folder or Hub repository in ACE-LoRA's transformers format (default: the "
                                       "released model, built from --biomedclip and --adapters).")
    group.add_argument("--biomedclip", default=BIOMEDCLIP_REPO_ID,
                       help="BiomedCLIP folder or Hub repository the released model is built from (default: %(default)s).")
    group.add_argument("--adapters", default=RELEASED,
                       help="'released' (shipped with the package) or an ACE_LoRA.pt (default: %(default)s).")
    group.add_argument("--revision", help="Branch, tag or commit of a Hub repository.")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="Where the model runs (auto: the GPU if there is one, or what accelerate launch gives).")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="auto: bfloat16 on GPUs that support it, float32 otherwise.")
    group.add_argument("--batch-size", type=int, default=16)
    group.add_argument("--num-workers", type=int,
                       help="Processes decoding images beside the model (default: one per spare CPU, at most 8, beside "
                            "a GPU; none beside a model on the CPU, whose threads use every core).")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ace-lora-classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", type=Path, help="Image files and folders (PNG, JPEG, TIFF, DICOM).")
    inputs.add_argument("--image-list", type=Path, help="A text file with one image path per line.")
    inputs.add_argument("--csv", type=Path, help="CSV with columns Path and Target (0/1 for the last label).")
    parser.add_argument("--image-root", type=Path, help="Folder that --csv/--image-list paths are relative to.")
    parser.add_argument("--pattern", action="append", help="Glob for files in --images folders (repeatable).")
    parser.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS), help="Class names (default: %(default)s).")
    parser.add_argument("--templates", nargs="+", default=list(CHEST_XRAY_TEMPLATES),
                        help="Prompt templates, each with one {} for the label (default: the paper's two).")
    add_model_arguments(parser)
    parser.add_argument("--output", type=Path, help="Results file: .csv or .jsonl (streamed), or .json.")
    parser.add_argument("--resume", action="store_true", help="Continue --output, skipping the images it has.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output / --explain files (never inputs).")
    parser.add_argument("--strict", action="store_true", help="Stop at the first unreadable image.")
    parser.add_argument("--explain", type=Path, help="Write an explanation picture per image into this folder "
                                                      "(needs matplotlib: pip install 'ace-lora-hf[plot]').")
    parser.add_argument("--quiet", action="store_true", help="Print only the summary, not a row per image.")
    args = parser.parse_args(argv)
    if args.csv and len(args.labels) != 2:
        parser.error("--csv evaluates a binary task: pass exactly two --labels (negative first).")
    return args


def read_inputs(args: argparse.Namespace) -> ImageInputs:
    if args.csv:
        return read_labelled_table(args.csv, args.image_root)
    if args.image_list:
        return ImageInputs(read_image_list(args.image_list, args.image_root), sources=[args.image_list])
    return ImageInputs(collect_images(args.images, args.pattern))


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


class TablePrinter:
    """The probability table on stdout, a row as each image is classified.

    Names longer than `LONG_NAME` are shown relative to the folder all images share, which the header names once: a
    shown name still identifies its file, wherever the images lie.
    """

    LONG_NAME = 60

    def __init__(self, images: Sequence[str], labels: Sequence[str], enabled: bool):
        self.labels, self.enabled = labels, enabled
        self.folder = shared_folder(images) if any(len(image) > self.LONG_NAME for image in images) else ""
        heading = f"image (in {self.folder}{os.sep})" if self.folder else "image"
        self.name_width = max(len(heading), *(len(self._name(image)) for image in images))
        self.widths = [max(len(label), 6) for label in labels]
        self._print([heading.ljust(self.name_width), *(f"{l:>{w}}" for l, w in zip(labels, self.widths)),
                     "prediction"])

    def _name(self, image: str) -> str:
        return os.path.relpath(image, self.folder) if self.folder else image

    def _print(self, cells: list[str]) -> None:
        if self.enabled:
            tqdm.write("  ".join(cells), file=sys.stdout)  # above the progress bar, which stays at the bottom

    def row(self, record: dict) -> None:
        name = self._name(record["image"])
        if "error" in record:
            self._print([name.ljust(self.name_width), f"skipped: {record['error']}"])
            return
        cells = [f"{record['probabilities'][label]:>{width}.4f}" for label, width in zip(self.labels, self.widths)]
        self._print([name.ljust(self.name_width), *cells, record["prediction"]])


def shared_folder(images: Sequence[str]) -> str:
    """The deepest folder that holds every image ("" when they share none, e.g. relative and absolute paths)."""
    try:
        return os.path.commonpath([os.path.dirname(image) for image in images])
    except ValueError:
        return ""


def batch_records(batch, images: list[str], labels: Sequence[str], targets: list[int] | None) -> list[dict]:
    """One record per classified or skipped image of the batch, in input order."""
    records = [(index, {"image": images[index], "error": reason}) for index, reason in batch.failures]
    for index, probabilities in zip(batch.indices, batch.probabilities.tolist()):
        record = {"image": images[index], "probabilities": dict(zip(labels, probabilities)),
                  "prediction": labels[max(range(len(labels)), key=probabilities.__getitem__)]}
        if targets is not None:
            record["target"] = targets[index]
        records.append((index, record))
    return [record for _, record in sorted(records, key=lambda pair: pair[0])]


def _check_outputs(args: argparse.Namespace, inputs: ImageInputs) -> None:
    """Every output path is checked before the model loads: not an input, not a folder, no silent replacement."""
    every_input = [*inputs.images, *(inputs.sources or [])]
    if args.output:
        check_output_file(args.output, every_input, overwrite=args.overwrite or args.resume)
    if args.explain:
        require_plotting()
        ensure_folder(args.explain, "--explain")
        for target in explanation_targets(args.explain, inputs.images).values():
            check_output_file(target, every_input, overwrite=args.overwrite, option="--explain")


def classify_all(args: argparse.Namespace, inputs: ImageInputs, results: ResultsFile | None, accelerator) -> dict:
    """Classify the images not already in `results`; returns the run's summary."""
    labels = list(checked_labels(args.labels))
    templates = checked_templates(args.templates)
    done = results.done if results is not None else set()
    todo = [index for index, image in enumerate(inputs.images) if image not in done]
    images = [inputs.images[index] for index in todo]
    targets = None if inputs.targets is None else [inputs.targets[index] for index in todo]
    device = accelerator.device
    model, processor = load_model_and_processor(args.model, device=device, dtype=model_dtype(args.dtype, device),
                                                 revision=args.revision, biomedclip=args.biomedclip,
                                                 adapters=args.adapters)
    classifier = ZeroShotClassifier(model, processor, templates, args.batch_size, args.num_workers,
                                    show_progress=accelerator.is_main_process, accelerator=accelerator)
    printer = TablePrinter(inputs.images, labels, enabled=accelerator.is_main_process and not args.quiet)
    started, records = time.perf_counter(), list(results.records if results is not None else [])
    for batch in classifier.classify(images, labels):
        new = batch_records(batch, images, labels, targets)
        if args.strict and batch.failures:
            raise ImageLoadError(images[batch.failures[0][0]], batch.failures[0][1])
        for record in new:
            printer.row(record)
        if results is not None and accelerator.is_main_process:
            results.write(new)
        records += new
    if args.explain and accelerator.is_main_process:
        write_explanations(classifier, [r["image"] for r in records if "error" not in r], labels,
                           explanation_targets(args.explain, inputs.images))
    return summarise(args, labels, templates, records, time.perf_counter() - started, len(images))


def summarise(args, labels: list[str], templates, records: list[dict], seconds: float, attempted: int) -> dict:
    classified = [record for record in records if "error" not in record]
    summary = {"model": args.model or f"released ({args.biomedclip} + {args.adapters})", "labels": labels,
               "templates": list(templates), "classified": len(classified),
               "skipped": [{"image": r["image"], "error": r["error"]} for r in records if "error" in r]}
    if classified and "target" in classified[0]:
        summary["metrics"] = classification_metrics([[r["probabilities"][label] for label in labels]
                                                     for r in classified], [r["target"] for r in classified])
    summary["seconds"], summary["images_per_second"] = seconds, attempted / seconds if seconds else 0.0
    return summary


def explanation_targets(folder: Path, images: Sequence[str]) -> dict[str, Path]:
    """`<stem>_explain.png` per image in `folder`, numbered where two images share a stem."""
    targets, used = {}, set()
    for image in images:
        stem, number = Path(image).stem, 1
        while (name := f"{stem}{f'_{number}' if number > 1 else ''}_explain.png") in used:
            number += 1
        used.add(name)
        targets[image] = folder / name
    return targets


def write_explanations(classifier: ZeroShotClassifier, images: list[str], labels: list[str],
                       targets: dict[str, Path]) -> None:
    for image in images:
        plot_explanation(explain(classifier, image, labels), title=Path(image).name).savefig(targets[image])
        print(f"wrote {targets[image]}")


def report(summary: dict, results: ResultsFile | None) -> None:
    skipped = summary["skipped"]
    print(f"classified {summary['classified']} image(s), {summary['images_per_second']:.2f} images/s"
          + (f"; skipped {len(skipped)}:" if skipped else ""))
    for entry in skipped:
        print(f"  {entry['image']}: {entry['error']}")
    if "metrics" in summary:
        metrics = summary["metrics"]
        print(f"accuracy {metrics['accuracy']:.4f}  AUC ({summary['labels'][1]}) {metrics['auc']:.4f}")
    if results is not None:
        print(f"wrote {results.path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory_for_reuse()
    labels = checked_labels(args.labels)
    checked_templates(args.templates)
    inputs = read_inputs(args)
    accelerator = Accelerator(cpu=args.device == "cpu")
    main_process = accelerator.is_main_process
    if main_process:
        _check_outputs(args, inputs)
    lock = folder_lock(args.output) if args.output and main_process else nullcontext()
    with lock:
        results = None
        if args.output and main_process:
            results = ResultsFile(args.output, labels, inputs.targets is not None, args.resume, args.overwrite)
        summary = classify_all(args, inputs, results, accelerator)
        if main_process:
            if results is not None:
                results.finish(summary)
            report(summary, results)
    return EXIT_INPUTS_SKIPPED if summary["skipped"] else 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
