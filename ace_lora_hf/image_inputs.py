"""The images a command works on: files, folders (recursive), lists of paths, or a labelled CSV table."""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataFormatError, InvalidArgumentError


# What a folder contributes by default: common image files, and files without a suffix (as DICOM exports often are).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}


@dataclass
class ImageInputs:
    """Image paths as they will be named in the outputs, with their table's targets when there is one."""

    images: list[str]
    targets: list[int] | None = None
    sources: list[Path] | None = None  # the files the inputs were read from (tables, lists), never to be overwritten


def files_in_folder(folder: Path, patterns: Sequence[str] | None) -> list[Path]:
    """Files below `folder` (recursive, sorted): those matching a glob of `patterns`, or image-like files."""
    if patterns:
        found = {path for pattern in patterns for path in folder.rglob(pattern)}
    else:
        found = {path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES or not path.suffix}
    return sorted(path for path in found if path.is_file() and not path.name.startswith("."))


def collect_images(paths: Sequence[Path], patterns: Sequence[str] | None = None) -> list[str]:
    """Every file named, and every image file below every folder named, in the order given."""
    images = []
    for path in paths:
        if path.is_dir():
            found = files_in_folder(path, patterns)
            if not found:
                raise InvalidArgumentError(f"--images {path}: the folder holds no image files"
                                           f"{' matching ' + ', '.join(patterns) if patterns else ''}.")
            images.extend(str(file) for file in found)
        else:
            images.append(str(path))
    return images


def _read_text(path: Path, option: str) -> str:
    if not path.is_file():
        raise DataFormatError(f"{option} {path}: file not found.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{option} {path}: not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} "
                              f"at offset {error.start}); save it as UTF-8.") from None


def read_image_list(path: Path, root: Path | None = None) -> list[str]:
    """One path per line (blank lines and `#` comments skipped), relative to `root` or the list's folder."""
    root = root or path.parent
    lines = [line.strip() for line in _read_text(path, "--image-list").splitlines()]
    images = [str(root / line) for line in lines if line and not line.startswith("#")]
    if not images:
        raise DataFormatError(f"--image-list {path}: lists no images.")
    return images


def read_labelled_table(path: Path, root: Path | None = None) -> ImageInputs:
    """An RSNA-style CSV: `Path` (relative to `root` or the table's folder) and `Target` (0 or 1)."""
    rows = list(csv.DictReader(_read_text(path, "--csv").splitlines()))
    columns = set(rows[0]) if rows else set()
    missing = sorted({"Path", "Target"} - columns)
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}; found {sorted(columns)}.")
    root = root or path.parent
    targets = []
    for line, row in enumerate(rows, start=2):
        if row["Target"] not in ("0", "1"):
            raise DataFormatError(f"{path}, line {line}, column 'Target': {row['Target']!r} is not 0 or 1.")
        if not row["Path"]:
            raise DataFormatError(f"{path}, line {line}, column 'Path': empty; give the image's path.")
        targets.append(int(row["Target"]))
    return ImageInputs([str(root / row["Path"]) for row in rows], targets, [path])


__all__ = ["IMAGE_SUFFIXES", "ImageInputs", "collect_images", "read_image_list", "read_labelled_table"]
