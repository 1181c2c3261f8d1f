"""Load medical images (PNG/JPEG/TIFF in any PIL mode, DICOM) as 8-bit RGB PIL images for the processor."""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError


DICOM_SUFFIXES = (".dcm", ".dicom")
CODEC_HINT = (
    "install a decoder for it: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(JPEG, JPEG-LS, JPEG 2000) or pip install python-gdcm"
)


def load_image(source: str | Path | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """Read an X-ray or pathology image into an 8-bit RGB `PIL.Image`.

    Args:
        source: a path, the file's bytes, or an already opened PIL image.
        name: how errors refer to the image (defaults to the path, or `<bytes>`).

    DICOM files go through their Modality LUT (rescale slope/intercept) and VOI LUT (or window centre/width);
    MONOCHROME1 is inverted; data deeper than 8 bits is scaled to 0-255 over its full range. Other files are
    decoded by Pillow; 16-bit and float images are likewise scaled over their range.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, name or "<PIL image>")
    if isinstance(source, (bytes, bytearray)):
        name = name or "<bytes>"
        data = bytes(source)
        return _load_dicom(io.BytesIO(data), name) if _is_dicom_bytes(data) else _load_pil(io.BytesIO(data), name)
    path = Path(source)
    name = name or str(path)
    if not path.is_file():
        raise ImageLoadError(name, "file not found")
    with path.open("rb") as file:
        head = file.read(132)
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom_bytes(head):
        return _load_dicom(path, name)
    return _load_pil(path, name)


def _is_dicom_bytes(head: bytes) -> bool:
    return head[128:132] == b"DICM"


# -------------------------------------------------------------------------------------------------------- PIL


def _load_pil(file, name: str) -> Image.Image:
    try:
        image = Image.open(file)
        image.load()
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file Pillow can read (PNG, JPEG, TIFF, ...) nor a DICOM") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(name, f"the image data is corrupt or truncated ({error})") from error
    if getattr(image, "n_frames", 1) > 1:
        raise ImageLoadError(name, f"has {image.n_frames} frames; pass single-frame images")
    return _to_rgb(image, name)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image, dtype=np.float64), name)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels of a medical image carry no signal: show them black rather than their hidden colour.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(pixels: np.ndarray, name: str) -> np.ndarray:
    """Map the full range of `pixels` onto 0-255: no clipping, no lost contrast."""
    if not np.isfinite(pixels).all():
        raise ImageLoadError(name, "contains NaN or infinite pixel values")
    low, high = pixels.min(), pixels.max()
    if high == low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ DICOM


def _read_dicom(file, name: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(file)
    except InvalidDicomError as error:
        raise ImageLoadError(name, f"not a valid DICOM file ({error})") from error
    except (OSError, ValueError, EOFError) as error:
        raise ImageLoadError(name, f"the DICOM file is corrupt or truncated ({error})") from error
    # pydicom reads a cut-off file leniently, dropping what is missing with only a warning.
    ended_early = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if ended_early:
        raise ImageLoadError(name, f"the DICOM file is corrupt or truncated ({ended_early[0]})")
    return dataset


def _dicom_pixels(dataset, name: str) -> np.ndarray:
    if "PixelData" not in dataset:
        kind = dataset.get("SOPClassUID", None)
        kind = f" ({kind.name})" if kind is not None else ""
        raise ImageLoadError(name, f"the DICOM has no pixel data{kind}: not an image")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageLoadError(name, f"multi-frame DICOM ({frames} frames); pass single-frame images")
    try:
        return dataset.pixel_array
    except (RuntimeError, NotImplementedError) as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", None)
        syntax = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImageLoadError(name, f"cannot decode its {syntax} pixel data; {CODEC_HINT} ({error})") from error
    except (ValueError, OSError, AttributeError) as error:
        raise ImageLoadError(name, f"the DICOM pixel data is corrupt or truncated ({error})") from error


def _load_dicom(file, name: str) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    dataset = _read_dicom(file, name)
    pixels = _dicom_pixels(dataset, name)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = pixels if pixels.dtype == np.uint8 else _scale_to_uint8(pixels.astype(np.float64), name)
        return Image.fromarray(np.ascontiguousarray(rgb))
    if not photometric.startswith("MONOCHROME"):
        raise ImageLoadError(name, f"unsupported photometric interpretation {photometric!r}")
    bits_stored = int(dataset.get("BitsStored", 8))
    transformed = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    if pixels.dtype == np.uint8 and bits_stored <= 8 and np.array_equal(transformed, pixels):
        # Plain 8-bit data is shown as stored (the common JPEG-compressed CR/DX case).
        gray = pixels if photometric == "MONOCHROME2" else (2**bits_stored - 1) - pixels
    else:
        gray = _scale_to_uint8(np.asarray(transformed, dtype=np.float64), name)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


__all__ = ["load_image"]
