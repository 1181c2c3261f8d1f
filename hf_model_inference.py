#!/usr/bin/env python
"""Zero-shot classification of chest X-rays (PNG/JPEG/TIFF/DICOM) with ACE-LoRA.

    python hf_model_inference.py --images a.dcm b.png --labels "No Finding" pneumonia
    python hf_model_inference.py --csv rsna_test.csv --image-root rsna/ --output results.json

The defaults reproduce the paper's RSNA pneumonia setting: labels "No Finding" / "pneumonia" and the two
templates "a chest X-ray image of {}." and "Findings suggesting {}.". With `--csv` (RSNA test-split format:
columns `Path`, `Target`) it also reports accuracy and the AUC of the last label.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from ace_lora_hf.explain import explain_images
from ace_lora_hf.errors import ImageLoadError
from ace_lora_hf.image_loading import load_image
from ace_lora_hf.metrics import classification_metrics
from ace_lora_hf.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier


DEFAULT_MODEL = "aydnarda/ACE-LoRA"
DEFAULT_LABELS = ("No Finding", "pneumonia")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder (default: %(default)s).")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", type=Path, help="Image files: PNG, JPEG, TIFF or DICOM.")
    inputs.add_argument("--csv", type=Path, help="CSV with columns Path and Target (0/1 for the last label).")
    parser.add_argument("--image-root", type=Path, help="Folder that --csv paths are relative to (default: its own).")
    parser.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS), help="Class names (default: %(default)s).")
    parser.add_argument("--templates", nargs="+", default=list(CHEST_XRAY_TEMPLATES),
                        help="Prompt templates with {} for the label (default: the paper's two).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="Write the probabilities (and metrics) to this JSON file.")
    parser.add_argument("--explain", type=Path, help="Write an attention/hypergraph picture per image here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing --output / --explain files.")
    args = parser.parse_args(argv)
    if args.output and args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it.")
    if args.csv and len(args.labels) != 2:
        parser.error("--csv evaluates a binary task: pass exactly two --labels (negative first).")
    return args


def load_model(name: str, device: str):
    try:
        model = AutoModel.from_pretrained(name)
        processor = AutoProcessor.from_pretrained(name)
    except OSError as error:
        if Path(name).is_dir():
            raise SystemExit(f"Cannot load the model folder {name}: {error}") from error
        raise SystemExit(
            f"Cannot load {name!r} from the Hugging Face Hub ({error.__class__.__name__}). Without network access, "
            "pass a local folder with --model PATH (one written by `python -m ace_lora_hf.convert`)."
        ) from error
    return model.to(device).eval(), processor


def read_csv(path: Path, image_root: Path | None) -> tuple[list[Path], list[int]]:
    if not path.is_file():
        raise SystemExit(f"{path}: file not found.")
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0]) if rows else set()
    missing = {"Path", "Target"} - columns
    if missing:
        raise SystemExit(f"{path}: missing column(s) {', '.join(sorted(missing))}; found {sorted(columns)}.")
    root = image_root or path.parent
    targets = []
    for line, row in enumerate(rows, start=2):
        if row["Target"] not in ("0", "1"):
            raise SystemExit(f"{path}, line {line}: Target must be 0 or 1, got {row['Target']!r}.")
        targets.append(int(row["Target"]))
    return [root / row["Path"] for row in rows], targets


def print_table(images: list[Path], labels: list[str], probabilities: torch.Tensor, predictions: list[str]) -> None:
    name_width = max(len("image"), *(len(str(image)) for image in images))
    widths = [max(len(label), 6) for label in labels]
    print("  ".join([f"{'image':<{name_width}}", *(f"{l:>{w}}" for l, w in zip(labels, widths)), "prediction"]))
    for image, row, prediction in zip(images, probabilities.tolist(), predictions):
        cells = [f"{p:>{w}.4f}" for p, w in zip(row, widths)]
        print("  ".join([f"{str(image):<{name_width}}", *cells, prediction]))


def write_explanations(model, processor, images: list[Path], folder: Path, batch_size: int, overwrite: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        for image, picture in zip(batch, explain_images(model, processor, [load_image(i) for i in batch])):
            target = folder / f"{Path(image).stem}_explain.png"
            if target.exists() and not overwrite:
                raise SystemExit(f"{target} exists; pass --overwrite to replace it.")
            picture.save(target)
            print(f"wrote {target}")


def main(argv=None) -> None:
    args = parse_args(argv)
    images, targets = (args.images, None) if args.images else read_csv(args.csv, args.image_root)
    model, processor = load_model(args.model, args.device)
    classifier = ZeroShotClassifier(model, processor, args.templates, args.batch_size, show_progress=True)
    try:
        probabilities = classifier(images, args.labels)
    except ImageLoadError as error:
        raise SystemExit(f"Cannot classify: {error}") from error
    predictions = [args.labels[index] for index in probabilities.argmax(dim=-1).tolist()]
    print_table(images, args.labels, probabilities, predictions)
    results = {
        "model": args.model,
        "labels": args.labels,
        "templates": args.templates,
        "results": [
            {"image": str(image), "probabilities": dict(zip(args.labels, row)), "prediction": prediction}
            for image, row, prediction in zip(images, probabilities.tolist(), predictions)
        ],
    }
    if targets is not None:
        results["metrics"] = classification_metrics(probabilities, targets)
        print(f"accuracy {results['metrics']['accuracy']:.4f}  AUC ({args.labels[1]}) {results['metrics']['auc']:.4f}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.output}")
    if args.explain:
        write_explanations(model, processor, images, args.explain, args.batch_size, args.overwrite)

if __name__ == "__main__":
    sys.exit(main())
