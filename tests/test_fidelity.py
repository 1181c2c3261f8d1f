"""The port against the authors' implementation: `case_a.npz`, computed on the same stand-in base weights.

Tolerances from `reference/README.md`: CLS-level outputs 1e-5 absolute (float32), gradients 1e-4 relative to
each tensor's largest magnitude.
"""

import numpy as np
import pytest
import torch
from torch import nn

from ace_lora_hf.models.ace_lora.modeling_ace_lora_base import cls_attention_scores

from hypergraph_reference import incidence_matrix


ATOL = 1e-5
GRAD_RTOL = 1e-4


def max_abs_diff(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.detach().double().numpy() - expected).max())


def assert_close(actual: torch.Tensor, expected: np.ndarray, atol: float = ATOL) -> None:
    assert tuple(actual.shape) == expected.shape
    assert max_abs_diff(actual, expected) <= atol




@pytest.fixture(scope="module")
def inputs(reference):
    labels = reference["loss_label_matrix_all_rows"][reference["loss_indices"]]
    return {
        "pixel_values": torch.from_numpy(reference["input_images"]),
        "prompt_ids": torch.from_numpy(reference["input_prompt_ids"]),
        "report_ids": torch.from_numpy(reference["input_loss_text_ids"]),
        "labels": torch.from_numpy(labels),
    }


def test_plain_biomedclip_without_adapters(plain_model, reference, inputs):
    model = plain_model
    with torch.no_grad():
        image = model.get_image_features(inputs["pixel_values"], use_hgnn=False).pooler_output
        prompts = model.get_text_features(inputs["prompt_ids"].flatten(0, 1), use_hgnn=False).pooler_output
        reports = model.get_text_features(inputs["report_ids"], use_hgnn=False).pooler_output
    assert_close(image, reference["base_img_emb"])
    assert_close(prompts, reference["base_prompt_text_emb"])
    assert_close(reports, reference["base_loss_text_emb"])
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)


@torch.no_grad()
def test_lora_embeddings_without_hypergraph(ace_model, reference, inputs):
    image = ace_model.get_image_features(inputs["pixel_values"], use_hgnn=False).pooler_output
    assert_close(image, reference["img_plain_emb"])
    prompts = ace_model.get_text_features(inputs["prompt_ids"].flatten(0, 1), use_hgnn=False).pooler_output
    assert_close(prompts, reference["lora_prompt_text_emb"])


@pytest.mark.parametrize("lora", ["unmerged", "merged"])
@torch.no_grad()
def test_ace_embeddings_and_probabilities(ace_model, reference, inputs, lora):
    """The zero-shot path end to end, and once with LoRA folded into the weights as inference runs it."""
    base_weights = {name: tensor.clone() for name, tensor in ace_model.state_dict().items() if "base_layer" in name}
    if lora == "merged":
        ace_model.merge_lora()
    try:
        image = ace_model.get_image_features(inputs["pixel_values"]).pooler_output
        classes = ace_model.get_class_embeddings(inputs["prompt_ids"]).pooler_output
    finally:
        if ace_model.lora_merged:
            ace_model.unmerge_lora()
            ace_model.load_state_dict(base_weights, strict=False)  # unmerging leaves rounding in the shared fixture
    assert_close(image, reference["img_ace_emb"])
    assert_close(classes, reference["text_ace_emb"])
    assert ace_model.logit_scale.item() == pytest.approx(float(reference["ckpt_logit_scale"]), abs=1e-6)
    probs = (ace_model.logit_scale * image @ classes.t()).softmax(dim=-1)
    assert_close(probs, reference["probs_ckpt_scale"])


@torch.no_grad()
def test_cls_attention_rows(ace_model, reference, inputs):
    image_attention = ace_model.vision_model.get_token_features(inputs["pixel_values"]).cls_attention
    assert_close(image_attention, reference["img_attn_weights"])
    text_attention = ace_model.text_model.get_token_features(inputs["report_ids"]).cls_attention
    assert_close(text_attention, reference["loss_text_attn_weights"], atol=1e-6)


