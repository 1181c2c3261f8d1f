"""The browser demo: its handler, its errors, the Space entry point, and one run in headless Chromium."""

import runpy
import sys

import pytest
from PIL import Image

from ace_lora_hf.errors import AceLoraError, ModelSourceError
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier

from browser import browser_missing, chromium, classify_in_browser, running_app
from conftest import REPO_ROOT, SAMPLES


gr = pytest.importorskip("gradio", reason="needs the [app] extra (gradio): pip install 'ace-lora-hf[app]'")
from ace_lora_hf.cli import app  # noqa: E402
from ace_lora_hf.inference import demo  # noqa: E402

MONOCHROME1 = SAMPLES / "fake_monochrome1.dcm"
LABELS = ("No Finding", "pneumonia")
CHEST_TEXT = ("No Finding\npneumonia", "\n".join(CHEST_XRAY_TEMPLATES))


@pytest.fixture(scope="module")
def loaded(tiny_hub_folder):
    return app.load_demo_model(app.parse_args(["--model", str(tiny_hub_folder), "--device", "cpu"]))


@pytest.fixture
def demo_model(loaded) -> "demo.ZeroShotDemo":
    return demo.ZeroShotDemo(*loaded[:2])


@pytest.fixture(scope="module")
def expected(tiny_hub_folder) -> dict[str, float]:
    """`ZeroShotClassifier`'s probabilities for the MONOCHROME1 sample, from an unmerged model loaded separately."""
    from transformers import AutoModel, AutoProcessor

    classifier = ZeroShotClassifier(AutoModel.from_pretrained(tiny_hub_folder),
                                    AutoProcessor.from_pretrained(tiny_hub_folder))
    return dict(zip(LABELS, classifier(MONOCHROME1, LABELS)[0].tolist()))


def test_classify_shows_probabilities_and_the_explanation(demo_model, expected):
    message, bars, table, picture = demo_model.classify(str(MONOCHROME1), *CHEST_TEXT)
    assert bars == pytest.approx(expected, abs=1e-5)
    assert table == [[label, f"{bars[label]:.4f}"] for label in LABELS]
    prediction = max(expected, key=expected.get)
    assert message == f"**fake_monochrome1.dcm**: prediction **{prediction}** (p = {bars[prediction]:.4f})"
    assert isinstance(picture, Image.Image) and picture.size == (1890, 1260)


def test_class_embeddings_are_computed_once_per_labels_and_templates(demo_model, monkeypatch):
    calls = []
    encode = demo_model.model.get_class_embeddings
    monkeypatch.setattr(demo_model.model, "get_class_embeddings", lambda *args: calls.append(1) or encode(*args))
    for _ in range(2):
        demo_model.classify(str(MONOCHROME1), *CHEST_TEXT)
    assert len(calls) == 1
    assert demo_model.classifier(CHEST_XRAY_TEMPLATES) is demo_model.classifier(CHEST_XRAY_TEMPLATES)
    assert demo_model.classifier(CHEST_XRAY_TEMPLATES[:1]).templates == CHEST_XRAY_TEMPLATES[:1]


