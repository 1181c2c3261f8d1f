#!/usr/bin/env python
"""SIIM-ACR Pneumothorax Segmentation -> classification table and binary masks.

    python dataset_prep/siim.py --input siim-acr-pneumothorax/ --output siim/

--input holds `stage_2_train.csv` (ImageId, EncodedPixels; "-1" for no pneumothorax, several rows for an image
with several annotations) and `stage_2_images/<ImageId>.dcm`. Masks are decoded from the competition's relative
run-length format (pairs of offset from the end of the previous run and run length, over the column-major
pixel order) and every annotation of an image is merged. Writes:
- `siim_classification.csv`: Path, Target, split (train 70% / test 30%, seed 42): the zero-shot test set;
- `masks/<ImageId>.png` (0/255, the DICOM's size) and `siim_segmentation.csv`: Path, Mask (relative to --output), split
  (train 70% / valid 15% / test 15%, seed 42).
The splits divide patients (PatientID, read from each DICOM's header), not images: all images of a patient are in
one split, so no test score comes from a patient the model was trained on.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from tqdm import tqdm

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError
from ace_lora_hf.outputs.safe_outputs import atomic_folder
from ace_lora_hf.data.tables import Row
from dataset_prep._common import (Table, check_test_split_has_both_targets, locked_outputs, parser, read_rows,
                                  require_dir, split_ids, write_tables)


LABELS_FILE = "stage_2_train.csv"
IMAGES_DIR = "stage_2_images"
CLASSIFICATION_TABLE, SEGMENTATION_TABLE, MASKS_DIR = "siim_classification.csv", "siim_segmentation.csv", "masks"
NO_PNEUMOTHORAX = "-1"
RLE_EXPECTED = "-1 or run-length pairs of whole numbers (offset >= 0, length >= 1)"


def parse_rle(encoded: str) -> list[tuple[int, int]]:
    """The (offset, length) runs of SIIM's relative run-length string; a ValueError says what is malformed."""
    tokens = encoded.split()
    if not tokens:
        raise ValueError("no run-length values")
    malformed = next((token for token in tokens if not (token.isascii() and token.isdigit())), None)
    if malformed is not None:
        raise ValueError(f"{malformed!r} is not a whole number >= 0")
    if len(tokens) % 2:
        raise ValueError(f"an odd number ({len(tokens)}) of values, but runs are offset-length pairs")
    values = [int(token) for token in tokens]
    runs = list(zip(values[0::2], values[1::2]))
    if any(length == 0 for _, length in runs):
        raise ValueError("a run of length 0")
    return runs


def decode_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """A `[height, width]` uint8 mask (0/1) from SIIM's relative, column-major run-length string."""
    flat = np.zeros(height * width, dtype=np.uint8)
    position = 0
    for offset, length in parse_rle(encoded):
        position += offset
        if position + length > flat.size:
            raise ValueError(f"a run at {position}+{length} outside the {width}x{height} image")
        flat[position : position + length] = 1
        position += length
    return flat.reshape(width, height).T


@dataclass
class Annotations:
    """One image's rows of the run-length table: its distinct run-length strings, or the line saying it has none."""

    first_line: int
    runs: dict[str, int] = field(default_factory=dict)  # run-length string -> its first line
    negative_line: int | None = None


def read_annotations(labels_path: Path) -> dict[str, Annotations]:
    """Every image's annotations, each run-length string checked; "-1" and a mask for one image are refused."""
    images: dict[str, Annotations] = {}
    for row in tqdm(read_rows(labels_path, ["ImageId", "EncodedPixels"], "SIIM's run-length table"), desc="rows"):
        image_id = row.file_name("ImageId")
        image = images.setdefault(image_id, Annotations(row.line))
        encoded = row.text("EncodedPixels", RLE_EXPECTED)
        if encoded == NO_PNEUMOTHORAX:
            image.negative_line = image.negative_line or row.line
        else:
            _check_rle(row, encoded, image_id)
            image.runs.setdefault(encoded, row.line)
        if image.runs and image.negative_line:
            raise DataFormatError(f"{labels_path}, line {row.line}: image {image_id!r} has both "
                                  f"a mask (line {min(image.runs.values())}) and -1, no pneumothorax (line "
                                  f"{image.negative_line}); remove the contradicting row.")
    return images


def _check_rle(row: Row, encoded: str, image_id: str) -> None:
    try:
        parse_rle(encoded)
    except ValueError as problem:
        raise row.error("EncodedPixels", f"{RLE_EXPECTED} ({problem}; ImageId {image_id})") from None


