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
"""

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from tqdm import tqdm

from dataset_prep._common import (LayoutError, output_paths, parser, read_table, require_dir, split_ids,
                                  write_csv)


LABELS_FILE = "stage_2_train.csv"
IMAGES_DIR = "stage_2_images"


def decode_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """A `[height, width]` uint8 mask (0/1) from SIIM's relative, column-major run-length string."""
    values = np.asarray(encoded.split(), dtype=np.int64)
    if values.size % 2:
        raise ValueError("an odd number of run-length values")
    flat = np.zeros(height * width, dtype=np.uint8)
    position = 0
    for offset, length in zip(values[0::2], values[1::2]):
        position += offset
        if position < 0 or position + length > flat.size:
            raise ValueError(f"a run at {position}+{length} outside the {width}x{height} image")
        flat[position : position + length] = 1
        position += length
    return flat.reshape(width, height).T


def image_size(path: Path) -> tuple[int, int]:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Rows), int(header.Columns)
    except (pydicom.errors.InvalidDicomError, AttributeError, OSError) as error:
        raise LayoutError(f"{path}: not a readable image DICOM ({error}).") from error


def annotations(labels_path: Path) -> dict[str, list[str]]:
    table = read_table(labels_path, ["ImageId", "EncodedPixels"], "SIIM's run-length table", dtype=str,
                       keep_default_na=False)
    encoded: dict[str, list[str]] = {}
    for image_id, rle in zip(table["ImageId"], table["EncodedPixels"]):
        runs = encoded.setdefault(image_id.strip(), [])
        if rle.strip() != "-1":
            runs.append(rle.strip())
    return encoded


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    labels_path = input_dir / LABELS_FILE
    encoded = annotations(labels_path)
    images_dir = require_dir(input_dir / IMAGES_DIR, "the DICOM folder")
    classification_path, segmentation_path, masks_dir = output_paths(
        output_dir, ["siim_classification.csv", "siim_segmentation.csv", "masks"], overwrite
    )
    masks_dir.mkdir(exist_ok=True)
    for image_id, runs in tqdm(sorted(encoded.items()), desc="masks"):
        image = images_dir / f"{image_id}.dcm"
        if not image.is_file():
            raise LayoutError(f"{image} not found: every image of {LABELS_FILE} needs its DICOM.")
        mask = np.zeros(image_size(image), dtype=np.uint8)
        for index, rle in enumerate(runs):
            try:
                mask |= decode_rle(rle, *mask.shape)
            except ValueError as error:
                raise LayoutError(f"{labels_path}: annotation {index + 1} of {image_id}: {error}.") from error
        Image.fromarray(mask * 255).save(masks_dir / f"{image_id}.png")
    ids = sorted(encoded)
    classification = split_ids(ids, {"train": 0.7, "test": 0.3}, seed=42)
    segmentation = split_ids(ids, {"train": 0.7, "valid": 0.15, "test": 0.15}, seed=42)
    test_targets = {int(bool(encoded[i])) for i in ids if classification[i] == "test"}
    if test_targets != {0, 1}:
        raise LayoutError(f"{labels_path}: the test split holds only Target {sorted(test_targets)}.")
    paths = {i: f"{IMAGES_DIR}/{i}.dcm" for i in ids}
    write_csv(classification_path, [{"Path": paths[i], "Target": int(bool(encoded[i])), "split": classification[i]}
                                    for i in ids], ["Path", "Target", "split"])
    write_csv(segmentation_path, [{"Path": paths[i], "Mask": f"masks/{i}.png", "split": segmentation[i]}
                                  for i in ids], ["Path", "Mask", "split"])


def main(argv=None) -> None:
    args = parser(__doc__).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    main()