@pytest.mark.parametrize("labels, templates, image, message", [
    (*CHEST_TEXT, None, "Upload an image"),
    ("pneumonia", CHEST_TEXT[1], MONOCHROME1, "at least two labels"),
    ("pneumonia\nedema\npneumonia", CHEST_TEXT[1], MONOCHROME1, "names 'pneumonia' more than once"),
    (CHEST_TEXT[0], "a chest X-ray image.", MONOCHROME1, "'a chest X-ray image.' needs {} exactly once"),
    (CHEST_TEXT[0], "{} and {}", MONOCHROME1, "'{} and {}' needs {} exactly once"),
    (CHEST_TEXT[0], "an image of {label}", MONOCHROME1, "'an image of {label}' needs {} exactly once"),
    (CHEST_TEXT[0], "\n \n", MONOCHROME1, "at least one template"),
    ("\n".join(f"finding {i}" for i in range(3000)), CHEST_TEXT[1], MONOCHROME1,
     "3000 labels: this page classifies with at most 64 at a time"),  # what a visitor of a public Space can type
    (CHEST_TEXT[0], "\n".join(f"view {i}: {{}}" for i in range(9)), MONOCHROME1, "9 templates: this page"),
    ("x" * 5000 + "\nedema", CHEST_TEXT[1], MONOCHROME1, "is 5000 characters long; keep each under 300"),
])
def test_bad_inputs_give_a_message_and_no_results(demo_model, labels, templates, image, message):
    shown, bars, table, picture = demo_model.classify(image and str(image), labels, templates)
    assert shown.startswith("**Cannot classify:** ") and message in shown
    assert bars is table is picture is None


@pytest.mark.parametrize("name, content, reason", [
    ("cut.png", b"\x89PNG\r\n\x1a\n garbage", "the image data is corrupt or truncated"),
    ("letter.txt", b"Dear colleague,\n", "not an image file Pillow can read"),
    ("scan.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00", "the DICOM has no pixel data: not an image"),
])
def test_a_bad_file_is_named_in_the_message(demo_model, tmp_path, name, content, reason):
    upload = tmp_path / name
    upload.write_bytes(content)
    shown, *outputs = demo_model.classify(str(upload), *CHEST_TEXT)
    assert shown.startswith(f"**Cannot classify:** {name}: ") and reason in shown
    assert outputs == [None, None, None]


def test_presets_parse_and_fill_the_boxes():
    for labels, templates in demo.PRESETS.values():
        assert demo.parse_labels("\n".join(labels)) == labels
        assert demo.parse_templates("\n".join(templates)) == templates


def test_a_model_that_cannot_load_is_one_line_naming_it(tmp_path):
    with pytest.raises(ModelSourceError, match=f"--model {tmp_path}: not a model in ACE-LoRA's transformers format"):
        app.load_demo_model(app.parse_args(["--model", str(tmp_path)]))


def test_without_gradio_the_command_names_the_extra_before_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(AceLoraError, match=r"pip install 'ace-lora-hf\[app\]'"):
        app.main(["--model", str(tmp_path / "not loaded")])


def test_the_space_builds_the_demo_from_the_environment(tiny_hub_folder, monkeypatch):
    monkeypatch.setenv("ACE_LORA_MODEL", str(tiny_hub_folder))
    space = runpy.run_path(str(REPO_ROOT / "app.py"))
    assert isinstance(space["demo"], gr.Blocks)
    examples = [block for block in space["demo"].blocks.values() if isinstance(block, gr.Dataset)]
    assert len(examples) == 1 and len(examples[0].samples) == len(demo.example_files()) == 4


@pytest.mark.skipif(browser_missing() is not None, reason=f"needs a browser for the browser test: {browser_missing()}")
def test_chromium_classifies_an_uploaded_monochrome1_dicom(tiny_hub_folder, expected, tmp_path):
    with running_app(tiny_hub_folder, tmp_path / "app.log") as url, chromium() as driver:
        message, shown = classify_in_browser(driver, url, MONOCHROME1)
        driver.save_screenshot(str(tmp_path / "app.png"))
    prediction = max(expected, key=expected.get)
    assert f"fake_monochrome1.dcm: prediction {prediction}" in message
    assert list(shown) == list(LABELS)
    assert {label: float(value) for label, value in shown.items()} == pytest.approx(expected, abs=1e-3)


def test_an_image_over_the_pages_size_limit_is_refused_before_it_is_read(demo_model, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "MAX_IMAGE_BYTES", 1000)
    shown, *outputs = demo_model.classify(str(MONOCHROME1), *CHEST_TEXT)
    assert shown.startswith("**Cannot classify:** ") and "is over 0 MB" in shown and outputs == [None, None, None]
