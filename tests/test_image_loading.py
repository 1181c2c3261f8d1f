"""Medical image loading: every PIL mode, DICOM LUTs and photometry, EXIF orientation, and a clear error for every
bad file (decompression bombs included)."""

import os
import re
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from pydicom.uid import BasicTextSRStorage, JPEGLSLossless

from ace_lora_hf.errors import ImageLoadError
from ace_lora_hf.models.ace_lora.image_loading import load_image

from conftest import SAMPLES
from dicom_fixtures import write_dicom


SIIM = SAMPLES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONOCHROME1 = SAMPLES / "fake_monochrome1.dcm"
NIH = SAMPLES / "nih_00000001_000.png"


def pixels(image: Image.Image, mode: str = "L") -> np.ndarray:
    """The gray values of a loaded image: mode L for single-channel data, RGB with equal channels for a colour mode."""
    assert image.mode == mode
    array = np.asarray(image)
    if mode == "L":
        return array
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    return array[..., 0]


def test_monochrome1_sample_loads_as_the_siim_picture_inverted():
    siim, inverted = pixels(load_image(SIIM)), pixels(load_image(MONOCHROME1))
    assert siim.shape == (1024, 1024)
    assert np.array_equal(inverted, 255 - siim)
    assert siim.std() > 20  # a real radiograph, not a blank decode


def test_siim_sample_keeps_its_stored_8_bit_values():
    import pydicom

    assert np.array_equal(pixels(load_image(SIIM)), pydicom.dcmread(SIIM).pixel_array)


def test_png_loads_the_same_in_mode_l_and_rgb(tmp_path):
    gray = load_image(NIH)
    Image.open(NIH).convert("RGB").save(tmp_path / "rgb.png")
    assert np.array_equal(pixels(load_image(tmp_path / "rgb.png"), "RGB"), pixels(gray))
    assert np.array_equal(pixels(gray), np.asarray(Image.open(NIH)))


def test_bytes_and_pil_inputs(tmp_path):
    assert np.array_equal(np.asarray(load_image(NIH.read_bytes())), np.asarray(load_image(NIH)))
    assert np.array_equal(np.asarray(load_image(SIIM.read_bytes())), np.asarray(load_image(SIIM)))
    assert np.array_equal(np.asarray(load_image(Image.open(NIH))), np.asarray(load_image(NIH)))


RAMP = np.array([[0, 1000, 2000, 4000]], dtype=np.uint16)
RAMP_8BIT = np.array([[0, 64, 128, 255]], dtype=np.uint8)  # round(v * 255 / 4000)


@pytest.mark.parametrize(
    ("make", "mode", "expected"),
    [
        (lambda: Image.fromarray(RAMP_8BIT), "L", RAMP_8BIT),
        (lambda: Image.fromarray(RAMP), "L", RAMP_8BIT),  # I;16
        (lambda: Image.fromarray(RAMP.astype(np.int32)), "L", RAMP_8BIT),  # I
        (lambda: Image.fromarray(RAMP.astype(np.float32) / 7), "L", RAMP_8BIT),  # F
        (lambda: Image.fromarray(RAMP_8BIT > 100), "L", np.array([[0, 0, 255, 255]], np.uint8)),  # 1
        (lambda: Image.fromarray(RAMP_8BIT).convert("P"), "RGB", RAMP_8BIT),
        (lambda: Image.fromarray(RAMP_8BIT).convert("CMYK"), "RGB", RAMP_8BIT),
        (lambda: Image.fromarray(np.stack([RAMP_8BIT] * 3 + [np.full_like(RAMP_8BIT, 255)], -1)), "RGB",
         RAMP_8BIT),  # RGBA
        (lambda: Image.fromarray(np.stack([RAMP_8BIT, np.array([[255, 255, 0, 255]], np.uint8)], -1)), "L",
         np.array([[0, 64, 0, 255]], np.uint8)),  # LA: the transparent pixel shows black
    ],
    ids=["L", "I;16", "I", "F", "1", "P", "CMYK", "RGBA", "LA"],
)
def test_every_pil_mode_becomes_8_bit_gray_or_rgb(tmp_path, make, mode, expected):
    image = make()
    path = tmp_path / ("image.tiff" if image.mode in ("F", "I", "CMYK") else "image.png")
    image.save(path)
    assert np.array_equal(pixels(load_image(path), mode), expected)


