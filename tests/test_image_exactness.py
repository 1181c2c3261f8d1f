"""The image path gives the pixel values the old RGB path gave (`benchmarks/legacy_image_path.py`) on every kind of
input: the samples, synthetic 8/12/16-bit DICOMs with every LUT, and PNG/JPEG/TIFF files in every common mode; where
the old path departed from the DICOM and PNG standards (a VOI output stretched again, constant images black, sBIT
ignored), the values the standards give, computed by hand."""

import importlib
import io
import re
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation

from ace_lora_hf import AceLoraImageProcessor
from ace_lora_hf.models.ace_lora.image_loading import load_image

from conftest import REPO_ROOT, SAMPLES
from dicom_fixtures import lut_item, write_dicom


TOLERANCE = 1e-5  # issue #16: pixel values within 1e-5 of the old path's


@pytest.fixture(scope="module")
def legacy():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
        yield importlib.import_module("legacy_image_path")


def radiograph(shape: tuple[int, int], high: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with noise in [0, high]: every resize tap sees a different value."""
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = (np.sin(columns / 17.0) + np.cos(rows / 23.0) + 2) / 4
    noise = np.random.default_rng(seed).normal(0, high / 40, shape)
    return np.clip(np.round(smooth * high + noise), 0, high)


SHAPE = (257, 311)  # odd margins on both sides of the center crop

DICOMS = {
    "8-bit": lambda: (radiograph(SHAPE, 255).astype(np.uint8), {}),
    "8-bit MONOCHROME1": lambda: (radiograph(SHAPE, 255).astype(np.uint8),
                                  {"PhotometricInterpretation": "MONOCHROME1"}),
    "8-bit window": lambda: (radiograph(SHAPE, 255).astype(np.uint8), {"WindowCenter": 120, "WindowWidth": 90}),
    "8-bit rescale": lambda: (radiograph(SHAPE, 200).astype(np.uint8), {"RescaleSlope": 1, "RescaleIntercept": 30}),
    "12-bit": lambda: (radiograph(SHAPE, 4095).astype(np.uint16), {"BitsStored": 12, "HighBit": 11}),
    "12-bit MONOCHROME1 window": lambda: (radiograph(SHAPE, 4095).astype(np.uint16),
                                          {"BitsStored": 12, "HighBit": 11, "WindowCenter": 2000, "WindowWidth": 1500,
                                           "PhotometricInterpretation": "MONOCHROME1"}),
    "16-bit unsigned": lambda: (radiograph(SHAPE, 65535).astype(np.uint16), {}),
    "16-bit signed rescale window": lambda: ((radiograph(SHAPE, 4000) - 2000).astype(np.int16),
                                             {"RescaleSlope": 0.5, "RescaleIntercept": -1024, "WindowCenter": -900,
                                              "WindowWidth": 1600}),
    "16-bit negative slope": lambda: (radiograph(SHAPE, 30000).astype(np.uint16),
                                      {"RescaleSlope": -1.5, "RescaleIntercept": 100}),
    "12-bit VOI LUT": lambda: (radiograph(SHAPE, 4095).astype(np.uint16),
                               {"BitsStored": 12, "HighBit": 11,
                                "VOILUTSequence": [lut_item(0, 16, [int(65535 * (v / 4095) ** 0.5)
                                                                    for v in range(4096)])]}),
    "12-bit modality LUT": lambda: (radiograph(SHAPE, 4095).astype(np.uint16),
                                    {"BitsStored": 12, "HighBit": 11, "ModalityLUTSequence": [
                                        lut_item(0, 16, [v * 9 + (v % 7) for v in range(4096)])]}),
    "upscaled 16-bit": lambda: (radiograph((150, 180), 65535).astype(np.uint16), {}),
}


def write_synthetic_dicom(folder, kind: str):
    pixels, attributes = DICOMS[kind]()
    return write_dicom(folder / "image.dcm", pixels, sop_class=DigitalXRayImageStorageForPresentation, **attributes)


def rgba() -> Image.Image:
    colour = np.stack([radiograph(SHAPE, 255, seed) for seed in range(3)], -1)
    alpha = radiograph(SHAPE, 255, seed=3)[..., None]
    return Image.fromarray(np.concatenate([colour, alpha], -1).astype(np.uint8))


FILES = {
    "8-bit PNG": ("png", lambda: Image.fromarray(radiograph(SHAPE, 255).astype(np.uint8))),
    "16-bit PNG": ("png", lambda: Image.fromarray(radiograph(SHAPE, 65535).astype(np.uint16))),
    "16-bit PNG, narrow range": ("png", lambda: Image.fromarray((radiograph(SHAPE, 400) + 1000).astype(np.uint16))),
    "RGB JPEG": ("jpg", lambda: rgba().convert("RGB")),
    "grayscale JPEG": ("jpg", lambda: Image.fromarray(radiograph(SHAPE, 255).astype(np.uint8))),
    "RGBA PNG": ("png", rgba),
    "LA PNG": ("png", lambda: rgba().convert("LA")),
    "palette PNG": ("png", lambda: rgba().convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)),
    "palette PNG with transparency": ("png", lambda: Image.fromarray(radiograph(SHAPE, 255).astype(np.uint8))
                                      .convert("P").copy()),
    "1-bit PNG": ("png", lambda: Image.fromarray(radiograph(SHAPE, 255) > 128)),
    "32-bit integer TIFF": ("tiff", lambda: Image.fromarray((radiograph(SHAPE, 200000) - 50000).astype(np.int32))),
    "32-bit integer TIFF, narrow range": ("tiff", lambda: Image.fromarray((radiograph(SHAPE, 3000) + 100000)
                                                                         .astype(np.int32))),
    "float TIFF": ("tiff", lambda: Image.fromarray((radiograph(SHAPE, 1000) / 7 - 30).astype(np.float32))),
}


def write_synthetic_file(folder, kind: str):
    suffix, make = FILES[kind]
    image = make()
    path = folder / f"image.{suffix}"
    image.save(path, **({"transparency": 0} if kind == "palette PNG with transparency" else {}))
    return path


def assert_same_as_legacy(path, legacy) -> float:
    """The loaded picture as RGB equals the old 8-bit RGB one; pixel values are within `TOLERANCE`."""
    loaded = load_image(path)
    assert loaded.mode in ("L", "RGB")
    assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(legacy.legacy_load_image(path)))
    actual = AceLoraImageProcessor()(loaded, return_tensors="np")["pixel_values"][0]
    expected = legacy.legacy_pixel_values(path)
    assert actual.shape == expected.shape == (3, 224, 224) and actual.dtype == expected.dtype == np.float32
    difference = float(np.abs(actual - expected).max())
    assert difference <= TOLERANCE
    return difference


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.iterdir()))
def test_samples(sample, legacy):
    assert_same_as_legacy(SAMPLES / sample, legacy)


@pytest.mark.parametrize("kind", DICOMS)
def test_synthetic_dicoms(kind, tmp_path, legacy):
    assert_same_as_legacy(write_synthetic_dicom(tmp_path, kind), legacy)


@pytest.mark.parametrize("kind", FILES)
def test_synthetic_files(kind, tmp_path, legacy):
    assert_same_as_legacy(write_synthetic_file(tmp_path, kind), legacy)


def gray_array(dtype=np.uint8) -> np.ndarray:
    return radiograph(SHAPE, 255).astype(dtype)


PROCESSOR_INPUTS = {
    "L": lambda: Image.fromarray(gray_array()),
    "RGB": lambda: rgba().convert("RGB"),
    "RGBA": rgba,
    "LA": lambda: rgba().convert("LA"),
    "P": lambda: rgba().convert("P"),
    "1": lambda: Image.fromarray(gray_array() > 128),
    "I;16": lambda: Image.fromarray(gray_array(np.uint16)),
    "I": lambda: Image.fromarray(gray_array(np.int32)),
    "F": lambda: Image.fromarray(gray_array(np.float32)),
    "CMYK": lambda: rgba().convert("CMYK"),
    "array HWC": lambda: np.asarray(rgba().convert("RGB")),
    "array CHW": lambda: np.moveaxis(np.asarray(rgba().convert("RGB")), -1, 0),
    "array HW1": lambda: gray_array()[..., None],
    "array 1HW": lambda: gray_array()[None],
    "array HWC float in [0, 1]": lambda: np.asarray(rgba().convert("RGB"), dtype=np.float32) / 255,
    "tensor CHW": lambda: torch.from_numpy(np.moveaxis(np.asarray(rgba().convert("RGB")), -1, 0).copy()),
    "tensor 1HW": lambda: torch.from_numpy(gray_array()[None]),
}


@pytest.mark.parametrize("do_convert_rgb", [True, False], ids=["convert", "no-convert"])
@pytest.mark.parametrize("kind", PROCESSOR_INPUTS)
def test_processor_called_directly_on_any_input_as_before(kind, do_convert_rgb, legacy):
    """Users calling the processor with any PIL mode, array or tensor get what they got before, or the same error
    (without RGB conversion, images that are not RGB do not fit the three-channel mean)."""
    image = PROCESSOR_INPUTS[kind]()

    def pixel_values(processor):
        return processor(image, do_convert_rgb=do_convert_rgb, return_tensors="np")["pixel_values"]

    try:
        expected = pixel_values(legacy.LegacyImageProcessor())
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            pixel_values(AceLoraImageProcessor())
        return
    np.testing.assert_allclose(pixel_values(AceLoraImageProcessor()), expected, rtol=0, atol=TOLERANCE)


def loaded(path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.int64)


def display(fraction: np.ndarray) -> np.ndarray:
    """A fraction of the display range as the 8-bit grey it shows."""
    return np.round(np.clip(fraction, 0, 1) * 255).astype(np.int64)


def test_a_window_is_shown_over_its_output_range_not_stretched_again(tmp_path):
    """PS3.3 C.11.2.1.2.1: a linear window's output spans [y_min, y_max], which the display maps onto its grey scale;
    a window wider than the data shows it in mid-grey (96-159 here), as a viewer does."""
    pixels = np.tile(np.arange(4096, dtype=np.uint16), (8, 1))
    center, width = 2048, 16384
    path = write_dicom(tmp_path / "wide.dcm", pixels, BitsStored=12, HighBit=11, WindowCenter=center,
                       WindowWidth=width)
    expected = display((pixels - (center - 0.5)) / (width - 1) + 0.5)
    assert np.array_equal(loaded(path), expected)
    assert (loaded(path).min(), loaded(path).max()) == (96, 159)


def test_a_sigmoid_window_and_a_voi_lut_are_shown_over_their_output_range(tmp_path):
    pixels = radiograph(SHAPE, 4095).astype(np.uint16)
    sigmoid = write_dicom(tmp_path / "sigmoid.dcm", pixels, WindowCenter=1800, WindowWidth=900,
                          VOILUTFunction="SIGMOID")
    assert np.array_equal(loaded(sigmoid), display(1 / (1 + np.exp(-4 * (pixels - 1800.0) / 900))))

    stored = radiograph(SHAPE, 3000).astype(np.uint16) + 500
    lut = np.array([(v * 37) % 5000 for v in range(3200)])
    voi_lut = write_dicom(tmp_path / "lut.dcm", stored, BitsStored=12, HighBit=11,
                          VOILUTSequence=[lut_item(400, 16, lut.tolist())])
    assert np.array_equal(loaded(voi_lut), display(lut[np.clip(stored - 400, 0, len(lut) - 1)] / 65535))


@pytest.mark.parametrize(("pixels", "attributes", "grey"), [
    (np.full(SHAPE, 1234, np.uint16), {}, round(1234 / 65535 * 255)),
    (np.full(SHAPE, 1234, np.uint16), {"BitsStored": 12, "HighBit": 11}, round(1234 / 4095 * 255)),
    (np.full(SHAPE, 200, np.uint16), {"BitsStored": 12, "HighBit": 11, "PhotometricInterpretation": "MONOCHROME1"},
     255 - round(200 / 4095 * 255)),
])
def test_a_constant_dicom_keeps_its_grey(pixels, attributes, grey, tmp_path):
    path = write_dicom(tmp_path / "constant.dcm", pixels, sop_class=DigitalXRayImageStorageForPresentation,
                       **attributes)
    assert np.array_equal(np.unique(loaded(path)), [grey])


@pytest.mark.parametrize(("image", "grey"), [
    (Image.fromarray(np.full(SHAPE, 30000, np.uint16)), round(30000 / 65535 * 255)),
    (Image.fromarray(np.full(SHAPE, 0.5, np.float32)), 128),
    (Image.fromarray(np.full(SHAPE, 7, np.int32)), 0),
])
def test_a_constant_deep_image_keeps_its_grey(image, grey, tmp_path):
    path = tmp_path / ("constant.png" if image.mode == "I;16" else "constant.tiff")
    image.save(path)
    assert np.array_equal(np.unique(loaded(path)), [grey])


def with_sbit(png: bytes, bits: int) -> bytes:
    """`png` with an sBIT chunk declaring `bits` significant bits, placed before its image data."""
    data = bytes([bits])
    chunk = len(data).to_bytes(4, "big") + b"sBIT" + data + zlib.crc32(b"sBIT" + data).to_bytes(4, "big")
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def test_a_16_bit_png_honours_its_significant_bits(tmp_path):
    """PNG 1.2 section 12.5: 12-bit samples scaled up to 16 bits (bit replication) and an sBIT of 12 show as the
    12-bit image over 0-4095; without sBIT the range the pixels use is stretched as before."""
    original = (radiograph(SHAPE, 2000) + 100).astype(np.uint16)
    scaled = (original << 4) | (original >> 8)
    buffer = io.BytesIO()
    Image.fromarray(scaled).save(buffer, format="PNG")
    (tmp_path / "sbit.png").write_bytes(with_sbit(buffer.getvalue(), 12))
    (tmp_path / "plain.png").write_bytes(buffer.getvalue())
    expected = display(original / 4095)
    assert np.array_equal(loaded(tmp_path / "sbit.png"), expected)
    assert np.array_equal(load_image(with_sbit(buffer.getvalue(), 12)), expected)  # bytes, as the pipeline takes
    low, high = scaled.min(), scaled.max()
    assert np.array_equal(loaded(tmp_path / "plain.png"), display((scaled - low) / (high - low)))
