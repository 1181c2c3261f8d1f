"""Explanations: the numbers behind every panel, and what the figure draws from them."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

from ace_lora_hf import AceLoraImageProcessor, AceLoraModel
from ace_lora_hf.errors import AceLoraError, InvalidArgumentError
from ace_lora_hf.inference.explain import ATTENTION_RANGE, explain, plot_explanation
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier

from conftest import SAMPLES, AceLoraModelTester


MONOCHROME1 = SAMPLES / "fake_monochrome1.dcm"
RADIOGRAPH = SAMPLES / "nih_00000001_000.png"
LABELS = ("No Finding", "pneumonia", "edema")


@pytest.fixture(scope="module")
def classifier(tiny_hub_folder) -> ZeroShotClassifier:
    model = AutoModel.from_pretrained(tiny_hub_folder)
    return ZeroShotClassifier(model, AutoProcessor.from_pretrained(tiny_hub_folder))


@pytest.fixture(scope="module")
def explanation(classifier):
    return explain(classifier, MONOCHROME1, LABELS)


@pytest.fixture(scope="module")
def token_features(classifier):
    pixel_values = classifier.processor.image_processor([load_image(MONOCHROME1)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return classifier.model.vision_model.get_token_features(pixel_values)


def test_probabilities_are_the_zero_shot_classifiers(classifier, explanation):
    expected = classifier(MONOCHROME1, LABELS)[0].numpy()
    np.testing.assert_allclose(explanation.probabilities, expected, rtol=0, atol=1e-6)
    assert explanation.prediction == LABELS[int(expected.argmax())]


def test_label_maps_are_patch_cosines_with_the_class_embeddings(classifier, explanation):
    model, processor = classifier.model, classifier.processor
    pixel_values = processor(images=load_image(MONOCHROME1), return_tensors="pt")["pixel_values"]
    prompts = [template.format(label) for label in LABELS for template in classifier.templates]
    input_ids = processor(text=prompts, return_tensors="pt")["input_ids"].view(len(LABELS), 2, -1)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values).last_hidden_state
        patches = F.normalize(model.vision_model.projection(hidden[0, 1:]), dim=-1)
        classes = model.get_class_embeddings(input_ids).pooler_output
    cosine = (patches @ classes.T).T.reshape(len(LABELS), 4, 4).numpy()  # 32 px crop, 8 px patches
    np.testing.assert_allclose(explanation.patch_similarity, cosine, rtol=0, atol=1e-5)
    expected = (model.logit_scale.detach() * torch.from_numpy(cosine)).softmax(dim=0).numpy()
    np.testing.assert_allclose(explanation.patch_probabilities, expected, rtol=0, atol=1e-5)


def test_linked_patches_are_the_hypergraphs_cls_neighbours(classifier, explanation, token_features):
    tokens, weights = classifier.model.vision_model.hypergraph.cls_neighbours(token_features.cls_attention)
    np.testing.assert_array_equal(explanation.linked_patches, tokens[0].numpy() - 1)
    np.testing.assert_allclose(explanation.link_weights, weights[0].numpy(), rtol=0, atol=1e-6)
    assert len(explanation.linked_patches) == classifier.model.config.vision_config.hypergraph_top_k


def test_attention_is_the_share_per_patch_relative_to_uniform(explanation, token_features):
    scores = token_features.cls_attention[0]
    expected = (scores.softmax(dim=-1) * scores.numel()).view(4, 4).numpy()
    np.testing.assert_allclose(explanation.relative_attention, expected, rtol=1e-6)
    assert explanation.relative_attention.mean() == pytest.approx(1.0)
    # The documented link between the panels: the links' weights are their attention shares, renormalised.
    linked = explanation.relative_attention.ravel()[explanation.linked_patches]
    np.testing.assert_allclose(explanation.link_weights, linked / linked.sum(), rtol=1e-5)


@pytest.mark.parametrize("width, height", [(320, 200), (200, 320), (250, 250)])
@pytest.mark.parametrize("shortest_edge", [32, 224])
def test_the_crop_window_is_where_the_models_view_lies_in_the_original(width, height, shortest_edge):
    processor = AceLoraImageProcessor(size={"shortest_edge": shortest_edge},
                                      crop_size={"height": shortest_edge, "width": shortest_edge})
    y, x = np.mgrid[0:height, 0:width]
    original = Image.fromarray((127 + 60 * np.sin(x / 17) + 60 * np.cos(y / 13)).astype(np.uint8))
    box = processor.crop_window(height, width).in_original(height, width)
    left, top, right, bottom = box
    assert right - left == pytest.approx(bottom - top, rel=0.02)  # a square of the original
    assert (left == 0 or top == 0) and min(right - left, bottom - top) == pytest.approx(min(width, height), rel=0.02)
    view = processor([original], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0, 0]
    from_box = np.asarray(original.resize((shortest_edge,) * 2, Image.Resampling.BICUBIC, box=box))
    assert np.abs(view.astype(int) - from_box).max() <= 1


def test_the_explanation_keeps_the_original_and_the_models_view(classifier, explanation):
    assert explanation.image.size == load_image(MONOCHROME1).size == (1024, 1024)
    assert explanation.crop.size == (32, 32) and explanation.crop.mode == "RGB"
    assert explanation.crop_box == (0.0, 0.0, 1024.0, 1024.0)


def test_fewer_than_two_labels_are_refused(classifier):
    with pytest.raises(InvalidArgumentError, match="at least two labels"):
        explain(classifier, MONOCHROME1, ["pneumonia"])


def test_a_model_without_vision_hypergraph_has_no_links(tiny_hub_folder):
    tester = AceLoraModelTester(image_size=32, patch_size=8, text_context_length=256)
    model = AceLoraModel(tester.get_config(hypergraph_towers="text")).eval()
    assert model.vision_model.hypergraph is None
    explained = explain(ZeroShotClassifier(model, AutoProcessor.from_pretrained(tiny_hub_folder)), RADIOGRAPH, LABELS)
    assert explained.linked_patches.size == 0 and explained.link_weights.size == 0


# ----------------------------------------------------------------------------------------------------- figure


@pytest.fixture(scope="module")
def figure(explanation):
    pytest.importorskip("matplotlib", reason="needs the [plot] extra (matplotlib): pip install 'ace-lora-hf[plot]'")
    return plot_explanation(explanation, title="fake_monochrome1.dcm")


def _heat_map(axes):
    (image,) = axes.get_images()
    return image


def test_figure_panels_and_titles(figure, explanation):
    original, links, attention, *label_panels = figure.axes[:6]
    assert figure.get_suptitle().startswith("fake_monochrome1.dcm: Prediction: ")
    assert explanation.prediction in figure.get_suptitle()
    assert original.get_title() == "Input, 1024×1024 px\n(the model sees all of it, resized)"
    (dashed,) = original.patches
    assert (dashed.get_x(), dashed.get_y(), dashed.get_width(), dashed.get_height()) == (0, 0, 1024, 1024)
    assert "links to CLS" in links.get_title()
    boxes = [(patch.get_x(), patch.get_y()) for patch in links.patches]
    assert boxes == [(8 * (index % 4), 8 * (index // 4)) for index in explanation.linked_patches.tolist()]
    assert [text.get_text() for text in links.texts] == ["1", "2", "3"]
    assert all(f"{weight:.3f}" in links.get_xlabel() for weight in explanation.link_weights)
    assert "CLS attention" in attention.get_title()
    np.testing.assert_array_equal(_heat_map(attention).get_array(), explanation.relative_attention)
    for index, (panel, label) in enumerate(zip(label_panels, LABELS)):
        assert panel.get_title().startswith(f"{label}\np = {explanation.probabilities[index]:.3f}")
        assert ("(prediction)" in panel.get_title()) == (label == explanation.prediction)
        np.testing.assert_array_equal(_heat_map(panel).get_array(), explanation.patch_probabilities[index])


def test_colour_scales_are_fixed_across_images(classifier, figure):
    landscape = Image.fromarray(np.tile(np.arange(400, dtype=np.uint8) % 251, (240, 1)))
    other = plot_explanation(explain(classifier, landscape, LABELS))
    assert other.axes[0].get_title() == "Input, 400×240 px\n(dashed: the part the model sees)"
    for axes in (figure.axes[2], other.axes[2]):
        norm = _heat_map(axes).norm
        assert (norm.vmin, norm.vmax) == ATTENTION_RANGE
    for axes in (figure.axes[3], other.axes[3]):
        norm = _heat_map(axes).norm
        assert (norm.vmin, norm.vcenter, norm.vmax) == (0, 1 / len(LABELS), 1)
    colour_bars = [axes for axes in figure.axes if axes.get_label() == "<colorbar>"]
    assert [bar.get_ylabel() for bar in colour_bars] == [
        "share × 16 patches (1 = uniform)", "patch-level P(label); white = chance (0.33)"]


def test_figure_is_slide_sized(figure):
    width, height = figure.get_size_inches() * figure.dpi
    assert (width, height) == pytest.approx((1890, 1260))  # 3 columns; the input row and one row of three labels


def test_missing_matplotlib_names_the_extra(explanation, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(AceLoraError, match=r"pip install 'ace-lora-hf\[plot\]'"):
        plot_explanation(explanation)
