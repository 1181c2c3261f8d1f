"""Load medical images (PNG/JPEG/TIFF in any PIL mode, DICOM) as 8-bit PIL images for the processor: mode "L" for
grayscale data, "RGB" for colour."""

import io
import stat
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError


DICOM_SUFFIXES = (".dcm", ".dicom")
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
TRANSPARENT_MODES = ("RGBA", "LA", "PA")
CODEC_HINT = (
    "install a decoder for it: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(JPEG, JPEG-LS, JPEG 2000) or pip install python-gdcm"
)
BOMB_HINT = (
    "Pillow's guard against decompression bombs, applied to DICOM too; "
    "if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS"
)
# Integer pixels spanning at most this many values (all 8- to 16-bit data) are scaled through a table of those values.
MAX_TABLE_LENGTH = 2**16


def load_image(source: str | Path | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """Read an X-ray or pathology image into an 8-bit `PIL.Image`: mode "L" for grayscale data, "RGB" for colour.

    Pass the result to `AceLoraImageProcessor` as it is: the processor resizes "L" images in one channel and makes
    them RGB afterwards, which gives the pixel values of the RGB image for less than half the resizing work.

    Args:
        source: a path, the file's bytes, or an already opened PIL image.
        name: how errors refer to the image (defaults to the path, or `<bytes>`).

    DICOM files go through their Modality LUT (rescale slope/intercept) and VOI LUT (or window centre/width);
    MONOCHROME1 is inverted; data deeper than 8 bits is scaled to 0-255 over its full range. Other files are
    decoded by Pillow and turned upright by their EXIF orientation; 16-bit and float images are likewise scaled
    over their range, and transparent pixels become black. Images with more than `PIL.Image.MAX_IMAGE_PIXELS` pixels
    (Pillow's default, about 89 million) are refused, DICOM included: raise that limit for genuine larger images.
    """
    if isinstance(source, Image.Image):
        return _to_8_bit(ImageOps.exif_transpose(source), name or "<PIL image>")
    if isinstance(source, (bytes, bytearray)):
        name = name or "<bytes>"
        data = bytes(source)
        return _load_dicom(io.BytesIO(data), name) if _is_dicom_bytes(data) else _load_pil(io.BytesIO(data), name)
    path = Path(source)
    name = name or str(path)
    if not path.is_file():
        raise ImageLoadError(name, _not_a_file(path))
    with path.open("rb") as file:
        head = file.read(132)
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom_bytes(head):
        return _load_dicom(path, name)
    return _load_pil(path, name)


def _not_a_file(path: Path) -> str:
    """What `path` is instead of an image file (nothing is opened: reading a FIFO or device could block)."""
    if path.is_symlink() and not path.exists():
        return "a link to a file that does not exist"
    if not path.exists():
        return "file not found"
    mode = path.stat().st_mode
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"{kind}, not an image file"


def _is_dicom_bytes(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def _one_line(error: BaseException) -> str:
    """A decoder's message as one line: some (pydicom's missing-codec one) list their plugins on several."""
    return " ".join(str(error).split())


# -------------------------------------------------------------------------------------------------------- PIL


def _load_pil(file, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; refuse those images too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(name, f"{_one_line(error).rstrip('.')} ({BOMB_HINT})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file Pillow can read (PNG, JPEG, TIFF, ...) nor a DICOM") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(name, f"the image data is corrupt or truncated ({_one_line(error)})") from error
    if getattr(image, "n_frames", 1) > 1:
        raise ImageLoadError(name, f"has {image.n_frames} frames; pass single-frame images")
    ImageOps.exif_transpose(image, in_place=True)
    return _to_8_bit(image, name)


def _to_8_bit(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in DEEP_MODES:
        return Image.fromarray(_full_range_to_uint8(np.asarray(image), name))
    if image.mode in TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels of a medical image carry no signal: show them black rather than their hidden colour.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        opaque = Image.alpha_composite(background, image.convert("RGBA"))
        return opaque.convert("L" if image.mode == "LA" else "RGB")
    return image.convert("L" if image.mode == "1" else "RGB")


# ------------------------------------------------------------------------------------- deep pixels to 8 bits


class _ValueTable:
    """Integer pixels as a table of the values in their range and each pixel's index into it, so that elementwise
    arithmetic on them (LUTs, windowing, scaling in float64) runs once per value, at most 65536 times, rather than once
    per pixel, a million times for a 1024² radiograph, with the same results. Other pixels (float, or integers spread
    over a wider range) are their own table, with no index."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)
        self.values, self.index = self.pixels, None
        if pixels.dtype.kind in "iu" and pixels.size:
            self.low, self.high = int(pixels.min()), int(pixels.max())
            if self.high - self.low < MAX_TABLE_LENGTH:
                # Pixels that index the table from 0 as they are save a subtraction over the image.
                self.first = 0 if 0 <= self.low and self.high < MAX_TABLE_LENGTH else self.low
                self.values = np.arange(self.first, self.high + 1).astype(self.pixels.dtype)
                self.index = self._offsets()

    def _offsets(self) -> np.ndarray:
        """`pixels - first` as unsigned integers of the pixels' width: the difference fits them even where a signed
        subtraction wraps around."""
        unsigned = f"u{self.pixels.dtype.itemsize}"
        if self.first == 0:
            return self.pixels.view(unsigned)
        return (self.pixels - self.pixels.dtype.type(self.first)).view(unsigned)

    def used(self, table: np.ndarray) -> np.ndarray:
        """The entries of `table` (one per value) that the pixels use."""
        if self.index is None:
            return table
        return table[np.bincount(self.index.ravel(), minlength=len(table)) > 0]

    def used_ends(self, table: np.ndarray) -> np.ndarray:
        """Entries of `table` with the same minimum and maximum as the used ones: the lowest and the highest pixel's
        where the table is monotonic (every linear rescale and window), else all used entries."""
        if self.index is None:
            return table
        steps = np.diff(table)
        if (steps >= 0).all() or (steps <= 0).all():
            return table[[self.low - self.first, self.high - self.first]]
        return self.used(table)

    def expand(self, table: np.ndarray) -> np.ndarray:
        """`table` looked up for every pixel."""
        if self.index is None:
            return table
        return np.take(table, self.index, out=np.empty(self.index.shape, table.dtype))


def _full_range_to_uint8(pixels: np.ndarray, name: str, shown=None) -> np.ndarray:
    """Map the full range of `shown(pixels)` (default: the pixels themselves) onto 0-255: no clipping, no lost
    contrast. `shown` must work elementwise."""
    table = _ValueTable(pixels)
    values = np.asarray(table.values if shown is None else shown(table.values), dtype=np.float64)
    return table.expand(_stretch_to_uint8(values, table.used_ends(values), name))


def _stretch_to_uint8(values: np.ndarray, used: np.ndarray, name: str) -> np.ndarray:
    """`values` mapped linearly so that the range of the `used` ones spans 0-255."""
    if not np.isfinite(used).all():
        raise ImageLoadError(name, "contains NaN or infinite pixel values")
    low, high = used.min(), used.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    # Unused entries of a table may lie outside the used range; clipping leaves the used ones as they are.
    return np.round((np.clip(values, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ DICOM


def _pydicom(name: str):
    """pydicom, imported at the first DICOM (it takes a third of a second). The package depends on it; remote code,
    which may run without it, needs it only for DICOM files (an import inside `try` is not required by transformers)."""
    try:
        import pydicom
        import pydicom.errors
        import pydicom.pixels
    except ImportError:
        raise ImageLoadError(name, "reading DICOM needs pydicom: pip install pydicom") from None
    return pydicom


def _read_dicom(file, name: str):
    pydicom = _pydicom(name)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(file)
    except pydicom.errors.InvalidDicomError as error:
        raise ImageLoadError(name, f"not a valid DICOM file ({_one_line(error)})") from error
    except (OSError, ValueError, EOFError) as error:
        raise ImageLoadError(name, f"the DICOM file is corrupt or truncated ({_one_line(error)})") from error
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
    _check_dicom_size(dataset, name)
    try:
        return dataset.pixel_array
    except (RuntimeError, NotImplementedError) as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", None)
        syntax = syntax.name if syntax is not None else "unknown transfer syntax"
        reason = f"cannot decode its {syntax} pixel data; {CODEC_HINT} ({_one_line(error)})"
        raise ImageLoadError(name, reason) from error
    except (ValueError, OSError, AttributeError) as error:
        raise ImageLoadError(name, f"the DICOM pixel data is corrupt or truncated ({_one_line(error)})") from error


def _check_dicom_size(dataset, name: str) -> None:
    """Refuse a DICOM whose header declares more pixels than Pillow would decode, before anything is allocated."""
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and rows * columns > limit:
        raise ImageLoadError(name, f"Rows x Columns = {rows} x {columns} ({rows * columns} pixels) exceeds limit of "
                                   f"{limit} pixels ({BOMB_HINT})")


def _load_dicom(file, name: str) -> Image.Image:
    dataset = _read_dicom(file, name)
    pixels = _dicom_pixels(dataset, name)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        if photometric.startswith("YBR"):
            pixels = _pydicom(name).pixels.convert_color_space(pixels, photometric, "RGB")
        rgb = pixels if pixels.dtype == np.uint8 else _full_range_to_uint8(pixels, name)
        return Image.fromarray(np.ascontiguousarray(rgb))
    if not photometric.startswith("MONOCHROME"):
        raise ImageLoadError(name, f"unsupported photometric interpretation {photometric!r}")
    return Image.fromarray(np.ascontiguousarray(_monochrome_to_uint8(pixels, dataset, photometric, name)))


def _monochrome_to_uint8(pixels: np.ndarray, dataset, photometric: str, name: str) -> np.ndarray:
    shown = partial(_apply_luts, dataset=dataset, name=name)
    bits_stored = int(dataset.get("BitsStored", 8))
    if pixels.dtype == np.uint8 and bits_stored <= 8 and _shown_as_stored(pixels, shown):
        # Plain 8-bit data is shown as stored (the common JPEG-compressed CR/DX case).
        return pixels if photometric == "MONOCHROME2" else (2**bits_stored - 1) - pixels
    gray = _full_range_to_uint8(pixels, name, shown)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _shown_as_stored(pixels: np.ndarray, shown) -> bool:
    """Whether `shown` leaves every stored value the image uses as it is."""
    table = _ValueTable(pixels)
    shown_values = shown(table.values)
    # Comparing the whole table is cheap and almost always decides; only the values in use matter.
    return np.array_equal(shown_values, table.values) or np.array_equal(table.used(shown_values),
                                                                        table.used(table.values))


def _apply_luts(stored: np.ndarray, dataset, name: str) -> np.ndarray:
    """The Modality LUT (or rescale) then the VOI LUT (or window) of `dataset`: elementwise, in float64 where scaled."""
    dicom_pixels = _pydicom(name).pixels
    try:
        return dicom_pixels.apply_voi_lut(dicom_pixels.apply_modality_lut(stored, dataset), dataset)
    except (ValueError, TypeError, NotImplementedError, AttributeError) as error:
        raise ImageLoadError(name, f"its Modality or VOI LUT (or window) cannot be applied ({_one_line(error)}); "
                                   "fix or remove those attributes") from error


__all__ = ["load_image"]
