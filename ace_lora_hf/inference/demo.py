"""The browser demo's page: zero-shot classification of an uploaded image (PNG, JPEG, TIFF or DICOM) with its
explanation, around one loaded model (`ace-lora-app`, `app.py`). Built with Gradio: `pip install 'ace-lora-hf[app]'`.
Class embeddings are cached per label set and template list.
"""

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import AceLoraError, InvalidArgumentError
from .explain import explain, plot_explanation
from .intended_use import INTENDED_USE
from ..models.ace_lora.calibration import Calibration
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from ..models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, PATHOLOGY_TEMPLATES, ZeroShotClassifier


APP_EXTRA_HINT = "pip install 'ace-lora-hf[app]'"
EXAMPLES_FOLDER = Path(__file__).resolve().parents[2] / "examples" / "images"
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
# Preset name -> (labels, templates): the label sets of the paper's zero-shot benchmarks.
PRESETS = {
    "Chest X-ray: pneumonia (RSNA)": (("No Finding", "pneumonia"), CHEST_XRAY_TEMPLATES),
    "Chest X-ray: pneumothorax (SIIM)": (("No Finding", "pneumothorax"), CHEST_XRAY_TEMPLATES),
    "Chest X-ray: five findings (CheXpert 5x200)": (
        ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"), CHEST_XRAY_TEMPLATES),
    "Pathology: lung (LC25000)": (
        ("lung adenocarcinoma", "benign lung tissue", "lung squamous cell carcinoma"), PATHOLOGY_TEMPLATES),
    "Pathology: colon (LC25000)": (("colon adenocarcinoma", "benign colonic tissue"), PATHOLOGY_TEMPLATES),
    "Pathology: colorectal polyps (MHIST)": (("hyperplastic polyp", "sessile serrated adenoma"), PATHOLOGY_TEMPLATES),
}
DEFAULT_PRESET = next(iter(PRESETS))
CACHED_TEMPLATE_LISTS = 16
NO_IMAGE = "Upload an image (PNG, JPEG, TIFF or DICOM) or pick an example first."
# What one request of a public page may ask for: each label costs a text-tower pass per template, and a visitor can
# type thousands (3,000 labels ran the server out of memory).
REQUEST_LIMITS = {"label": 64, "template": 8}
MAX_ENTRY_CHARACTERS = 300
MAX_IMAGE_BYTES = 64 * 2**20  # a full-size chest X-ray DICOM is 10-30 MB


def parse_lines(text: str, what: str) -> tuple[str, ...]:
    """One entry a line; blank lines dropped, duplicates refused, and no more than the page serves per request."""
    entries = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(entries) > REQUEST_LIMITS[what]:
        raise InvalidArgumentError(f"{len(entries)} {what}s: this page classifies with at most "
                                   f"{REQUEST_LIMITS[what]} at a time; shorten the list.")
    long = next((entry for entry in entries if len(entry) > MAX_ENTRY_CHARACTERS), None)
    if long is not None:
        raise InvalidArgumentError(f"The {what} {long[:40]!r}... is {len(long)} characters long; keep each under "
                                   f"{MAX_ENTRY_CHARACTERS}.")
    duplicates = sorted({entry for entry in entries if entries.count(entry) > 1})
    if duplicates:
        raise InvalidArgumentError(f"The {what} list names {', '.join(map(repr, duplicates))} more than once.")
    return entries


def parse_labels(text: str) -> tuple[str, ...]:
    labels = parse_lines(text, "label")
    if len(labels) < 2:
        raise InvalidArgumentError("Enter at least two labels, one a line.")
    return labels


def parse_templates(text: str) -> tuple[str, ...]:
    templates = parse_lines(text, "template")
    if not templates:
        raise InvalidArgumentError("Enter at least one template, one a line, with {} where the label goes.")
    for template in templates:
        rest = template.replace("{}", "", 1)
        if "{}" not in template or "{" in rest or "}" in rest:
            raise InvalidArgumentError(
                f"The template {template!r} needs {{}} exactly once, where the label goes, and no other braces.")
    return templates


def figure_to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Image.open(buffer)


class ZeroShotDemo:
    """What the page calls: one loaded model, one `ZeroShotClassifier` (with its class embeddings) per template list."""

    def __init__(self, model: AceLoraModel, processor: AceLoraProcessor, calibration: Calibration | None = None):
        self.model = model
        self.processor = processor
        self.calibration = calibration
        self.classifier = lru_cache(maxsize=CACHED_TEMPLATE_LISTS)(self._new_classifier)

    def _new_classifier(self, templates: tuple[str, ...]) -> ZeroShotClassifier:
        return ZeroShotClassifier(self.model, self.processor, templates)

    def classify(self, image_path: str | None, labels_text: str, templates_text: str):
        """The page's outputs: a message, the probabilities (bars and table) and the explanation picture.

        An input the model cannot use (no file, a bad file, a wrong template) gives its message and empty outputs.
        """
        try:
            if not image_path:
                raise InvalidArgumentError(NO_IMAGE)
            if Path(image_path).stat().st_size > MAX_IMAGE_BYTES:
                raise InvalidArgumentError(f"{Path(image_path).name} is over {MAX_IMAGE_BYTES // 2**20} MB; this page "
                                           "takes smaller images.")
            labels, templates = parse_labels(labels_text), parse_templates(templates_text)
            name = Path(image_path).name
            explanation = explain(self.classifier(templates), image_path, labels, name=name)
        except AceLoraError as error:
            return f"**Cannot classify:** {error}", None, None, None
        probabilities, note = dict(zip(labels, explanation.probabilities.tolist())), ""
        if self.calibration is not None:
            probabilities, note = self.calibrated(explanation.probabilities, labels, templates)
        best = probabilities[explanation.prediction]  # a temperature keeps the order of the labels
        message = f"**{name}**: prediction **{explanation.prediction}** (p = {best:.4f}){note}"
        table = [[label, f"{probability:.4f}"] for label, probability in probabilities.items()]
        return message, probabilities, table, figure_to_image(plot_explanation(explanation, title=name))

    def calibrated(self, probabilities: np.ndarray, labels: tuple[str, ...],
                   templates: tuple[str, ...]) -> tuple[dict[str, float], str]:
        """The served calibration's probabilities and decisions, where it was fitted for these labels and templates
        (the zero-shot ones and a note otherwise)."""
        calibration = self.calibration
        if (calibration.labels, calibration.templates) != (labels, templates):
            return dict(zip(labels, probabilities.tolist())), (
                "\n\nThe calibration file was fitted for other labels or templates: these scores are uncalibrated.")
        # Log-probabilities differ from the logits by one constant per image, which the softmax removes.
        scaled = calibration.apply(torch.from_numpy(np.log(probabilities))[None])
        calibrated = dict(zip(labels, scaled[0].tolist()))
        note = f"\n\nCalibrated scores (temperature {calibration.temperature:.3f})."
        if calibration.thresholds:
            target = calibration.target
            decisions = ", ".join(f"{label}: **{'yes' if decided[0] else 'no'}**"
                                  for label, decided in calibration.decide(scaled).items())
            note += (f" Operating point (threshold for {target['metric']} {target['value']} on the validation "
                     f"table): {decisions}.")
        return calibrated, note


def example_files(folder: Path = EXAMPLES_FOLDER) -> list[str]:
    return sorted(str(path) for path in folder.glob("*") if path.suffix.lower() in EXAMPLE_SUFFIXES)


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise AceLoraError(f"The demo needs Gradio: {APP_EXTRA_HINT}") from None
    return gradio


def build_demo(model: AceLoraModel, processor: AceLoraProcessor, calibration: Calibration | None = None):
    """The Gradio page (`gradio.Blocks`) around one loaded model (and the calibration it serves, if any)."""
    gr = import_gradio()
    demo_model = ZeroShotDemo(model, processor, calibration)
    labels, templates = PRESETS[DEFAULT_PRESET]
    with gr.Blocks(title="ACE-LoRA zero-shot classification") as demo:
        gr.Markdown(
            "# ACE-LoRA: zero-shot classification of chest X-rays and pathology slides\n"
            "Upload an image, edit the labels and prompt templates, and see the probabilities and what the model "
            "looked at. A research demo: not a medical device."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image: PNG, JPEG, TIFF or DICOM", file_count="single", type="filepath",
                                     elem_id="image-file")
                preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset", elem_id="preset")
                labels_box = gr.Textbox("\n".join(labels), lines=5, label="Labels, one a line", elem_id="labels")
                templates_box = gr.Textbox("\n".join(templates), lines=2, elem_id="templates",
                                           label="Prompt templates, one a line, {} where the label goes")
                classify = gr.Button("Classify", variant="primary", elem_id="classify")
                if example_files():
                    gr.Examples([[path] for path in example_files()], inputs=[image_file], label="Example images")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                bars = gr.Label(label="Probabilities", elem_id="bars")
                table = gr.Dataframe(headers=["label", "probability"], label="Probabilities", elem_id="probabilities",
                                     interactive=False)
        picture = gr.Image(label="Explanation", type="pil", format="png", elem_id="explanation", interactive=False)
        with gr.Accordion("Intended use, limitations, and how to read the scores", open=False):
            gr.Markdown(INTENDED_USE, elem_id="intended-use")
        preset.change(lambda name: tuple("\n".join(part) for part in PRESETS[name]), preset,
                      [labels_box, templates_box])
        classify.click(demo_model.classify, [image_file, labels_box, templates_box], [message, bars, table, picture])
    return demo


__all__ = ["DEFAULT_PRESET", "EXAMPLES_FOLDER", "PRESETS", "REQUEST_LIMITS", "ZeroShotDemo", "build_demo",
           "example_files", "import_gradio"]