def image_headers(images_dir: Path, images: dict[str, Annotations],
                  labels_path: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Every image's (height, width) and patient, read from its DICOM header, with each of its runs checked to fit."""
    sizes, patients = {}, {}
    for image_id, annotations in tqdm(sorted(images.items()), desc="DICOM headers"):
        cited_by = f"{labels_path}, line {annotations.first_line}"
        height, width, patients[image_id] = dicom_header(images_dir, image_id, cited_by)
        sizes[image_id] = height, width
        for encoded, line in annotations.runs.items():
            end = sum(offset + length for offset, length in parse_rle(encoded))
            if end > height * width:
                raise DataFormatError(f"{labels_path}, line {line}, column 'EncodedPixels': the runs reach pixel "
                                      f"{end}, beyond the {width}x{height} image {image_id}; use the release's table "
                                      "and images.")
    return sizes, patients


def dicom_header(images_dir: Path, image_id: str, cited_by: str) -> tuple[int, int, str]:
    """(height, width, PatientID) from the header of `image_id`'s DICOM; `cited_by` names the table row that needs
    it."""
    path = images_dir / f"{image_id}.dcm"
    if not path.is_file():
        raise DataFormatError(f"{cited_by}: {path}, the DICOM of image {image_id!r}, not found; download the whole "
                              f"{IMAGES_DIR} folder.")
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        height, width = int(header.Rows), int(header.Columns)
        patient = str(header.get("PatientID", "")).strip()
    except (pydicom.errors.InvalidDicomError, AttributeError, EOFError, ValueError, TypeError) as error:
        raise DataFormatError(f"{path}: not a readable image DICOM ({error}); download it again.") from None
    if height < 1 or width < 1:
        raise DataFormatError(f"{path}: an image of {width}x{height} pixels; download it again.")
    if not patient:
        raise DataFormatError(f"{path}: no PatientID in its header, which the splits need to keep each patient's "
                              "images together; download it again.")
    return height, width, patient


def write_masks(masks_dir: Path, images: dict[str, Annotations], sizes: dict[str, tuple[int, int]]) -> None:
    for image_id, annotations in tqdm(sorted(images.items()), desc="masks"):
        mask = np.zeros(sizes[image_id], dtype=np.uint8)
        for encoded in annotations.runs:
            mask |= decode_rle(encoded, *mask.shape)
        Image.fromarray(mask * 255).save(masks_dir / f"{image_id}.png")


def split_tables(images: dict[str, Annotations], patients: dict[str, str], labels_path: Path) -> dict[str, Table]:
    """The classification and segmentation tables, with their seeded splits of the patients."""
    ids = sorted(images)
    targets = {i: int(bool(images[i].runs)) for i in ids}
    classification = by_patient(split_ids(set(patients.values()), {"train": 0.7, "test": 0.3}, seed=42), patients)
    check_test_split_has_both_targets(classification, targets, labels_path)
    segmentation = by_patient(split_ids(set(patients.values()), {"train": 0.7, "valid": 0.15, "test": 0.15}, seed=42),
                              patients)
    paths = {i: f"{IMAGES_DIR}/{i}.dcm" for i in ids}
    return {
        CLASSIFICATION_TABLE: ([{"Path": paths[i], "Target": targets[i], "split": classification[i]} for i in ids],
                               ["Path", "Target", "split"]),
        SEGMENTATION_TABLE: ([{"Path": paths[i], "Mask": f"{MASKS_DIR}/{i}.png", "split": segmentation[i]}
                              for i in ids], ["Path", "Mask", "split"]),
    }


def by_patient(patient_splits: dict[str, str], patients: dict[str, str]) -> dict[str, str]:
    """Each image's split: its patient's."""
    return {image_id: patient_splits[patient] for image_id, patient in patients.items()}


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    labels_path, images_dir = input_dir / LABELS_FILE, input_dir / IMAGES_DIR
    with locked_outputs(output_dir, [labels_path, images_dir], overwrite, [CLASSIFICATION_TABLE, SEGMENTATION_TABLE],
                        {MASKS_DIR: "*.png"}):
        images = read_annotations(labels_path)
        sizes, patients = image_headers(require_dir(images_dir, "the DICOM folder"), images, labels_path)
        tables = split_tables(images, patients, labels_path)
        # The tables are committed just before the masks folder, and neither when anything fails.
        with atomic_folder(output_dir / MASKS_DIR) as masks_dir:
            write_masks(masks_dir, images, sizes)
            write_tables(output_dir, tables)
        print(f"wrote {output_dir / MASKS_DIR} ({len(images)} masks)")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    args = parser(__doc__, prog).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
