"""transformers 5.x conventions as CLIP users rely on them: outputs, half precision, compile and export, and loading
folders saved by ace-lora-hf 0.1."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSemanticSegmentation
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ace_lora_hf import AceLoraForObjectDetection, AceLoraForSegmentation, AceLoraModel, AceLoraVisionModel
from ace_lora_hf.errors import InvalidArgumentError

from conftest import perturb_lora


RELEASE_0_1 = Path(__file__).parent / "fixtures" / "ace_lora_0_1"


class ImageEmbedding(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output


class TextEmbedding(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids, attention_mask).pooler_output


@pytest.fixture
def text_inputs(tester):
    _, inputs = tester.prepare_config_and_inputs()
    input_ids = torch.nn.functional.pad(inputs["input_ids"], (0, tester.text_context_length - 12))
    return input_ids, (input_ids != 0).long()


# --------------------------------------------------------------------------------------------------- outputs


def test_features_follow_clip_output_conventions(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    with torch.no_grad():
        image = tiny_model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
        text = tiny_model.get_text_features(inputs["input_ids"])
        image_tuple = tiny_model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    patches = (tester.image_size // tester.patch_size) ** 2
    assert image.last_hidden_state.shape == (tester.batch_size, patches + 1, tester.hidden_size)
    assert len(image.hidden_states) == tester.num_layers + 1 and text.hidden_states is None
    torch.testing.assert_close(image.pooler_output.norm(dim=-1), torch.ones(tester.batch_size))
    assert isinstance(image_tuple, tuple) and torch.equal(image_tuple[1], image.pooler_output)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.vision_model(inputs["pixel_values"]).pooler_output, image.pooler_output)


def test_forward_takes_either_tower_alone(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    with torch.no_grad():
        images = tiny_model(pixel_values=inputs["pixel_values"])
        texts = tiny_model(input_ids=inputs["input_ids"])
        both = tiny_model(**inputs, return_dict=False)
    assert images.text_embeds is None and images.logits_per_image is None and images.image_embeds is not None
    assert texts.image_embeds is None and texts.text_model_output is not None
    assert isinstance(both, tuple) and torch.equal(both[0], tiny_model(**inputs).logits_per_image)
    with pytest.raises(InvalidArgumentError, match="needs pixel_values, input_ids or both"):
        tiny_model()
    with pytest.raises(InvalidArgumentError, match="needs both"):
        tiny_model(pixel_values=inputs["pixel_values"], return_loss=True)


def test_misspelt_keywords_are_rejected(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    with pytest.raises(TypeError, match="pixel_value"):
        tiny_model(pixel_value=inputs["pixel_values"])
    with pytest.raises(TypeError, match="use_hgn"):
        tiny_model.get_image_features(inputs["pixel_values"], use_hgn=False)


def test_a_tower_saves_and_loads_on_its_own(tiny_model, tester, tmp_path):
    _, inputs = tester.prepare_config_and_inputs()
    tiny_model.vision_model.save_pretrained(tmp_path)
    tower = AutoModel.from_pretrained(tmp_path).eval()
    assert type(tower) is AceLoraVisionModel
    with torch.no_grad():
        torch.testing.assert_close(tower(inputs["pixel_values"]).pooler_output,
                                   tiny_model.get_image_features(inputs["pixel_values"]).pooler_output)
    assert [name for name, p in tower.named_parameters() if p.requires_grad] == [
        name.removeprefix("vision_model.") for name, p in tiny_model.named_parameters()
        if p.requires_grad and name.startswith("vision_model.")]


# -------------------------------------------------------------------------------------------- half precision


def _precision_report(model) -> dict[str, torch.dtype]:
    vision = model.vision_model
    return {
        "matmuls": vision.layers[0].mlp.fc1.weight.dtype,
        "lora": vision.layers[0].attention.q_proj.lora_A["default"].weight.dtype,
        "hypergraph": vision.hypergraph.edge_adapter.up.weight.dtype,
        "projection": vision.projection.weight.dtype,
        "embeddings": vision.embeddings.position_embeddings.dtype,
        "norms": model.text_model.encoder.layer[0].output.LayerNorm.weight.dtype,
        "logit_scale": model.logit_scale.dtype,
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["from_pretrained", "to", "half_method"])
def test_half_precision_keeps_the_sensitive_parts_in_float32(tiny_model, tester, tmp_path, dtype, how):
    _, inputs = tester.prepare_config_and_inputs()
    tiny_model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = tiny_model(**inputs).logits_per_image.softmax(-1)
    if how == "from_pretrained":
        model = AutoModel.from_pretrained(tmp_path, dtype=dtype).eval()
    else:
        model = AutoModel.from_pretrained(tmp_path).eval()
        model = model.to(dtype) if how == "to" else (model.half() if dtype == torch.float16 else model.bfloat16())
    report = _precision_report(model)
    assert report.pop("matmuls") == dtype
    assert set(report.values()) == {torch.float32}, report
    model.merge_lora()
    with torch.no_grad():
        output = model(**inputs)
    assert output.image_embeds.dtype == output.text_embeds.dtype == torch.float32
    torch.testing.assert_close(output.logits_per_image.softmax(-1), expected, rtol=0, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_class", [AceLoraModel, AceLoraForSegmentation, AceLoraForObjectDetection])
def test_a_model_built_in_half_precision_has_its_float32_parts_in_float32(tester, model_class, dtype):
    config = tester.get_config()
    if model_class is AceLoraModel:
        model = AutoModel.from_config(config, dtype=dtype)
    else:
        model = model_class._from_config(config, dtype=dtype)
    float32_parts = model._float32_tensor_ids()
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    dtypes = {name: tensor.dtype for name, tensor in tensors.items()}
    kept = {name for name, tensor in tensors.items() if id(tensor) in float32_parts and tensor.is_floating_point()}
    assert {"vision_model.projection.weight" if model_class is AceLoraModel else "vision_model.embeddings.cls_token",
            "vision_model.layers.0.attention.q_proj.lora_A.default.weight"} <= kept
    assert {dtypes[name] for name in kept} == {torch.float32}
    assert dtypes["vision_model.layers.0.mlp.fc1.weight"] == dtype
    if model_class is AceLoraModel:
        assert dtypes["logit_scale"] == torch.float32


def test_a_half_precision_model_saves_and_reloads(tiny_model, tmp_path):
    tiny_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    reloaded = AutoModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert _precision_report(reloaded) == _precision_report(tiny_model)
    for (name, tensor), (_, original) in zip(reloaded.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(tensor, original), name


# ---------------------------------------------------------------------------------------- compile and export


def test_embedding_paths_compile_as_one_graph(tiny_model, tester, text_inputs):
    _, inputs = tester.prepare_config_and_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        for module, args in ((ImageEmbedding(tiny_model), (inputs["pixel_values"],)),
                             (TextEmbedding(tiny_model), text_inputs)):
            compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(*args), module(*args), rtol=0, atol=1e-5)


def test_embedding_paths_export_strictly_with_a_dynamic_batch(tiny_model, tester, text_inputs):
    _, inputs = tester.prepare_config_and_inputs()
    batch = torch.export.Dim("batch", min=1, max=64)
    image = torch.export.export(ImageEmbedding(tiny_model), (inputs["pixel_values"],),
                                dynamic_shapes={"pixel_values": {0: batch}}, strict=True)
    text = torch.export.export(TextEmbedding(tiny_model), text_inputs,
                               dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}}, strict=True)
    pixels = torch.randn(7, 3, tester.image_size, tester.image_size)
    with torch.no_grad():
        torch.testing.assert_close(image.module()(pixels), ImageEmbedding(tiny_model)(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(text.module()(*text_inputs), TextEmbedding(tiny_model)(*text_inputs),
                                   rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- release 0.1 folders


def test_folders_saved_by_release_0_1_load_with_identical_outputs():
    """Identical up to the last bits of float32: the expected outputs were computed on another CPU, whose matrix
    kernels round differently (up to ~1e-7 here)."""
    expected = np.load(RELEASE_0_1 / "expected_outputs.npz")
    model = AutoModel.from_pretrained(RELEASE_0_1 / "model").eval()
    pixel_values, input_ids = torch.from_numpy(expected["pixel_values"]), torch.from_numpy(expected["input_ids"])
    with torch.no_grad():
        output = model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True)
        classes = model.get_class_embeddings(torch.stack([input_ids] * 2, dim=1)).pooler_output
    for name, value in [("image_embeds", output.image_embeds), ("text_embeds", output.text_embeds),
                        ("logits_per_image", output.logits_per_image), ("loss", output.loss),
                        ("class_embeds", classes)]:
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    head = AutoModelForSemanticSegmentation.from_pretrained(RELEASE_0_1 / "segmentation").eval()
    with torch.no_grad():
        logits = head(pixel_values=pixel_values).logits
    np.testing.assert_allclose(logits.numpy(), expected["segmentation_logits"], rtol=1e-6, atol=1e-6)


def test_folders_keep_the_0_1_file_layout(tmp_path):
    """What this release saves, release 0.1 can load: the key names on disk do not change."""
    from safetensors import safe_open

    model = AutoModel.from_pretrained(RELEASE_0_1 / "model")
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved, \
            safe_open(RELEASE_0_1 / "model" / "model.safetensors", "pt") as original:
        assert set(saved.keys()) == set(original.keys())


def test_a_head_holds_only_the_vision_encoder(tester):
    from ace_lora_hf import AceLoraForSegmentation

    torch.manual_seed(0)
    model = perturb_lora(AceLoraModel(tester.get_config()))
    head = AceLoraForSegmentation(tester.get_config(head_hidden_size=8))
    assert not any(name.startswith(("text_model", "logit_scale")) for name, _ in head.named_parameters())
    assert head.vision_model.projection is None and head.vision_model.hypergraph is None
    encoder = {name for name, _ in head.vision_model.named_parameters()}
    assert encoder == {name for name, _ in model.vision_model.named_parameters()
                       if not name.startswith(("projection.", "hypergraph."))}
