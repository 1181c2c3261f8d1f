"""Labelled images from a prepared set (the folder `ace-lora-prepare training-set` writes): one split's rows, each of
the one class whose 0/1 label column holds 1, their images read from the set's Arrow files only when they are used.

A prepared set has no class-name column: its classes are label columns. A row with no positive among the chosen
classes, or with several, has no single class, and is left out (and counted, for the command to say so).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from ..data.prepared import PreparedImages, prepared_image_column, read_prepared_info
from ..errors import DataFormatError
from .sampling import LabelledImages


@dataclass(frozen=True)
class LeftOut:
    """Rows of a prepared split without a single class: none of the chosen classes at 1, or several."""

    no_positive: int = 0
    several_positives: int = 0

    @property
    def total(self) -> int:
        return self.no_positive + self.several_positives


def prepared_splits(folder: Path) -> list[str]:
    """The splits a prepared set has (e.g. train, validation)."""
    return list(datasets.load_from_disk(str(folder)))


def default_test_split(splits: Sequence[str]) -> str:
    """The split a prepared test set is scored on unless one is named: `test` where the set has one, else
    `validation` (the held-out share `--validation-fraction` makes)."""
    return "test" if "test" in splits else "validation"


def read_prepared_set(folder: Path, split: str, classes: Sequence[str] | None, option: str,
                      split_option: str) -> tuple[LabelledImages, LeftOut]:
    """The rows of `split` of the prepared set in `folder` with exactly one of `classes` (label columns; default all of
    the set's) at 1, as labelled images named `split[row]`, and the rows left out. `option` and `split_option` name
    the folder's and the split's options in messages."""
    info = read_prepared_info(folder)
    if info is None:
        raise DataFormatError(f"{option} {folder}: not a prepared set (no ace_lora_prepared.json); make one with "
                              "ace-lora-prepare training-set.")
    columns = list(info["label_columns"])
    saved = datasets.load_from_disk(str(folder))
    if split not in saved:
        raise DataFormatError(f"{option} {folder}: no split {split!r} (it has {', '.join(saved)}); choose one with "
                              f"{split_option}.")
    if not columns:
        raise DataFormatError(f"{option} {folder}: prepared without label columns, so its rows have no class; prepare "
                              "it again with --label-columns (one 0/1 column per class).")
    classes = tuple(classes) if classes else tuple(columns)
    unknown = [name for name in classes if name not in columns]
    if unknown:
        raise DataFormatError(f"{option} {folder}: no label column {unknown[0]!r} (it has {', '.join(columns)}); "
                              "choose classes among them with --labels.")
    rows = saved[split]
    values = rows.select_columns([*classes, "line"]).with_format("numpy")[:]
    positives = np.stack([values[name] == 1 for name in classes], axis=1)  # 0, -1 (uncertain), NaN: not this class
    counts = positives.sum(axis=1)
    kept = np.flatnonzero(counts == 1)
    if not len(kept):
        raise DataFormatError(f"{option} {folder}, split {split}: no row has exactly one of {list(classes)} at 1; "
                              "choose classes that its rows hold with --labels.")
    images = PreparedImages(rows, prepared_image_column(rows, f"{option} {folder}"), kept)
    labelled = LabelledImages(folder, images, [f"{split}[{row}]" for row in kept],
                              positives[kept].argmax(axis=1).astype(np.int64), classes,
                              values["line"][kept].tolist(), split)
    return labelled, LeftOut(int((counts == 0).sum()), int((counts > 1).sum()))


def check_apart(train: LabelledImages, test: LabelledImages) -> str | None:
    """Refuse test images that are also training images: two prepared splits made from the same table share no row
    of it. Returns a warning where their patients may still meet: splits drawn by row, from a table without a
    patient column. (Splits drawn by patient keep each patient's rows together, so rows apart are patients apart.)"""
    train_info, test_info = read_prepared_info(train.table), read_prepared_info(test.table)
    if train_info["source"] != test_info["source"]:
        return None
    table = train_info["source"].get("table")
    shared = sorted(set(train.lines) & set(test.lines))
    if shared:
        raise DataFormatError(f"{test.source}: {len(shared)} of its images are also in {train.source} (lines "
                              f"{', '.join(map(str, shared[:5]))}{', ...' if len(shared) > 5 else ''} of {table}); "
                              "score on images the shots cannot come from: another split or set.")
    if train_info.get("patient_disjoint") and test_info.get("patient_disjoint"):
        return None
    return (f"{train.source} and {test.source} come from one table ({table}) split by row, not by patient: a "
            "patient's images may be on both sides, which flatters the scores; prepare the set with --patient-column "
            "for patient-disjoint splits.")


__all__ = ["LeftOut", "check_apart", "default_test_split", "prepared_splits", "read_prepared_set"]
