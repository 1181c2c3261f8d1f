"""Zero-shot classification and the metric code it reports with."""

import math

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from ace_lora_hf.models.ace_lora import batch_inference
from ace_lora_hf.errors import ImageLoadError, InvalidArgumentError
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.evaluation.metrics import classification_metrics, multilabel_metrics
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, PATHOLOGY_TEMPLATES, ZeroShotClassifier

from conftest import SAMPLES


IMAGES = [SAMPLES / "nih_00000001_000.png", SAMPLES / "fake_monochrome1.dcm", SAMPLES / "nih_00027426_000.png"]


@pytest.fixture(scope="module")
def model_and_processor(tiny_hub_folder):
    return AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)


def test_probabilities_follow_spec_section_6(model_and_processor):
    model, processor = model_and_processor
    labels = ["No Finding", "pneumonia", "edema"]
    probabilities = ZeroShotClassifier(model, processor, batch_size=2)(IMAGES, labels)
    prompts = [template.format(label) for label in labels for template in CHEST_XRAY_TEMPLATES]
    tokens = processor(text=prompts, return_tensors="pt")["input_ids"].view(3, 2, -1)
    pixels = processor(images=[load_image(path) for path in IMAGES], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixels).pooler_output
        logits = model.logit_scale * image @ model.get_class_embeddings(tokens).pooler_output.t()
    torch.testing.assert_close(probabilities, logits.softmax(dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))


def test_class_prompts_are_encoded_once_per_label_set(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    classifier = ZeroShotClassifier(model, processor, templates=PATHOLOGY_TEMPLATES)
    calls = []
    encode = model.get_class_embeddings
    monkeypatch.setattr(model, "get_class_embeddings", lambda *a, **k: calls.append(1) or encode(*a, **k))
    first = classifier(IMAGES[0], ["adenocarcinoma", "benign tissue"])
    second = classifier(IMAGES[1:], ["adenocarcinoma", "benign tissue"])
    classifier(IMAGES[0], ["benign tissue", "adenocarcinoma"])
    assert len(calls) == 2 and first.shape == (1, 2) and second.shape == (2, 2)


@pytest.mark.parametrize(
    ("templates", "message"),
    [(["a chest X-ray"], "needs exactly one '{}'"), (["{} and {}"], "needs exactly one '{}'"),
     ("a chest X-ray of {}.", "give a non-empty list of templates"), ([], "give a non-empty list of templates")],
)
def test_templates_need_exactly_one_placeholder(model_and_processor, templates, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ZeroShotClassifier(*model_and_processor, templates=templates)


@pytest.mark.parametrize(
    ("labels", "message"),
    [([], "list of two or more class names"), ("pneumonia", "list of two or more class names"),
     (["pneumonia"], "list of two or more class names"),
     (["pneumonia", " "], "every label must be a non-empty string"), (["a", "a"], "repeated")],
)
def test_labels_are_a_list_of_distinct_names(model_and_processor, labels, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ZeroShotClassifier(*model_and_processor)(IMAGES, labels)


def test_no_images_give_an_empty_result_and_a_bad_batch_size_is_refused(model_and_processor):
    assert ZeroShotClassifier(*model_and_processor)([], ["a", "b"]).shape == (0, 2)
    with pytest.raises(InvalidArgumentError, match="batch_size=0"):
        ZeroShotClassifier(*model_and_processor, batch_size=0)


def test_workers_give_the_same_probabilities_and_report_bad_files(model_and_processor, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM but not really")
    images = [IMAGES[0], broken, IMAGES[1], IMAGES[2]]
    in_process = list(ZeroShotClassifier(*model_and_processor, batch_size=2).classify(images, ["a", "b"]))
    workers = list(ZeroShotClassifier(*model_and_processor, batch_size=2, num_workers=2).classify(images, ["a", "b"]))
    for ours, theirs in zip(in_process, workers):
        assert ours.indices == theirs.indices and ours.failures == theirs.failures
        torch.testing.assert_close(ours.probabilities, theirs.probabilities, rtol=0, atol=1e-6)
    assert [batch.indices for batch in workers] == [[0], [2, 3]] and workers[0].failures[0][0] == 1
    with pytest.raises(ImageLoadError, match=f"{broken}: "):
        ZeroShotClassifier(*model_and_processor)(images, ["a", "b"])


def test_binary_metrics_hand_computed():
    positive = [0.9, 0.4, 0.6, 0.2, 0.7]
    probabilities = [[1 - p, p] for p in positive]
    metrics = classification_metrics(probabilities, [1, 1, 0, 0, 1])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    # Positive/negative pairs ranked correctly: (0.9>0.6, 0.9>0.2, 0.4>0.2, 0.7>0.6, 0.7>0.2) of 6.
    assert metrics["auc"] == pytest.approx(5 / 6)


def test_multiclass_metrics_hand_computed():
    probabilities = [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]]
    metrics = classification_metrics(probabilities, [0, 2, 2, 1])
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    # One-vs-rest AUCs: class 0: 3/3; class 1: (0.4 > 0.2, 0.3 ; < 0.5) = 2/3; class 2: (0.4, 0.5 vs 0.1, 0.2) = 4/4.
    assert metrics["auc"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_multilabel_metrics_hand_computed():
    scores = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.3], [0.1, 0.4]]
    metrics = multilabel_metrics(scores, [[1, 0], [0, 1], [0, 0], [1, 0]])
    # class 0: positives 0.9, 0.1 vs negatives 0.2, 0.6 -> 2/4; class 1: positive 0.8 above 0.1, 0.3, 0.4 -> 1.
    assert metrics["auc_per_class"] == pytest.approx([0.5, 1.0])
    assert metrics["auc"] == pytest.approx(0.75)


def test_metrics_reject_bad_input():
    assert math.isnan(classification_metrics([[0.8, 0.2], [0.7, 0.3]], [1, 1])["auc"])
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics([[0.8, 0.2], [0.7, 0.3]], [1, 2])
    with pytest.raises(ValueError, match="2 score rows for 3 targets"):
        classification_metrics([[0.8, 0.2], [0.7, 0.3]], [1, 0, 1])


@pytest.mark.parametrize(("device", "cpus", "workers"), [("cpu", 2, 0), ("cpu", 16, 0), ("cuda", 1, 0), ("cuda", 2, 1),
                                                         ("cuda", 16, 8)])
def test_default_decoding_workers_leave_the_cpu_to_a_model_on_it(device, cpus, workers, monkeypatch):
    monkeypatch.setattr(batch_inference, "available_cpus", lambda: cpus)
    assert batch_inference.default_num_workers(device) == workers
