"""Write small DICOM files with pydicom for tests."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid


def write_dicom(path: Path, pixels: np.ndarray | None, transfer_syntax=ExplicitVRLittleEndian,
                sop_class=CTImageStorage, **attributes) -> Path:
    """A minimal single-image DICOM (MONOCHROME2 unless `attributes` say otherwise)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientID = "test"
    if pixels is not None:
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        dataset.Rows, dataset.Columns = pixels.shape[-2:]
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = pixels.dtype.itemsize * 8
        dataset.BitsStored = pixels.dtype.itemsize * 8
        dataset.HighBit = dataset.BitsStored - 1
        dataset.PixelRepresentation = int(pixels.dtype.kind == "i")
        if frames > 1:
            dataset.NumberOfFrames = frames
        dataset.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    if transfer_syntax == JPEGLSLossless:
        from pydicom.encaps import encapsulate

        dataset.PixelData = encapsulate([b"\xff\xd8not-really-jpeg-ls\xff\xd9"])
    dataset.save_as(path, enforce_file_format=True)
    return path


def lut_item(first_mapped: int, bits: int, data: list[int]) -> Dataset:
    """One item of a VOI LUT or Modality LUT Sequence: `data[i]` is the output for stored value `first_mapped + i`."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(data), first_mapped, bits])
    item.add_new("LUTData", "US", data)
    return item
