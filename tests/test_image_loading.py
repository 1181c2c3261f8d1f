"""Medical image loading: every PIL mode, DICOM LUTs and photometry, and a clear error for every bad file."""

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import BasicTextSRStorage, JPEGLSLossless

from ace_lora_hf.errors import ImageLoadError
from ace_lora_hf.image_loading import load_image

from conftest import SAMPLES
from dicom_fixtures import write_dicom


SIIM = SAMPLES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONOCHROME1 = SAMPLES / "fake_monochrome1.dcm"
NIH = SAMPLES / "nih_00000001_000.png"


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    array = np.asarray(image)
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
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb.png")), np.asarray(gray))
    assert np.array_equal(pixels(gray), np.asarray(Image.open(NIH)))


def test_bytes_and_pil_inputs(tmp_path):
    assert np.array_equal(np.asarray(load_image(NIH.read_bytes())), np.asarray(load_image(NIH)))
    assert np.array_equal(np.asarray(load_image(SIIM.read_bytes())), np.asarray(load_image(SIIM)))
    assert np.array_equal(np.asarray(load_image(Image.open(NIH))), np.asarray(load_image(NIH)))


RAMP = np.array([[0, 1000, 2000, 4000]], dtype=np.uint16)
RAMP_8BIT = np.array([[0, 64, 128, 255]], dtype=np.uint8)  # round(v * 255 / 4000)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.fromarray(RAMP_8BIT), RAMP_8BIT),  # L
        (lambda: Image.fromarray(RAMP), RAMP_8BIT),  # I;16
        (lambda: Image.fromarray(RAMP.astype(np.int32)), RAMP_8BIT),  # I
        (lambda: Image.fromarray(RAMP.astype(np.float32) / 7), RAMP_8BIT),  # F
        (lambda: Image.fromarray(RAMP_8BIT).convert("P"), RAMP_8BIT),
        (lambda: Image.fromarray(RAMP_8BIT).convert("CMYK"), RAMP_8BIT),
        (lambda: Image.fromarray(np.stack([RAMP_8BIT] * 3 + [np.full_like(RAMP_8BIT, 255)], -1)), RAMP_8BIT),  # RGBA
        (lambda: Image.fromarray(np.stack([RAMP_8BIT, np.array([[255, 255, 0, 255]], np.uint8)], -1)),
         np.array([[0, 64, 0, 255]], np.uint8)),  # LA: the transparent pixel shows black
    ],
    ids=["L", "I;16", "I", "F", "P", "CMYK", "RGBA", "LA"],
)
def test_every_pil_mode_becomes_8_bit_rgb(tmp_path, make, expected):
    image = make()
    path = tmp_path / ("image.tiff" if image.mode in ("F", "I", "CMYK") else "image.png")
    image.save(path)
    assert np.array_equal(pixels(load_image(path)), expected)


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
    assert str(error.value).startswith(str(path))
