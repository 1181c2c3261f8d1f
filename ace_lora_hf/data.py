"""Image-report pairs for training: a CSV or JSON-lines table read with `datasets`, images decoded lazily."""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers.utils import logging

from .errors import DataFormatError, ImageLoadError
from .image_loading import load_image
from .processing_ace_lora import AceLoraProcessor


logger = logging.get_logger(__name__)

# The 14 CheXpert labels of MIMIC-CXR (mimic-cxr-2.0.0-chexpert.csv), in that file's order.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)


@dataclass
class ImageTextColumns:
    """Which columns of the table hold what. `labels=()` trains without labels (plain InfoNCE)."""

    image: str = "image"
    text: str = "report"
    split: str | None = "split"
    labels: Sequence[str] = field(default_factory=lambda: CHEXPERT_LABELS)


def _read_table(path: Path) -> datasets.Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return datasets.Dataset.from_csv(str(path), keep_default_na=True)
    if suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    raise DataFormatError(f"{path}: expected a .csv or .jsonl table, got {suffix or 'no suffix'}.")


def _label_value(value, path: Path, row: int, column: str) -> float:
    if value is None or value == "":
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataFormatError(f"{path}, row {row}: label {column!r} is {value!r}, not a number.") from None
    if not (math.isnan(number) or number in (-1.0, 0.0, 1.0)):
        raise DataFormatError(f"{path}, row {row}: label {column!r} is {value!r}; expected 1, 0, -1 or empty.")
    return number


def load_image_text_dataset(
    path: str | Path,
    columns: ImageTextColumns = ImageTextColumns(),
    image_root: str | Path | None = None,
    split: str | None = None,
    skip_bad_rows: bool = False,
) -> datasets.Dataset:
    """Read and check an image-report table.

    Returns a dataset with `image` (resolved path), `text`, `row` (the table's 1-based data row, for messages)
    and, with label columns, `labels` (floats; NaN and -1 kept, the loss treats both as absent). A row whose
    image file is missing or whose report is empty raises `DataFormatError`, or is dropped and counted when
    `skip_bad_rows`.
    """
    path = Path(path)
    table = _read_table(path)
    wanted = [columns.image, columns.text, *columns.labels] + ([columns.split] if split else [])
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {table.column_names}. "
            "Name yours with --image-column / --text-column / --label-columns (or --no-labels)."
        )
    root = Path(image_root) if image_root is not None else path.parent
    records, skipped = [], 0
    for row, record in enumerate(table, start=1):
        if split and record[columns.split] != split:
            continue
        problem = _row_problem(record, columns, root)
        if problem:
            if not skip_bad_rows:
                raise DataFormatError(f"{path}, row {row}: {problem} (pass --skip-bad-rows to drop such rows).")
            skipped += 1
            continue
        item = {"image": str(root / record[columns.image]), "text": record[columns.text].strip(), "row": row}
        if columns.labels:
            item["labels"] = [_label_value(record[name], path, row, name) for name in columns.labels]
        records.append(item)
    if skipped:
        logger.warning("%s: skipped %d bad row(s) of %d.", path, skipped, skipped + len(records))
    if not records:
        raise DataFormatError(f"{path}: no usable rows" + (f" in split {split!r}." if split else "."))
    return datasets.Dataset.from_list(records)


def _row_problem(record: dict, columns: ImageTextColumns, root: Path) -> str | None:
    image, text = record[columns.image], record[columns.text]
    if not isinstance(image, str) or not image:
        return f"no image path in column {columns.image!r}"
    if not (root / image).is_file():
        return f"image file {root / image} not found"
    if not isinstance(text, str) or not text.strip():
        return f"empty report in column {columns.text!r}"
    return None


class ImageTextCollator:
    """Turns dataset rows into a model batch: decodes images (in DataLoader workers) and tokenizes reports.

    With `skip_bad_images`, an unreadable image drops its row from the batch and is counted in the batch's
    `num_skipped`; otherwise it raises `ImageLoadError` naming the table row and the file.
    """

    def __init__(self, processor: AceLoraProcessor, context_length: int, skip_bad_images: bool = False):
        self.processor = processor
        self.context_length = context_length
        self.skip_bad_images = skip_bad_images

    def _load(self, item: dict):
        try:
            return load_image(item["image"], name=f"row {item['row']}: {item['image']}")
        except ImageLoadError:
            if self.skip_bad_images:
                return None
            raise

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        loaded = [self._load(item) for item in items]
        kept = [(item, image) for item, image in zip(items, loaded) if image is not None]
        num_skipped = torch.tensor(len(items) - len(kept))
        if not kept:
            return {"num_skipped": num_skipped}
        items, images = zip(*kept)
        tokens = self.processor.tokenizer(
            [item["text"] for item in items], padding="max_length", truncation=True,
            max_length=self.context_length, return_tensors="pt",
        )
        batch = {
            "pixel_values": self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"],
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "num_skipped": num_skipped,
        }
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.float32)
        return batch


__all__ = ["CHEXPERT_LABELS", "ImageTextCollator", "ImageTextColumns", "load_image_text_dataset"]
