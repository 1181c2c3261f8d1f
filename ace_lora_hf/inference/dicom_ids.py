"""The identifiers that join a result back to a PACS worklist: a DICOM input's study, series and instance UIDs.

Only the header is read (`stop_before_pixels`), a second, cheap read beside the decoding, so the identifiers come
back for every DICOM row, including one whose pixels could not be decoded. These are identifiers of a patient's
examination: a results file that carries them is as sensitive as the worklist itself.
"""

import logging
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError


logger = logging.getLogger(__name__)

DICOM_ID_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ViewPosition")
# The identifiers a row needs to be joined back; ViewPosition is optional in the standard (Type 2C).
REQUIRED_ID_FIELDS = DICOM_ID_FIELDS[:3]
NOT_DICOM_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
PREAMBLE_LENGTH = 128


def is_dicom(path: str | Path) -> bool:
    """Whether `path` holds a DICOM file: its `DICM` marker after the 128-byte preamble (image suffixes skip the read)."""
    path = Path(path)
    if path.suffix.lower() in NOT_DICOM_SUFFIXES:
        return False
    try:
        with path.open("rb") as file:
            file.seek(PREAMBLE_LENGTH)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def any_dicom(paths: Iterable[str | Path]) -> bool:
    return any(map(is_dicom, paths))


def dicom_ids(path: str | Path) -> dict[str, str]:
    """`DICOM_ID_FIELDS` of the file at `path`: "" for a field its header lacks, all "" where it is not DICOM."""
    ids = dict.fromkeys(DICOM_ID_FIELDS, "")
    if not is_dicom(path):
        return ids
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(DICOM_ID_FIELDS))
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        logger.warning("%s: its DICOM header is unreadable (%s); the row's UID fields are empty", path, error)
        return ids
    ids.update({field: str(header.get(field, "") or "") for field in DICOM_ID_FIELDS})
    return ids


def missing_ids(ids: dict[str, str]) -> list[str]:
    """The join identifiers that `ids` lacks."""
    return [field for field in REQUIRED_ID_FIELDS if not ids.get(field)]


__all__ = ["DICOM_ID_FIELDS", "any_dicom", "dicom_ids", "is_dicom", "missing_ids"]
