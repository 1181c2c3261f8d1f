"""The Inference Endpoints handler of a staged repository: driven as the endpoint's toolkit drives it (constructed with
the repository's path, called with the request dict) in an interpreter without the package; scores equal to the
model's, error entries for unusable images, caps, class prompts encoded once per (labels, templates)."""

import base64
import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_imports

from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.models.ace_lora import batch_inference, handler as handler_module
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.models.ace_lora.calibration import Calibration
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier

from conftest import SAMPLES
from test_loading import isolated_env, run_python
from test_pipeline import LABELS, as_probabilities
from test_publishing import staged  # noqa: F401 (the staged repository fixture)


DICOM = SAMPLES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
PNG = SAMPLES / "nih_00000001_000.png"
ONE_TEMPLATE = ["a chest X-ray image of {}."]
# As the Inference Endpoints toolkit loads a repository's handler: the file by its path, the class built with the
# repository's path, then called with each request dict; ace_lora_hf cannot be imported.
TOOLKIT_SCRIPT = """
import importlib.util, json, sys
sys.modules["ace_lora_hf"] = None
spec = importlib.util.spec_from_file_location("handler", sys.argv[1] + "/handler.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
handler = module.EndpointHandler(sys.argv[1])
answers = []
for request in json.loads(open(sys.argv[2]).read()):
    try:
        answers.append(handler(request))
    except Exception as error:
        answers.append({"refused": type(error).__name__, "message": str(error)})
print(json.dumps({"module": type(handler.pipeline).__module__, "answers": answers}))
"""


