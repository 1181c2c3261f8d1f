#!/usr/bin/env python
"""RSNA Pneumonia Detection Challenge -> classification and detection tables.

    python dataset_prep/rsna.py --input rsna-pneumonia-detection-challenge/ --output rsna/

--input holds `stage_2_train_labels.csv` (patientId, x, y, width, height, Target; one row per box, one row with
empty box for a negative patient) and `stage_2_train_images/<patientId>.dcm`. Writes:
- `rsna_classification.csv`: Path, Target, split (train 85% / test 15%, seed 0): the zero-shot test set;
- `rsna_detection.csv`: positive patients only, Path, boxes (JSON [[x1, y1, x2, y2], ...] in pixels), split
  (train 70% / valid 15% / test 15%, seed 0).
"""

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError
from ace_lora_hf.data.tables import Row
from dataset_prep._common import (Table, check_consistent, check_test_split_has_both_targets, locked_outputs, parser,
                                  read_rows, require_dir, split_ids, write_tables)


LABELS_FILE = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
CLASSIFICATION_TABLE, DETECTION_TABLE = "rsna_classification.csv", "rsna_detection.csv"
BOX_COLUMNS = ("x", "y", "width", "height")


def box_of(row: Row, target: int) -> list[float] | None:
    """The row's box as [x1, y1, x2, y2]; a positive row needs one, a negative row has none."""
    if target == 0:
        for column in BOX_COLUMNS:
            if row.cells[column].strip():
                raise row.error(column, "empty: a Target 0 row has no box")
        return None
    x, y = row.number("x"), row.number("y")
    return [x, y, x + row.number("width", positive=True), y + row.number("height", positive=True)]


def patient_records(labels_path: Path, images_dir: Path) -> dict[str, dict]:
    """Per patient: the image path, the target and the boxes, with every row checked."""
    patients: dict[str, dict] = {}
    first_rows: dict = {}
    for row in tqdm(read_rows(labels_path, ["patientId", *BOX_COLUMNS, "Target"], "RSNA's box table"), desc="rows"):
        patient_id, target = row.file_name("patientId"), row.label("Target", (0, 1))
        check_consistent(first_rows, patient_id, {"Target": target}, row, "patientId")
        record = patients.setdefault(patient_id, {"Target": target, "boxes": []})
        box = box_of(row, target)
        if box is not None and box not in record["boxes"]:  # a repeated row adds no second copy of its box
            record["boxes"].append(box)
    for patient_id, record in patients.items():
        image = images_dir / f"{patient_id}.dcm"
        if not image.is_file():
            raise DataFormatError(f"{labels_path}, line {first_rows[patient_id][1]}: {image}, the DICOM of patient "
                                  f"{patient_id!r}, not found; download the whole {IMAGES_DIR} folder.")
        record["Path"] = f"{images_dir.name}/{patient_id}.dcm"
    return patients


def split_tables(patients: dict[str, dict], labels_path: Path) -> dict[str, Table]:
    """The classification table of every patient and the detection table of the positive ones, seeded splits."""
    splits = split_ids(patients, {"train": 0.85, "test": 0.15}, seed=0)
    check_test_split_has_both_targets(splits, {p: r["Target"] for p, r in patients.items()}, labels_path)
    positives = sorted(p for p, r in patients.items() if r["Target"] == 1)
    detection_splits = split_ids(positives, {"train": 0.7, "valid": 0.15, "test": 0.15}, seed=0)
    return {
        CLASSIFICATION_TABLE: ([{"Path": r["Path"], "Target": r["Target"], "split": splits[p]}
                                for p, r in sorted(patients.items())], ["Path", "Target", "split"]),
        DETECTION_TABLE: ([{"Path": patients[p]["Path"], "boxes": json.dumps(patients[p]["boxes"]),
                            "split": detection_splits[p]} for p in positives], ["Path", "boxes", "split"]),
    }


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    labels_path = input_dir / LABELS_FILE
    with locked_outputs(output_dir, [labels_path], overwrite, [CLASSIFICATION_TABLE, DETECTION_TABLE]):
        patients = patient_records(labels_path, require_dir(input_dir / IMAGES_DIR, "the DICOM folder"))
        write_tables(output_dir, split_tables(patients, labels_path))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    args = parser(__doc__, prog).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
