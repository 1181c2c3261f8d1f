"""Tables of training and evaluation data: one reader for every prepared table, the image-report pairs of
pretraining and the image-label rows of zero-shot validation. Images are decoded lazily, in DataLoader workers.

Every problem a table can have (missing file or column, malformed CSV, an encoding other than UTF-8, a value that is
not what its column holds, a missing image) is a `DataFormatError` naming the file, the row and the column, found
when the table is read, before any model is loaded.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pandas as pd
import torch
from transformers.utils import logging

from ..errors import DataFormatError, ImageLoadError
from ..models.ace_lora.image_loading import load_image
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from .pixels import stacked_pixels
from .tables import read_table_rows


logger = logging.get_logger(__name__)

# The 14 CheXpert labels of MIMIC-CXR (mimic-cxr-2.0.0-chexpert.csv), in that file's order.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)


# ------------------------------------------------------------------------------------------------------ tables


def read_table(
    path: str | Path,
    columns: Sequence[str],
    option: str = "--table",
    split: str | None = None,
    split_column: str = "split",
    column_advice: str = "",
    unique: str | None = None,
) -> pd.DataFrame:
    """The rows of a CSV or JSON Lines table (read by `ace_lora_hf.data.tables`) as strings (an empty cell is `""`),
    checked to have `columns`. With `split`, only the rows whose `split_column` holds it. A value of the `unique`
    column listed twice is refused (an image counted twice skews every metric). The frame's index is each row's line
    in the file, for messages."""
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{option} {path}: a folder; give the table's file.")
    wanted = [*columns, *([split_column] if split else [])]
    rows = list(read_table_rows(path, wanted, f"the {option} table", column_advice))
    frame = pd.DataFrame([row.cells for row in rows], index=[row.line for row in rows], columns=wanted)
    if split:
        frame = frame[frame[split_column] == split]
    if frame.empty:
        where = f" in split {split!r} (column {split_column!r})" if split else ""
        raise DataFormatError(f"{path}: no rows{where}.")
    if unique is not None:
        _check_listed_once(frame[unique], path, unique)
    return frame


def _check_listed_once(values: pd.Series, path: Path, column: str) -> None:
    repeated = values[values.duplicated()]
    if not repeated.empty:
        line, value = repeated.index[0], repeated.iloc[0]
        first = values.index[(values == value).argmax()]
        raise DataFormatError(f"{path}, line {line}: column {column!r} lists {value!r} again (first on line {first}); "
                              "remove the repeated row.")


def numbered_rows(frame: pd.DataFrame) -> Iterator[tuple[int, dict]]:
    """`(line, record)` of each row of a table read by `read_table`."""
    return zip(frame.index, frame.to_dict("records"))


def parse_number(value: str, allowed: Sequence[float], path: Path, line: int, column: str,
                 allow_empty: bool = True) -> float:
    """A table cell that must be one of `allowed`, or empty (NaN: a missing value) if `allow_empty`."""
    if allow_empty and value.strip() == "":
        return math.nan
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number not in allowed:
        expected = ", ".join(f"{v:g}" for v in allowed) + (" or empty" if allow_empty else "")
        raise DataFormatError(f"{path}, line {line}: column {column!r} is {value!r}; expected one of {expected}.")
    return number


def missing_file(root: Path, relative: str, column: str) -> str | None:
    """What is wrong with the file a cell names (relative to `root`), or None if it exists."""
    if not relative:
        return f"no file name in column {column!r}"
    if not (root / relative).is_file():
        return f"file {root / relative} (column {column!r}) not found"
    return None


# ----------------------------------------------------------------------------------------- image-report pairs


@dataclass
class ImageTextColumns:
    """Which columns of the table hold what. `labels=()` trains without labels (plain InfoNCE)."""

    image: str = "image"
    text: str = "report"
    split: str = "split"
    labels: Sequence[str] = field(default_factory=lambda: CHEXPERT_LABELS)
    patient: str | None = None


def load_image_text_dataset(
    path: str | Path,
    columns: ImageTextColumns = ImageTextColumns(),
    image_root: str | Path | None = None,
    split: str | None = None,
    skip_bad_rows: bool = False,
    option: str = "--train_file",
) -> datasets.Dataset:
    """Read and check an image-report table.

    Returns a dataset (Arrow-backed, so DataLoader workers share it rather than copy it) with `image` (resolved
    path), `text`, `line` (the row's line in the table, for messages) and, with label columns, `labels` (floats; NaN
    and -1 kept, the loss treats both as absent). A row whose image file is missing or whose report is empty raises
    `DataFormatError`, or is dropped and counted when `skip_bad_rows`; a label that is not 1, 0, -1 or empty always
    raises.
    """
    path = Path(path)
    advice = "Name yours with --image_column / --text_column / --label_columns (or --no_labels)."
    patient = [columns.patient] if columns.patient else []
    frame = read_table(path, [columns.image, columns.text, *columns.labels, *patient], option, split, columns.split,
                       advice)
    root = Path(image_root) if image_root is not None else path.parent
    records, skipped = {"image": [], "text": [], "line": [], "labels": [], "patient": []}, 0
    for line, record in numbered_rows(frame):
        labels = [parse_number(record[name], (1.0, 0.0, -1.0), path, line, name) for name in columns.labels]
        problem = missing_file(root, record[columns.image], columns.image)
        if problem is None and not record[columns.text].strip():
            problem = f"empty report in column {columns.text!r}"
        if problem is None and patient and not record[columns.patient].strip():
            problem = f"no patient in column {columns.patient!r}"
        if problem:
            if not skip_bad_rows:
                raise DataFormatError(f"{path}, line {line}: {problem} (pass --skip_bad_rows to drop such rows).")
            skipped += 1
            continue
        records["image"].append(str(root / record[columns.image]))
        records["text"].append(record[columns.text].strip())
        records["line"].append(line)
        records["labels"].append(labels)
        records["patient"].append(record[columns.patient].strip() if patient else "")
    if skipped:
        logger.warning("%s: skipped %d bad row(s) of %d.", path, skipped, len(frame))
    if not records["line"]:
        raise DataFormatError(f"{path}: no usable rows" + (f" in split {split!r}." if split else "."))
    if not columns.labels:
        del records["labels"]
    if not patient:
        del records["patient"]
    return datasets.Dataset.from_dict(records)


class ImageTextCollator:
    """Turns dataset rows into a model batch: decodes images (in DataLoader workers) and tokenizes reports with the
    processor, which owns the tokenisation settings (context length, padding, truncation).

    Rows come from `load_image_text_dataset` (`image` a path, `text`, `line`, `labels` a list) or, with
    `columns`, from a `datasets` dataset: its image column holds paths (relative to `image_root`, if given, else to
    the working folder), PIL images or `{"bytes", "path"}` (the `Image` feature with `decode=False`), and each label
    is a column of its own (1, 0, -1 or empty).

    With `skip_bad_images`, an unreadable image drops its row from the batch and is counted in the batch's
    `num_skipped` (a batch may end up with no rows: only `num_skipped`); otherwise it raises `ImageLoadError` naming
    the table row and the file. With `uint8_pixels` (rows of a prepared set, whose images have the processor's size
    already), `pixel_values` are the images' 8-bit pixels, for `PixelTable` to finish on the device.
    """

    def __init__(self, processor: AceLoraProcessor, skip_bad_images: bool = False,
                 columns: ImageTextColumns | None = None, uint8_pixels: bool = False, image_root: Path | None = None):
        self.processor = processor
        self.skip_bad_images = skip_bad_images
        self.columns = columns
        self.uint8_pixels = uint8_pixels
        self.image_root = image_root

    def _load(self, item: dict):
        source = item[self.columns.image] if self.columns else item["image"]
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, str) and self.image_root is not None:
            source = str(self.image_root / source)  # an absolute path stays as it is
        where = f"line {item['line']}" if "line" in item else f"a row of column {self.columns.image!r}"
        try:
            return load_image(source, name=f"{where}: {source}" if isinstance(source, str) else where)
        except ImageLoadError:
            if self.skip_bad_images:
                return None
            raise

    def _labels(self, items: Sequence[dict]) -> torch.Tensor | None:
        if self.columns is None:
            return torch.tensor([item["labels"] for item in items], dtype=torch.float32) if "labels" in items[0] \
                else None
        if not self.columns.labels:
            return None
        labels = torch.tensor([[math.nan if item[name] is None else float(item[name]) for name in self.columns.labels]
                               for item in items], dtype=torch.float32)
        valid = labels.isnan() | (labels == 1) | (labels == 0) | (labels == -1)
        if not valid.all():
            column = self.columns.labels[int(valid.all(dim=0).logical_not().nonzero()[0])]
            raise DataFormatError(f"label column {column!r} holds {labels[~valid][0].item():g}; expected 1, 0, -1 or "
                                  "empty (pass the label columns with --label_columns, or --no_labels).")
        return labels

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        loaded = [self._load(item) for item in items]
        kept = [(item, image) for item, image in zip(items, loaded) if image is not None]
        num_skipped = torch.tensor(len(items) - len(kept))
        if not kept:
            return {"num_skipped": num_skipped}
        items, images = zip(*kept)
        texts = [str(item[self.columns.text] if self.columns else item["text"]).strip() for item in items]
        if self.uint8_pixels:
            inputs = self.processor(text=texts, return_tensors="pt")
            batch = {"pixel_values": stacked_pixels(images), "input_ids": inputs["input_ids"],
                     "attention_mask": inputs["attention_mask"]}
        else:
            inputs = self.processor(images=list(images), text=texts, return_tensors="pt")
            batch = {name: inputs[name] for name in ("pixel_values", "input_ids", "attention_mask")}
        batch["num_skipped"] = num_skipped
        labels = self._labels(items)
        if labels is not None:
            batch["labels"] = labels
        return batch


# ------------------------------------------------------------------------------------------ image-label rows


def read_image_labels(path: str | Path, image_root: str | Path | None, num_classes: int = 2,
                      option: str = "--validation_file") -> list[tuple[Path, int]]:
    """The rows `Path` (an image, relative to `image_root`, default the table's folder) and `Target` (a class index)
    of a prepared classification table (RSNA-style), every row checked."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    classes = tuple(float(index) for index in range(num_classes))
    items = []
    for line, record in numbered_rows(read_table(path, ["Path", "Target"], option, unique="Path")):
        problem = missing_file(root, record["Path"], "Path")
        if problem:
            raise DataFormatError(f"{path}, line {line}: {problem}.")
        target = parse_number(record["Target"], classes, path, line, "Target", allow_empty=False)
        items.append((root / record["Path"], int(target)))
    return items


class ImageClassificationSet(torch.utils.data.Dataset):
    """Images with their class (see `read_image_labels`) as `{"pixel_values", "labels"}` items."""

    def __init__(self, items: list[tuple[Path, int]], image_processor):
        self.items, self.image_processor = items, image_processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, target = self.items[index]
        pixels = self.image_processor(load_image(path), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": target}


__all__ = ["CHEXPERT_LABELS", "ImageClassificationSet", "ImageTextCollator", "ImageTextColumns",
           "load_image_text_dataset", "missing_file", "numbered_rows", "parse_number",
           "read_image_labels", "read_table"]
