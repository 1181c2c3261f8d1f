"""The image path as it was before grayscale images stayed single-channel (commit 762a513), frozen as the reference
that the current path is timed against (`bench_pipeline.py`) and compared with (`tests/test_image_exactness.py`).

Only the pixel work is kept, for readable, valid files: `ace_lora_hf.models.ace_lora.image_loading.load_image` then
`AceLoraImageProcessor` as they were: every image became 8-bit RGB (deep data scaled in float64, DICOM LUTs applied to
every pixel in float64) and went through transformers' `PilBackend` steps in RGB. Do not speed this file up.
"""

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from transformers.image_processing_backends import PilBackend

from ace_lora_hf import AceLoraImageProcessor


DICOM_SUFFIXES = (".dcm", ".dicom")


def legacy_load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    with path.open("rb") as file:
        is_dicom = file.read(132)[128:132] == b"DICM"
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom:
        return _load_dicom(path)
    image = Image.open(path)
    image.load()
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image, dtype=np.float64))).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    low, high = pixels.min(), pixels.max()
    if high == low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def _load_dicom(path: Path) -> Image.Image:
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = pixels if pixels.dtype == np.uint8 else _scale_to_uint8(pixels.astype(np.float64))
        return Image.fromarray(np.ascontiguousarray(rgb))
    bits_stored = int(dataset.get("BitsStored", 8))
    transformed = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    if pixels.dtype == np.uint8 and bits_stored <= 8 and np.array_equal(transformed, pixels):
        gray = pixels if photometric == "MONOCHROME2" else (2**bits_stored - 1) - pixels
    else:
        gray = _scale_to_uint8(np.asarray(transformed, dtype=np.float64))
        if photometric == "MONOCHROME1":
            gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


class LegacyImageProcessor(AceLoraImageProcessor):
    """`AceLoraImageProcessor` as it was: its settings and center-crop rounding with transformers' `PilBackend` for
    every other step (RGB from the start, an RGB resize, rescale and normalise over three channels)."""

    process_image = PilBackend.process_image
    _preprocess = PilBackend._preprocess
    resize = PilBackend.resize
    rescale = PilBackend.rescale
    normalize = PilBackend.normalize


def legacy_pixel_values(path: str | Path, processor: LegacyImageProcessor | None = None) -> np.ndarray:
    """`pixel_values` of one image file, `(3, 224, 224)` float32, as the old path computed them."""
    processor = processor or LegacyImageProcessor()
    return processor(legacy_load_image(path), return_tensors="np")["pixel_values"][0]