def test_16_bit_dicom_with_rescale_and_window(tmp_path):
    stored = np.array([[0, 1000, 2000, 3000], [500, 1500, 2500, 4095]], dtype=np.uint16)
    # Modality LUT: HU = 2 * stored - 1000; window 1000 +- 500 keeps HU 500..1500 (stored 750..1250).
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=1000, WindowWidth=1000, BitsStored=12, HighBit=11)
    gray = pixels(load_image(path))
    assert gray[0, 0] == 0 and gray[1, 3] == 255  # below and above the window
    assert int(gray[0, 1]) in (127, 128)  # HU 1000: the window centre
    monochrome1 = write_dicom(tmp_path / "m1.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                              WindowCenter=1000, WindowWidth=1000, BitsStored=12, HighBit=11,
                              PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(pixels(load_image(monochrome1)), 255 - gray)


def test_12_bit_dicom_without_window_uses_its_full_range(tmp_path):
    stored = np.array([[100, 1100, 2100, 3100]], dtype=np.uint16)
    gray = pixels(load_image(write_dicom(tmp_path / "dx.dcm", stored, BitsStored=12, HighBit=11)))
    assert np.array_equal(gray, np.array([[0, 85, 170, 255]], dtype=np.uint8))


def test_dicom_without_the_dcm_suffix_is_recognised(tmp_path):
    path = write_dicom(tmp_path / "IM0001", RAMP_8BIT)
    assert np.array_equal(pixels(load_image(path)), RAMP_8BIT)


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda d: write_dicom(d / "multi.dcm", np.zeros((3, 4, 4), np.uint8)), "multi-frame DICOM"),
        (lambda d: write_dicom(d / "report.dcm", None, sop_class=BasicTextSRStorage), "no pixel data"),
        (lambda d: write_dicom(d / "jls.dcm", np.zeros((4, 4), np.uint8), transfer_syntax=JPEGLSLossless),
         "pip install pylibjpeg"),
        (lambda d: (d / "notes.dcm").write_text("not a dicom") and d / "notes.dcm", "not a valid DICOM"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "not an image file"),
        (lambda d: (d / "cut.png").write_bytes(NIH.read_bytes()[:5000]) and d / "cut.png", "corrupt or truncated"),
        (lambda d: (d / "cut.dcm").write_bytes(SIIM.read_bytes()[:3000]) and d / "cut.dcm", "corrupt or truncated"),
        (lambda d: d / "missing.png", "file not found"),
    ],
    ids=["multi-frame", "structured-report", "missing-codec", "fake-dicom", "text", "truncated-png",
         "truncated-dicom", "missing"],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, write, reason):
    path = write(tmp_path)
    with pytest.raises(ImageLoadError, match=reason) as error:
        load_image(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


@pytest.mark.parametrize(("orientation", "corner"), [(6, "top right"), (8, "bottom left")])
def test_exif_orientation_turns_the_picture_upright(tmp_path, orientation, corner):
    stored = np.zeros((48, 64), np.uint8)
    stored[:16, :16] = 255  # a bright top-left corner, as stored
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation  # 6: shown turned 90° clockwise, 8: counter-clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    rows, columns = {"top right": (slice(0, 16), slice(-16, None)),
                     "bottom left": (slice(-16, None), slice(0, 16))}[corner]
    for loaded in (load_image(path), load_image(Image.open(path)), load_image(path.read_bytes())):
        shown = pixels(loaded)
        assert shown.shape == (64, 48)
        assert shown[rows, columns].mean() > 200 and shown.mean() < 255 / 8


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares `width` x `height` 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_png_is_refused_with_its_size_and_the_limit(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))
    with pytest.raises(ImageLoadError, match=r"10000000000 pixels.*limit.*MAX_IMAGE_PIXELS") as error:
        load_image(path)
    assert str(error.value).startswith(str(path))


def test_images_over_the_pixel_limit_are_refused_below_pillows_error_threshold(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)
    dicom = write_dicom(tmp_path / "large.dcm", np.zeros((40, 40), np.uint16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: Pillow itself would only warn
    for source in (path, dicom):
        with pytest.raises(ImageLoadError, match=r"1600 pixels.*limit of 1000 pixels.*MAX_IMAGE_PIXELS"):
            load_image(source)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # how a user accepts larger genuine images
    assert load_image(path).size == load_image(dicom).size == (40, 40)


def test_dicom_declaring_absurd_rows_and_columns_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((4, 4), np.uint16), Rows=60000, Columns=60000)
    with pytest.raises(ImageLoadError, match=r"Rows x Columns = 60000 x 60000 \(3600000000 pixels\) exceeds limit"):
        load_image(path)


def test_unusable_dicom_window_and_non_finite_pixels_are_load_errors(tmp_path):
    path = write_dicom(tmp_path / "window.dcm", RAMP, WindowCenter=100, WindowWidth=0)
    with pytest.raises(ImageLoadError, match="Window Width must be greater than or equal to 1"):
        load_image(path)
    Image.fromarray(np.array([[0, np.nan]], np.float32)).save(tmp_path / "nan.tiff")
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        load_image(tmp_path / "nan.tiff")


def test_a_path_that_is_not_a_regular_file_says_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it to read would block: it must be named, never opened
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "socket"))
        cases = {tmp_path: "a folder", tmp_path / "fifo": "a named pipe (FIFO)", tmp_path / "socket": "a socket",
                 Path("/dev/null"): "a character device", tmp_path / "dangling": "a link to a file that does not exist",
                 tmp_path / "missing.png": "file not found"}
        for path, kind in cases.items():
            with pytest.raises(ImageLoadError, match=re.escape(f"{path}: {kind}")):
                load_image(path)
