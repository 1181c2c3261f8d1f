"""Load medical images (PNG/JPEG/TIFF in any PIL mode, DICOM) as 8-bit PIL images for the processor: mode "L" for
grayscale data, "RGB" for colour."""

import io
import stat
import warnings
from contextlib import nullcontext
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

    DICOM files are shown as the standard's grayscale pipeline shows them: Modality LUT (rescale slope/intercept),
    then the VOI LUT or window centre/width, whose output range maps onto 0-255 as it is (a window is not stretched
    again over the pixels it happens to hold); MONOCHROME1 is inverted. Without a VOI transform, data deeper than 8
    bits is scaled to 0-255 over the range its pixels use. Other files are decoded by Pillow and turned upright by
    their EXIF orientation; a 16-bit PNG with an `sBIT` chunk is read at its significant bits and shown over their
    full range, other 16-bit and float images are scaled over the range their pixels use, and transparent pixels
    become black. A constant image keeps its grey (its value within its type's range), never black. Images with more than `PIL.Image.MAX_IMAGE_PIXELS` pixels
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
    sixteen_bit_png = image.format == "PNG" and image.mode.startswith("I;16")
    return _to_8_bit(image, name, _png_significant_bits(file) if sixteen_bit_png else None)


def _to_8_bit(image: Image.Image, name: str, significant_bits: int | None = None) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in DEEP_MODES:
        pixels = np.asarray(image)
        if significant_bits is None:
            return Image.fromarray(_full_range_to_uint8(pixels, name, fallback=_nominal_range(pixels)))
        # A PNG encoder scales `significant_bits`-bit samples up to 16 bits; shifting right recovers them (PNG 1.2, 12.5).
        original = pixels.astype(np.uint16) >> (16 - significant_bits)
        return Image.fromarray(_full_range_to_uint8(original, name, display_range=(0, 2**significant_bits - 1)))
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


def _full_range_to_uint8(pixels: np.ndarray, name: str, shown=None, display_range: tuple[float, float] | None = None,
                         fallback: tuple[float, float] = (0.0, 255.0)) -> np.ndarray:
    """Map `shown(pixels)` (default: the pixels themselves; `shown` works elementwise) linearly onto 0-255: the
    `display_range` where one is given (values outside it clip), else the range the pixels use (no clipping, no
    lost contrast), or `fallback` where they use a single value (a constant image keeps its grey)."""
    table = _ValueTable(pixels)
    values = np.asarray(table.values if shown is None else shown(table.values), dtype=np.float64)
    used = table.used_ends(values)
    if not np.isfinite(used).all():
        raise ImageLoadError(name, "contains NaN or infinite pixel values")
    if display_range is None:
        display_range = (used.min(), used.max()) if used.min() < used.max() else fallback
    return table.expand(_scale_to_uint8(values, *display_range))


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` mapped linearly so that `low`-`high` spans 0-255, clipped to it."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((np.clip(values, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)


def _nominal_range(pixels: np.ndarray) -> tuple[float, float]:
    """The range a constant image's value is shown within: 16 bits for integer data that fits them (PNG, TIFF),
    the type's range for other integers, 0-1 for floating point."""
    if pixels.dtype.kind == "f":
        return 0.0, 1.0
    if pixels.size and 0 <= pixels.min() and pixels.max() < 2**16:
        return 0.0, 2.0**16 - 1
    info = np.iinfo(pixels.dtype)
    return float(info.min), float(info.max)


def _png_significant_bits(source: Path | io.BytesIO) -> int | None:
    """The significant bits a grayscale PNG's `sBIT` chunk declares (None without one), read from the chunks before
    the image data: Pillow skips that chunk."""
    with open(source, "rb") if isinstance(source, Path) else nullcontext(source) as file:
        file.seek(8)  # the PNG signature
        while len(header := file.read(8)) == 8:
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"sBIT":
                data = file.read(length)
                return data[0] if len(data) == 1 and 1 <= data[0] < 16 else None
            file.seek(length + 4, io.SEEK_CUR)  # the data and the CRC
    return None


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
    gray = _full_range_to_uint8(pixels, name, shown, display_range=_voi_output_range(dataset, name),
                                fallback=_sorted_pair(shown(_stored_range(dataset))))
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _voi_output_range(dataset, name: str) -> tuple[float, float] | None:
    """The range of the VOI transform's output, which a display maps onto its full grey scale (PS3.4 N.2.1.1.2), or
    None without a VOI transform: a VOI LUT's entries span 0 to 2^bits - 1 (its descriptor's bits), a window's
    output spans what pydicom's windowing gives for the lowest and highest inputs."""
    lut = dataset.get("VOILUTSequence")
    if lut:
        return 0.0, 2.0 ** int(lut[0].LUTDescriptor[2]) - 1
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        return _sorted_pair(_apply_luts(np.array([-np.inf, np.inf]), dataset, name, modality=False))
    return None


def _stored_range(dataset) -> np.ndarray:
    """The lowest and highest value the stored pixels can hold (BitsStored, signed or not)."""
    bits = int(dataset.get("BitsStored", 8))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])


def _sorted_pair(values: np.ndarray) -> tuple[float, float]:
    return float(np.min(values)), float(np.max(values))


def _shown_as_stored(pixels: np.ndarray, shown) -> bool:
    """Whether `shown` leaves every stored value the image uses as it is."""
    table = _ValueTable(pixels)
    shown_values = shown(table.values)
    # Comparing the whole table is cheap and almost always decides; only the values in use matter.
    return np.array_equal(shown_values, table.values) or np.array_equal(table.used(shown_values),
                                                                        table.used(table.values))


def _apply_luts(stored: np.ndarray, dataset, name: str, modality: bool = True) -> np.ndarray:
    """The Modality LUT (or rescale) then the VOI LUT (or window) of `dataset`: elementwise, in float64 where scaled.
    `modality=False` applies the VOI transform alone (to values already past the Modality LUT)."""
    dicom_pixels = _pydicom(name).pixels
    try:
        values = dicom_pixels.apply_modality_lut(stored, dataset) if modality else stored
        return dicom_pixels.apply_voi_lut(values, dataset)
    except (ValueError, TypeError, NotImplementedError, AttributeError) as error:
        raise ImageLoadError(name, f"its Modality or VOI LUT (or window) cannot be applied ({_one_line(error)}); "
                                   "fix or remove those attributes") from error


__all__ = ["load_image"]
