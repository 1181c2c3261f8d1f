"""The images a command works on: files, folders (recursive), lists of paths, or a labelled CSV table."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.image_tables import numbered_rows, parse_number, read_table
from ..errors import DataFormatError, InvalidArgumentError
from ..data.tables import read_text


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


def read_image_list(path: Path, root: Path | None = None) -> list[str]:
    """One path per line (blank lines and `#` comments skipped), relative to `root` or the list's folder."""
    root = root or path.parent
    lines = [line.strip() for line in read_text(path, "--image-list: a file with one image path per line").splitlines()]
    images = [str(root / line) for line in lines if line and not line.startswith("#")]
    if not images:
        raise DataFormatError(f"--image-list {path}: lists no images.")
    return images


def read_labelled_table(path: Path, root: Path | None = None) -> ImageInputs:
    """An RSNA-style table: `Path` (relative to `root` or the table's folder) and `Target` (0 or 1). The images are
    not checked here: one that is missing is reported and skipped like any unreadable image."""
    root = root or path.parent
    images, targets = [], []
    for line, record in numbered_rows(read_table(path, ["Path", "Target"], "--csv", unique="Path")):
        if not record["Path"].strip():
            raise DataFormatError(f"{path}, line {line}: column 'Path' is empty; give the image's path.")
        images.append(str(root / record["Path"]))
        targets.append(int(parse_number(record["Target"], (0.0, 1.0), path, line, "Target", allow_empty=False)))
    return ImageInputs(images, targets, [path])


__all__ = ["IMAGE_SUFFIXES", "ImageInputs", "collect_images", "read_image_list", "read_labelled_table"]