def encoded(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def model_and_processor(staged):  # noqa: F811
    return AutoModel.from_pretrained(staged).eval(), AutoProcessor.from_pretrained(staged)


def model_probabilities(model, processor, paths, labels, template: str) -> torch.Tensor:
    """Softmax over labels of `model(...)`'s logits_per_image, with one template."""
    inputs = processor(text=[template.format(label) for label in labels],
                       images=[load_image(path) for path in paths], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image.softmax(dim=-1)


def test_staged_repository_carries_the_handler_and_what_its_code_imports(staged):  # noqa: F811
    assert (staged / "handler.py").read_text() == open(handler_module.__file__).read()
    required = {line.split("==")[0].lower() for line in (staged / "requirements.txt").read_text().splitlines()}
    imported = {name for file in staged.glob("*.py") for name in get_imports(str(file))}
    third_party = imported - set(sys.stdlib_module_names) - {"ace_lora_hf"}  # only hf_model_inference.py needs it
    assert {"torch", "transformers", "peft", "pillow", "pydicom", "numpy"} <= required
    assert "+" not in (staged / "requirements.txt").read_text()  # no local build label, e.g. torch's +cpu
    assert {name.lower().replace("pil", "pillow") for name in third_party} <= required


def test_handler_scores_a_dicom_and_a_png_as_the_model_without_the_package(staged, model_and_processor,  # noqa: F811
                                                                            tmp_path):
    requests = [
        {"inputs": [encoded(DICOM), encoded(PNG)], "parameters": {"candidate_labels": LABELS}},
        {"inputs": [encoded(DICOM), encoded(PNG)],
         "parameters": {"candidate_labels": LABELS, "templates": ONE_TEMPLATE}},
        {"inputs": "data:image/png;base64," + encoded(PNG), "parameters": {"candidate_labels": LABELS}},
        {"inputs": ["", "not base64!", base64.b64encode(b"not an image").decode(), encoded(PNG)],
         "parameters": {"candidate_labels": LABELS}},
        {"parameters": {"candidate_labels": LABELS}},
        {"inputs": [], "parameters": {"candidate_labels": LABELS}},
        {"inputs": [encoded(PNG)], "parameters": {"candidate_labels": [f"class {i}" for i in range(65)]}},
        {"inputs": [encoded(PNG)] * 33, "parameters": {"candidate_labels": LABELS}},
    ]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    remote = run_python(TOOLKIT_SCRIPT, str(staged), str(tmp_path / "requests.json"), env=isolated_env(tmp_path))
    assert remote["module"].startswith("transformers_modules.") and remote["module"].endswith(".pipeline_ace_lora")
    both, one_template, single, mixed, empty, empty_list, many_labels, many_images = remote["answers"]
    model, processor = model_and_processor

    expected = ZeroShotClassifier(model, processor)([DICOM, PNG], LABELS)
    torch.testing.assert_close(as_probabilities(both, LABELS), expected, rtol=0, atol=1e-5)
    forward = model_probabilities(model, processor, [DICOM, PNG], LABELS, ONE_TEMPLATE[0])
    torch.testing.assert_close(as_probabilities(one_template, LABELS), forward, rtol=0, atol=1e-5)
    assert [entry["score"] for entry in single] == sorted((entry["score"] for entry in single), reverse=True)
    torch.testing.assert_close(as_probabilities([single], LABELS), expected[1:], rtol=0, atol=1e-5)

    assert mixed[0] == {"error": "image 0: no image; send the file's bytes base64-encoded under inputs."}
    assert mixed[1] == {"error": "image 1: not base64; send the file's bytes base64-encoded."}
    assert mixed[2]["error"].startswith("image 2: ")
    torch.testing.assert_close(as_probabilities(mixed[3:], LABELS), expected[1:], rtol=0, atol=1e-5)
    assert empty == empty_list == {"error": "image 0: no image; send the file's bytes base64-encoded under inputs."}
    assert many_labels == {"refused": "InvalidArgumentError", "message": "parameters.candidate_labels: 65 given, "
                                                                         "at most 64 a request; split the request."}
    assert many_images["message"] == "inputs: 33 given, at most 32 a request; split the request."


def test_images_over_the_caps_get_an_error_entry(staged, monkeypatch):  # noqa: F811
    handler = handler_module.EndpointHandler(str(staged))
    monkeypatch.setattr(handler_module, "MAX_PIXELS", 1000)
    request = {"inputs": [encoded(PNG)], "parameters": {"candidate_labels": LABELS}}
    assert handler(request)[0]["error"].startswith("image 0: 512 x 512 pixels, more than 1000;")
    monkeypatch.setattr(handler_module, "MAX_IMAGE_BYTES", 1000)
    assert handler(request)[0]["error"].startswith("image 0: larger than ")
    with pytest.raises(InvalidArgumentError, match="candidate_labels: give a list"):
        handler({"inputs": encoded(PNG), "parameters": {}})
    with pytest.raises(InvalidArgumentError, match="^parameters: give a JSON object"):
        handler({"inputs": encoded(PNG), "parameters": ["no", "labels"]})
    with pytest.raises(InvalidArgumentError, match=r"^parameters.templates: 17 given, at most 16 a request"):
        handler({"inputs": encoded(PNG), "parameters": {"candidate_labels": LABELS, "templates": ["{}"] * 17}})


def test_class_prompts_are_encoded_once_per_labels_and_templates(staged, monkeypatch):  # noqa: F811
    monkeypatch.setattr(batch_inference, "CPU_CHUNK_TOKENS", 10**6)  # one model call per label set
    handler = handler_module.EndpointHandler(str(staged))
    model, calls = handler.pipeline.model, []
    encode = model.get_class_embeddings
    monkeypatch.setattr(model, "get_class_embeddings", lambda *args, **kwargs: calls.append(1) or encode(*args,
                                                                                                         **kwargs))
    for templates in (None, None, ONE_TEMPLATE, ONE_TEMPLATE):
        parameters = {"candidate_labels": LABELS, **({"templates": templates} if templates else {})}
        handler({"inputs": encoded(PNG), "parameters": parameters})
    assert len(calls) == 2  # one label set with two template lists
    handler({"inputs": encoded(PNG), "parameters": {"candidate_labels": LABELS[:2]}})
    assert len(calls) == 3


def test_a_repository_with_a_calibration_file_returns_calibrated_scores_and_decisions(staged, tmp_path):  # noqa: F811
    """Calibrated scores are softmax(logits / T): from the raw scores p, softmax(log p / T). A request for other labels
    is refused unless it asks for raw scores."""
    repository = tmp_path / "repo"
    shutil.copytree(staged, repository)
    raw = handler_module.EndpointHandler(str(repository))({"inputs": encoded(PNG),
                                                           "parameters": {"candidate_labels": LABELS}})
    calibration = Calibration(tuple(LABELS), CHEST_XRAY_TEMPLATES, temperature=2.5, thresholds={LABELS[-1]: 0.3})
    (repository / "calibration.json").write_text(json.dumps(calibration.to_dict()))
    handler = handler_module.EndpointHandler(str(repository))
    calibrated = handler({"inputs": encoded(PNG), "parameters": {"candidate_labels": LABELS}})
    raw_scores = torch.tensor([next(e["score"] for e in raw if e["label"] == label) for label in LABELS])
    expected = (raw_scores.log() / 2.5).softmax(dim=-1)
    scores = {entry["label"]: entry["score"] for entry in calibrated}
    assert torch.allclose(torch.tensor([scores[label] for label in LABELS]), expected, atol=1e-5)
    decided = {entry["label"]: entry["decision"] for entry in calibrated if "decision" in entry}
    assert decided == {LABELS[-1]: bool(expected[-1] >= 0.3)}
    with pytest.raises(InvalidArgumentError, match="the calibration file was fitted for labels"):
        handler({"inputs": encoded(PNG), "parameters": {"candidate_labels": LABELS[:2]}})
    uncalibrated = handler({"inputs": encoded(PNG), "parameters": {"candidate_labels": LABELS[:2],
                                                                   "calibrated": False}})
    assert [entry["label"] for entry in uncalibrated] and all("decision" not in e for e in uncalibrated)