@torch.no_grad()
def test_per_token_hypergraph_outputs(ace_model, reference, inputs):
    """The full hypergraph (every node, not only CLS) matches on the tokens without near-ties."""
    features = ace_model.vision_model.get_token_features(inputs["pixel_values"])
    tokens, attention = features.tokens, features.cls_attention
    hypergraph = ace_model.vision_model.hypergraph
    incidence = incidence_matrix(hypergraph, tokens, attention)
    nodes = hypergraph.node_adapter(incidence.transpose(1, 2) @ hypergraph.edge_adapter(incidence @ tokens))
    nodes = nn.functional.normalize(nodes, dim=-1)
    stable = ~reference["img_fragile_token_mask"]
    assert max_abs_diff(nodes[torch.from_numpy(stable)], reference["img_ace_tokens"][stable]) <= ATOL
    top_index = incidence.topk(hypergraph.top_k + 1, dim=-1).indices  # + the diagonal 1
    assert set(top_index[0, 0].tolist()) - {0} == set(reference["img_topk_idx"][0, 0].tolist())


@torch.no_grad()
def test_losses(ace_model, reference, inputs):
    model = ace_model
    output = model(input_ids=inputs["report_ids"], pixel_values=inputs["pixel_values"], labels=inputs["labels"])
    assert_close(output.image_embeds, reference["loss_img_ace_emb"])
    assert_close(output.text_embeds, reference["loss_text_ace_emb"])
    assert_close(output.logits_per_image, reference["loss_logits_per_image"], atol=1e-4)
    assert output.loss.item() == pytest.approx(float(reference["loss_label_guided_eval"]), abs=ATOL)
    plain = model(input_ids=inputs["report_ids"], pixel_values=inputs["pixel_values"], return_loss=True)
    assert plain.loss.item() == pytest.approx(float(reference["loss_plain_infonce_eval"]), abs=ATOL)


def _lora_linear(model, released_layer: int, projection: str):
    if released_layer < 12:
        attention = model.text_model.encoder.layer[released_layer].attention.self
        return getattr(attention, {"q": "query", "k": "key", "v": "value"}[projection])
    return getattr(model.vision_model.layers[released_layer - 12].attention, f"{projection}_proj")


def assert_grad_close(grad: torch.Tensor, expected: np.ndarray) -> None:
    assert max_abs_diff(grad, expected) <= GRAD_RTOL * np.abs(expected).max()


def test_training_gradients_without_dropout(ace_model, reference, inputs):
    ace_model.train()
    dropout_p = {module: module.p for module in ace_model.modules() if isinstance(module, nn.Dropout)}
    try:
        for module in dropout_p:
            module.p = 0.0
        ace_model.zero_grad()
        output = ace_model(input_ids=inputs["report_ids"], pixel_values=inputs["pixel_values"], labels=inputs["labels"])
        output.loss.backward()
    finally:
        for module, p in dropout_p.items():
            module.p = p
        ace_model.eval()
    assert output.loss.item() == pytest.approx(float(reference["train_nodrop_loss"]), abs=ATOL)
    for layer in range(24):
        for index, projection in enumerate("qkv"):
            linear = _lora_linear(ace_model, layer, projection)
            assert_grad_close(linear.lora_A["default"].weight.grad, reference["train_nodrop_grad_lora_A"][layer, index])
            assert_grad_close(linear.lora_B["default"].weight.grad, reference["train_nodrop_grad_lora_B"][layer, index])
    towers = {"img": "vision_model.hypergraph", "text": "text_model.hypergraph"}
    for key in reference:
        if key.startswith("train_nodrop_grad_") and "_adapter." in key:
            tower, kind, _ = key.removeprefix("train_nodrop_grad_").split("_", 2)
            leaf = key.split("_adapter.")[1]
            parameter = ace_model.get_parameter(f"{towers[tower]}.{kind}_adapter.{leaf}")
            assert_grad_close(parameter.grad, reference[key])
    assert_grad_close(ace_model.logit_scale.grad, reference["train_nodrop_grad_logit_scale"])
    ace_model.zero_grad(set_to_none=True)


def test_cls_attention_scores_match_eager_attention():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 2, 7, 24, generator=generator).unbind(0)
    scores = cls_attention_scores(query[:, :1], key, num_heads=3)
    heads_q = query.view(2, 7, 3, 8).transpose(1, 2)
    heads_k = key.view(2, 7, 3, 8).transpose(1, 2)
    expected = (heads_q @ heads_k.transpose(-1, -2) / 8**0.5)[:, :, 0]
    torch.testing.assert_close(scores, expected)
