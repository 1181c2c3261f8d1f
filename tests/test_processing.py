"""Image processor, processor, and the zero-shot-image-classification pipeline's stock call."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
from transformers.image_utils import PILImageResampling

from ace_lora_hf import AceLoraImageProcessor, AceLoraProcessor, AceLoraZeroShotImageClassificationPipeline

from conftest import SAMPLES


def open_clip_preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
    """open_clip's torchvision pipeline written out with PIL: Resize(size, BICUBIC), CenterCrop, ToTensor, Normalize."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    top = int(round((image.height - size) / 2.0))
    left = int(round((image.width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


@pytest.mark.parametrize("size", [(512, 512), (300, 227), (227, 301), (640, 480)])
def test_image_processor_matches_open_clip_preprocessing(size):
    generator = np.random.default_rng(sum(size))
    image = Image.fromarray(generator.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    actual = AceLoraImageProcessor()(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(actual, open_clip_preprocess(image), rtol=0, atol=1e-5)


def test_image_processor_on_a_real_x_ray():
    image = Image.open(SAMPLES / "nih_00000001_000.png")
    assert image.mode == "L"
    for given in (image, image.convert("RGB")):
        actual = AceLoraImageProcessor()(given, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(actual, open_clip_preprocess(image), rtol=0, atol=1e-5)


RESAMPLES = [PILImageResampling.BICUBIC, PILImageResampling.BILINEAR, PILImageResampling.NEAREST,
             PILImageResampling.LANCZOS]


@pytest.mark.parametrize("resample", RESAMPLES, ids=lambda r: r.name)
@pytest.mark.parametrize("size", [(512, 512), (300, 227), (181, 150)])
def test_grayscale_image_gives_the_pixel_values_of_its_rgb_conversion(size, resample):
    gray = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, size[::-1], dtype=np.uint8))
    processor = AceLoraImageProcessor(resample=resample)
    # As the pipeline, the explanation crops (no rescale, no normalise) and the segmentation masks (nearest) use it,
    # and with the steps and sizes a user may choose.
    for steps in ({}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False}, {"do_resize": False},
                  {"do_center_crop": False}, {"size": {"height": 240, "width": 260}}, {"resample": 5}):
        actual = processor(gray, return_tensors="np", **steps)["pixel_values"]
        expected = processor(gray.convert("RGB"), return_tensors="np", **steps)["pixel_values"]
        assert actual.shape[:2] == (1, 3) and actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def test_a_batch_mixes_grayscale_and_colour_images():
    generator = np.random.default_rng(0)
    gray = Image.fromarray(generator.integers(0, 256, (260, 300), dtype=np.uint8))
    colour = Image.fromarray(generator.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    processor = AceLoraImageProcessor()
    batch = processor([gray, colour], return_tensors="pt")["pixel_values"]
    assert batch.shape == (2, 3, 224, 224)
    for row, image in zip(batch, (gray, colour)):
        torch.testing.assert_close(row, processor(image, return_tensors="pt")["pixel_values"][0], rtol=0, atol=0)


def test_without_rgb_conversion_a_grayscale_image_keeps_its_one_channel():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (230, 250), dtype=np.uint8))
    processor = AceLoraImageProcessor()
    single = processor(gray, do_convert_rgb=False, image_mean=0.5, image_std=0.5, return_tensors="np")["pixel_values"]
    assert single.shape == (1, 1, 224, 224)
    with pytest.raises(ValueError, match="mean must have 1 elements"):
        processor(gray, do_convert_rgb=False, return_tensors="np")


def test_processor_pads_and_truncates_to_the_context(tiny_hub_folder):
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    assert isinstance(processor, AceLoraProcessor)
    assert isinstance(processor.image_processor, AceLoraImageProcessor)
    short = processor(text=["a chest x-ray image of pneumonia."], return_tensors="pt")
    long = processor(text=["lung " * 400], return_tensors="pt")
    assert short["input_ids"].shape == long["input_ids"].shape == (1, 256)
    assert short["input_ids"][0, 0] == 2 and int(short["attention_mask"].sum()) == 11  # [CLS] a chest x - ray image of pneumonia . [SEP]
    assert long["input_ids"][0, -1] == 3  # [SEP] kept at the end
    both = processor(text=["normal"], images=Image.open(SAMPLES / "nih_00000001_000.png"), return_tensors="pt")
    assert both["pixel_values"].shape == (1, 3, 32, 32)


def test_processor_round_trip(tiny_hub_folder, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_ace_lora.AceLoraProcessor"


def test_processor_loads_as_remote_code(tiny_hub_folder, tmp_path):
    script = (
        "import sys; from transformers import AutoProcessor; "
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "assert 'ace_lora_hf' not in sys.modules; "
        "print(type(p).__module__, type(p.image_processor).__name__, p(text=['normal'])['input_ids'].__len__())"
    )
    env = {"HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script, str(tiny_hub_folder)], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    module, image_processor, batch = result.stdout.split()
    assert module.startswith("transformers_modules.") and image_processor == "AceLoraImageProcessor"


def _expected_scores(folder, image, labels, template):
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=[template.format(label) for label in labels], images=image, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image.softmax(dim=-1)[0].tolist()


def test_zero_shot_pipeline_by_path_and_by_objects(tiny_hub_folder):
    """The stock call with one hypothesis_template gives the model's own softmax over `logits_per_image`, through
    the ACE-LoRA pipeline class that `import ace_lora_hf` registers for the task (see tests/test_pipeline.py)."""
    image = Image.open(SAMPLES / "nih_00000001_000.png").convert("RGB")
    labels, template = ["no finding", "pneumonia", "edema"], "a chest x-ray image of {}."
    expected = dict(zip(labels, _expected_scores(tiny_hub_folder, image, labels, template)))
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    by_path = pipeline("zero-shot-image-classification", model=str(tiny_hub_folder), processor=processor)
    model = AutoModel.from_pretrained(tiny_hub_folder)
    by_objects = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)
    for classifier in (by_path, by_objects):
        assert type(classifier) is AceLoraZeroShotImageClassificationPipeline
        result = classifier(image, candidate_labels=labels, hypothesis_template=template)
        assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
        for entry in result:
            assert entry["score"] == pytest.approx(expected[entry["label"]], abs=1e-5)
