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
from pathlib import Path

from tqdm import tqdm

from dataset_prep._common import (LayoutError, output_paths, parser, read_table, require_dir, split_ids,
                                  write_csv)


LABELS_FILE = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"


def patient_records(labels_path: Path, images_dir: Path) -> dict[str, dict]:
    """Per patient: the image path, the target and the boxes, with every row checked."""
    table = read_table(labels_path, ["patientId", "x", "y", "width", "height", "Target"], "RSNA's box table",
                       dtype={"patientId": str})
    patients: dict[str, dict] = {}
    for line, row in tqdm(enumerate(table.itertuples(index=False), start=2), total=len(table), desc="rows"):
        target = int(row.Target)
        if target not in (0, 1):
            raise LayoutError(f"{labels_path}, line {line}: Target is {row.Target!r}, expected 0 or 1.")
        record = patients.setdefault(row.patientId, {"Target": target, "boxes": []})
        if record["Target"] != target:
            raise LayoutError(f"{labels_path}, line {line}: patient {row.patientId} has both Target 0 and 1.")
        if target == 1:
            box = [row.x, row.y, row.width, row.height]
            if any(value != value for value in box):  # NaN
                raise LayoutError(f"{labels_path}, line {line}: a positive row without its box.")
            record["boxes"].append([row.x, row.y, row.x + row.width, row.y + row.height])
    for patient_id, record in patients.items():
        image = images_dir / f"{patient_id}.dcm"
        if not image.is_file():
            raise LayoutError(f"{image} not found: every patient of {labels_path.name} needs its DICOM.")
        record["Path"] = f"{images_dir.name}/{patient_id}.dcm"
    return patients


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    classification_path, detection_path = output_paths(
        output_dir, ["rsna_classification.csv", "rsna_detection.csv"], overwrite
    )
    patients = patient_records(input_dir / LABELS_FILE, require_dir(input_dir / IMAGES_DIR, "the DICOM folder"))
    splits = split_ids(patients, {"train": 0.85, "test": 0.15}, seed=0)
    test_targets = {patients[p]["Target"] for p, split in splits.items() if split == "test"}
    if test_targets != {0, 1}:
        raise LayoutError(f"{input_dir / LABELS_FILE}: the test split holds only Target {sorted(test_targets)}.")
    write_csv(classification_path,
              [{"Path": r["Path"], "Target": r["Target"], "split": splits[p]} for p, r in sorted(patients.items())],
              ["Path", "Target", "split"])
    positives = sorted(p for p, r in patients.items() if r["Target"] == 1)
    detection_splits = split_ids(positives, {"train": 0.7, "valid": 0.15, "test": 0.15}, seed=0)
    rows = [{"Path": patients[p]["Path"], "boxes": json.dumps(patients[p]["boxes"]), "split": detection_splits[p]}
            for p in positives]
    write_csv(detection_path, rows, ["Path", "boxes", "split"])


def main(argv=None) -> None:
    args = parser(__doc__).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    main()
