"""The ONNX route of zero-shot: `ace-lora-export-onnx --labels` stores the class side, and `OnnxZeroShotClassifier`
gives the probabilities of the PyTorch model, single-label and per finding."""

import json

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.cli.export_onnx import main
from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.inference.onnx_zero_shot import OnnxZeroShotClassifier
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier, negated_templates

from conftest import REPO_ROOT, SAMPLES
from test_export_onnx import needs_onnx


TOLERANCE = 1e-4
IMAGES = [*sorted(SAMPLES.iterdir()), *sorted((REPO_ROOT / "examples" / "images").glob("*.[pd][nc][gm]"))]
FINDINGS = ["pneumonia", "edema", "cardiomegaly"]
NEGATIVE = ["a chest x-ray image with no {}.", "no findings suggesting {}."]


def pixel_values(processor) -> torch.Tensor:
    return processor(images=[load_image(path) for path in IMAGES], return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def model_and_processor(tiny_hub_folder):
    return AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)


@pytest.fixture(scope="module")
def tiny_findings_export(tiny_hub_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("onnx") / "findings"
    main(["--model", str(tiny_hub_folder), "--output", str(output), "--labels", *FINDINGS, "--multi-label",
          "--negative-templates", *NEGATIVE])
    return output


def test_the_images_are_the_shipped_samples():
    assert len(IMAGES) == 8 and {path.suffix for path in IMAGES} == {".png", ".dcm"}


@needs_onnx
def test_single_label_export_gives_the_pytorch_probabilities(tiny_hub_folder, model_and_processor, tmp_path):
    output = tmp_path / "onnx"
    labels = ["No Finding", "pneumonia", "edema"]
    main(["--model", str(tiny_hub_folder), "--output", str(output), "--labels", *labels])
    classes = json.loads((output / "export_onnx.json").read_text())["classes"]
    assert classes["labels"] == labels and classes["templates"] == list(CHEST_XRAY_TEMPLATES)
    assert classes["multi_label"] is False and classes["shape"][0] == 3
    expected = ZeroShotClassifier(*model_and_processor)(IMAGES, labels)
    onnx = OnnxZeroShotClassifier(output)
    pixels = pixel_values(model_and_processor[1])
    torch.testing.assert_close(onnx(pixels), expected, rtol=0, atol=TOLERANCE)
    # Any exported labels, in any order: each class is embedded on its own.
    torch.testing.assert_close(onnx(pixels.numpy(), ["edema", "No Finding"]),
                               ZeroShotClassifier(*model_and_processor)(IMAGES, ["edema", "No Finding"]),
                               rtol=0, atol=TOLERANCE)


@needs_onnx
def test_per_finding_export_gives_the_pytorch_probabilities(tiny_findings_export, model_and_processor):
    classes = json.loads((tiny_findings_export / "export_onnx.json").read_text())["classes"]
    assert classes["multi_label"] is True and classes["negative_templates"] == NEGATIVE
    assert classes["shape"][:2] == [3, 2]
    expected = ZeroShotClassifier(*model_and_processor, negative_templates=NEGATIVE)(IMAGES, FINDINGS,
                                                                                     multi_label=True)
    onnx = OnnxZeroShotClassifier(tiny_findings_export)
    torch.testing.assert_close(onnx(pixel_values(model_and_processor[1])), expected, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(onnx(pixel_values(model_and_processor[1]), ["edema"]), expected[:, 1:2], rtol=0,
                               atol=TOLERANCE)


@needs_onnx
def test_labels_that_were_not_exported_are_refused(tiny_findings_export, tiny_hub_folder, tmp_path):
    onnx = OnnxZeroShotClassifier(tiny_findings_export)
    pixels = torch.zeros(1, 3, 32, 32)
    with pytest.raises(InvalidArgumentError, match=r"labels \['effusion'\]: not exported to .* export again with "
                                                   "--labels"):
        onnx(pixels, ["pneumonia", "effusion"])
    with pytest.raises(InvalidArgumentError, match="a finding is repeated"):
        onnx(pixels, ["edema", "edema"])
    main(["--model", str(tiny_hub_folder), "--output", str(tmp_path / "bare")])
    with pytest.raises(InvalidArgumentError, match="exported without class embeddings; export again with "
                                                   "ace-lora-export-onnx --labels"):
        OnnxZeroShotClassifier(tmp_path / "bare")


@needs_onnx
@pytest.mark.parametrize(("argv", "message"), [
    (["--templates", "a {}."], "--templates describes the exported classes: give --labels too"),
    (["--labels", "edema", "--negative-templates", "no {}."], "pass --multi-label too"),
    (["--labels", "edema"], "give a list of two or more class names"),
    (["--labels", "edema", "--multi-label", "--negative-templates", "no edema"], "needs exactly one '{}'"),
])
def test_bad_class_options_are_one_line_before_the_model_loads(tiny_hub_folder, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--model", str(tiny_hub_folder), "--output", str(tmp_path / "onnx"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and message in err and "Traceback" not in err
    assert not (tmp_path / "onnx").exists()


def test_per_finding_classes_default_to_no_before_the_finding(model_and_processor):
    from argparse import Namespace

    from ace_lora_hf.cli.export_onnx import exported_classes
    from ace_lora_hf.sources.load import LoadedModel

    model, processor = model_and_processor
    args = Namespace(labels=FINDINGS, templates=None, multi_label=True, negative_templates=None)
    classes = exported_classes(args, LoadedModel(model, processor, ""))
    assert classes.description()["negative_templates"] == list(negated_templates(CHEST_XRAY_TEMPLATES))
    classifier = ZeroShotClassifier(model, processor)
    torch.testing.assert_close(classes.embeddings, classifier.finding_embeddings(FINDINGS), rtol=0, atol=0)


@needs_onnx
def test_without_onnxruntime_the_classifier_names_the_extra(tiny_findings_export, monkeypatch):
    import sys

    from ace_lora_hf.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"onnxruntime .* pip install 'ace-lora-hf\[onnx\]'"):
        OnnxZeroShotClassifier(tiny_findings_export)
