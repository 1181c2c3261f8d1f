"""AceLoraModel on tiny random configs: shapes, round trips, adapters, hypergraph invariants, gradients."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from huggingface_hub.errors import StrictDataclassClassValidationError

from ace_lora_hf import AceHypergraph, AceLoraConfig, AceLoraModel, AceLoraOutput
from ace_lora_hf.errors import ConfigError, InvalidArgumentError
from ace_lora_hf.inference.fast_dropout import AceLoraDropout, use_fast_dropout
from ace_lora_hf.models.ace_lora import batch_inference

from conftest import perturb_lora
from hypergraph_reference import incidence_matrix


def test_default_config_is_the_released_model():
    config = AceLoraConfig()
    assert config.vision_config.layer_norm_eps == 1e-6
    assert config.vision_config.hidden_act == "gelu" and config.vision_config.qkv_bias
    assert config.text_config.attention_probs_dropout_prob == 0.0
    assert config.text_config.hidden_dropout_prob == 0.1
    for tower in (config.vision_config, config.text_config):
        assert (tower.lora_rank, tower.lora_alpha, tower.use_rslora, tower.projection_dim) == (4, 1.0, True, 512)
        assert (tower.hypergraph_top_k, tower.hypergraph_hidden_size, tower.use_hypergraph) == (5, 128, True)
    assert (config.text_config.context_length, config.text_config.projection_hidden_size) == (256, 640)


def test_default_model_has_the_released_trainable_parameter_count():
    with torch.device("meta"):
        model = AceLoraModel(AceLoraConfig())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 969_217
    scaling = {layer.scaling["default"] for layer in model.lora_layers()}
    assert scaling == {0.5} and len(model.lora_layers()) == 72


def test_config_rejects_unknown_choices():
    with pytest.raises(ConfigError, match="hypergraph_towers"):
        AceLoraConfig(hypergraph_towers="image")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lora_target_projections": ["q", "o"]}, "lora_target_projections"),
        ({"hypergraph_top_k": 0}, "top-k must be between 1 and 195"),
        ({"text_context_length": 20, "hypergraph_top_k": 19}, r"text_config.hypergraph_top_k=19.*between 1 and 18"),
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0: must be in \[0, 1\)"),
        ({"lora_layers": [0, 12]}, r"lora_layers has \[12\]"),
        ({"text_context_length": 600}, "max_position_embeddings=512"),
        ({"vision_config": {"lora_rank": 2}}, "lora_rank is 2 in vision_config but 4 in text_config"),
        ({"vision_config": {"projection_dim": 256}}, "vision_config.projection_dim=256 differs"),
        ({"head_feature_layers": [0]}, r"head_feature_layers=\[0\]"),
    ],
)
def test_config_fields_out_of_range_are_refused_naming_the_field(fields, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message) as error:
        AceLoraConfig(**fields)
    assert isinstance(error.value.__cause__, ConfigError)


def test_configs_of_release_0_1_load_into_the_tower_configs():
    legacy = {"lora_rank": 8, "hypergraph_towers": "vision", "text_context_length": 128,
              "text_projection_hidden_size": 64, "vision_config": {"model_type": "vit", "hidden_size": 32,
                                                                   "num_attention_heads": 4}}
    config = AceLoraConfig.from_dict({"model_type": "ace_lora", **legacy})
    assert (config.vision_config.lora_rank, config.text_config.lora_rank) == (8, 8)
    assert (config.vision_config.use_hypergraph, config.text_config.use_hypergraph) == (True, False)
    assert (config.text_config.context_length, config.text_config.projection_hidden_size) == (128, 64)
    assert config.vision_config.model_type == "ace_lora_vision_model" and config.vision_config.hidden_size == 32
    assert not hasattr(config, "lora_rank") and "lora_rank" not in config.to_dict()


def test_output_shapes(tester):
    config, inputs = tester.prepare_config_and_inputs()
    model = AceLoraModel(config).eval()
    with torch.no_grad():
        output = model(**inputs, return_loss=True)
        classes = model.get_class_embeddings(torch.stack([inputs["input_ids"], inputs["input_ids"]], dim=1))
    classes = classes.pooler_output
    batch, dim = tester.batch_size, tester.projection_dim
    assert isinstance(output, AceLoraOutput)
    assert torch.equal(output.vision_model_output.pooler_output, output.image_embeds)
    assert output.text_model_output.last_hidden_state.shape == (batch, tester.text_context_length, tester.hidden_size)
    assert output.image_embeds.shape == output.text_embeds.shape == (batch, dim)
    assert output.logits_per_image.shape == output.logits_per_text.shape == (batch, batch)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert classes.shape == (batch, dim)
    torch.testing.assert_close(output.image_embeds.norm(dim=-1), torch.ones(batch))
    torch.testing.assert_close(output.logits_per_text, output.logits_per_image.t())
    assert model(**inputs).loss is None


def test_results_do_not_depend_on_caller_padding(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    ids = inputs["input_ids"]
    padded = torch.nn.functional.pad(ids, (0, tester.text_context_length - ids.shape[1]))
    embed = lambda *args, **kwargs: tiny_model.get_text_features(*args, **kwargs).pooler_output  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(embed(ids), embed(padded))
        torch.testing.assert_close(embed(ids, attention_mask=(ids != 0).long()), embed(ids))


def test_too_long_text_is_rejected(tiny_model, tester):
    ids = torch.full((1, tester.text_context_length + 1), 7)
    with pytest.raises(InvalidArgumentError, match="truncation=True"):
        tiny_model.get_text_features(ids)


def test_save_load_round_trip(tiny_model, tester, tmp_path):
    from transformers import AutoModel

    _, inputs = tester.prepare_config_and_inputs()
    tiny_model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is AceLoraModel
    expected, actual = tiny_model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in tiny_model.named_parameters() if p.requires_grad
    ]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, tiny_model(**inputs).logits_per_image)


def test_trainable_parameter_accounting(tester):
    model = AceLoraModel(tester.get_config())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    hidden, rank, dim, bottleneck = tester.hidden_size, 4, tester.projection_dim, 8
    lora = 2 * tester.num_layers * 3 * 2 * hidden * rank
    hypergraph = 2 * 2 * (dim * bottleneck + bottleneck + bottleneck * dim + dim)
    assert sum(trainable.values()) == lora + hypergraph + 1
    assert not any(name.endswith("base_layer.weight") for name in trainable)


def test_fresh_adapters_start_as_lora_and_released_init(tester):
    torch.manual_seed(0)
    model = AceLoraModel(tester.get_config(logit_scale_init_value=20.0))
    for layer in model.lora_layers():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        bound = 1 / tester.hidden_size**0.5  # Kaiming-uniform(a=sqrt(5)) on fan_in
        assert layer.lora_A["default"].weight.abs().max() <= bound
    down = model.vision_model.hypergraph.edge_adapter.down
    assert down.weight.std().item() == pytest.approx((2 / down.in_features) ** 0.5, rel=0.3)  # Kaiming-normal
    assert model.logit_scale.item() == pytest.approx(20.0)


def test_missing_adapter_weights_get_lora_init_on_load(tiny_model, tmp_path):
    from transformers import AutoModel

    tiny_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".lora_" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = AutoModel.from_pretrained(tmp_path)
    for layer in loaded.lora_layers():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert layer.lora_A["default"].weight.std() > 0.05  # Kaiming-uniform, not the towers' normal(0.02)


def test_merge_lora_is_equivalent_and_reversible(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    before = tiny_model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    with torch.no_grad():
        unmerged = tiny_model(**inputs)
        tiny_model.merge_lora()
        assert tiny_model.lora_merged
        merged = tiny_model(**inputs)
        tiny_model.unmerge_lora()
    torch.testing.assert_close(merged.image_embeds, unmerged.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.text_embeds, unmerged.text_embeds, rtol=0, atol=1e-6)
    assert not tiny_model.lora_merged
    for key, value in tiny_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_saving_a_merged_model_is_refused(tiny_model, tmp_path):
    tiny_model.merge_lora()
    with pytest.raises(InvalidArgumentError, match="unmerge_lora"):
        tiny_model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_lora_changes_outputs(tester):
    config, inputs = tester.prepare_config_and_inputs()
    torch.manual_seed(0)
    model = AceLoraModel(config).eval()
    with torch.no_grad():
        fresh = model.get_image_features(inputs["pixel_values"], use_hgnn=False).pooler_output
        perturb_lora(model)
        adapted = model.get_image_features(inputs["pixel_values"], use_hgnn=False).pooler_output
    assert (fresh - adapted).abs().max() > 1e-3


@pytest.mark.parametrize("towers", ["none", "vision", "text"])
def test_towers_without_hypergraph_use_the_projected_cls_token(tester, towers):
    config, inputs = tester.prepare_config_and_inputs(hypergraph_towers=towers)
    model = AceLoraModel(config).eval()
    assert (model.vision_model.hypergraph is None) == (towers in ("none", "text"))
    assert (model.text_model.hypergraph is None) == (towers in ("none", "vision"))
    with torch.no_grad():
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
        text = model.get_text_features(inputs["input_ids"]).pooler_output
        classes = model.get_class_embeddings(inputs["input_ids"][:, None]).pooler_output
        plain_image = model.get_image_features(inputs["pixel_values"], use_hgnn=False).pooler_output
        plain_text = model.get_text_features(inputs["input_ids"], use_hgnn=False).pooler_output
    assert torch.equal(image, plain_image) == (model.vision_model.hypergraph is None)
    assert torch.equal(text, plain_text) == (model.text_model.hypergraph is None)
    torch.testing.assert_close(classes, text)  # one template: the template mean is the text itself


def test_gradients_reach_only_trainable_parameters(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    tiny_model.train()
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tiny_model(**inputs, labels=labels).loss.backward()
    for name, parameter in tiny_model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.count_nonzero(parameter.grad) > 0, name
        else:
            assert parameter.grad is None, name


# ------------------------------------------------------------------------------------------------- hypergraph


def _hypergraph_inputs(seed=0, batch=2, tokens=12, dim=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=generator), torch.randn(batch, tokens - 1, generator=generator)


def test_incidence_matrix_invariants():
    hypergraph = AceHypergraph(dim=16, hidden_size=8, top_k=3)
    tokens, cls_attention = _hypergraph_inputs()
    incidence = incidence_matrix(hypergraph, tokens, cls_attention)
    num_tokens = tokens.shape[1]
    assert torch.equal(incidence.diagonal(dim1=1, dim2=2), torch.ones(2, num_tokens))
    torch.testing.assert_close(incidence[:, 1:, 0], incidence[:, 0, 1:])  # column 0 mirrors row 0
    off_diagonal = incidence[:, 1:, 1:] * (1 - torch.eye(num_tokens - 1))
    assert torch.equal((off_diagonal > 0).sum(-1), torch.full((2, num_tokens - 1), 3))
    torch.testing.assert_close(off_diagonal.sum(-1), torch.ones(2, num_tokens - 1))
    cls_row = incidence[:, 0, 1:]
    expected_neighbours = cls_attention.topk(3, dim=-1).indices
    assert torch.equal((cls_row > 0).nonzero()[:, 1].view(2, 3).sort().values, expected_neighbours.sort().values)
    torch.testing.assert_close(cls_row.sum(-1), torch.ones(2))
    # Rows 1.. rank tokens by cosine similarity: scaling a token does not change the graph.
    scaled = tokens * torch.rand(2, num_tokens, 1).add(0.5)
    torch.testing.assert_close(incidence_matrix(hypergraph, scaled, cls_attention), incidence)


def test_cls_only_forward_equals_the_full_hypergraph():
    torch.manual_seed(0)
    hypergraph = AceHypergraph(dim=16, hidden_size=8, top_k=3)
    for seed in range(3):
        tokens, cls_attention = _hypergraph_inputs(seed)
        incidence = incidence_matrix(hypergraph, tokens, cls_attention)
        nodes = hypergraph.node_adapter(incidence.transpose(1, 2) @ hypergraph.edge_adapter(incidence @ tokens))
        expected = nn.functional.normalize(nodes[:, 0], dim=-1)
        torch.testing.assert_close(hypergraph(tokens, cls_attention), expected)


def test_hypergraph_needs_enough_tokens():
    hypergraph = AceHypergraph(dim=16, hidden_size=8, top_k=5)
    tokens, cls_attention = _hypergraph_inputs(tokens=6)
    with pytest.raises(InvalidArgumentError, match="top_k=5"):
        hypergraph(tokens, cls_attention)


def test_activation_checkpointing_keeps_gradients(tester):
    """The CLS attention row is computed from the last layer's input; recomputation must not change any gradient."""
    config, inputs = tester.prepare_config_and_inputs()
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = perturb_lora(AceLoraModel(config))
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.vision_model.layers[-1].gradient_checkpointing
            assert model.text_model.encoder.layer[-1].gradient_checkpointing
        model.train()
        model(**inputs, return_loss=True).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_activation_checkpointing_replays_dropout_masks(tester):
    """Recomputation restores the RNG state, so the fast dropout draws the same masks in backward."""
    config, inputs = tester.prepare_config_and_inputs()
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = use_fast_dropout(perturb_lora(AceLoraModel(config))).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(1)
        model(**inputs, return_loss=True).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_the_model_keeps_pytorchs_dropout_and_training_swaps_every_one_for_the_fast_one(tiny_model):
    rates = [module.p for module in tiny_model.modules() if isinstance(module, nn.Dropout)]
    assert {type(module) for module in tiny_model.modules() if isinstance(module, nn.Dropout)} == {nn.Dropout}
    assert use_fast_dropout(tiny_model) is tiny_model
    dropouts = [module for module in tiny_model.modules() if isinstance(module, nn.Dropout)]
    assert all(type(module) is AceLoraDropout for module in dropouts)
    assert [module.p for module in dropouts] == rates
    assert {layer.lora_dropout["default"].p for layer in tiny_model.lora_layers()} == {0.1}
    assert tiny_model.text_model.embeddings.dropout.p == 0.1


def test_fast_dropout_has_the_distribution_and_gradient_of_dropout():
    dropout = AceLoraDropout(0.1).train()
    inputs = (torch.rand(1000, 1000) + 1).requires_grad_()
    torch.manual_seed(0)
    outputs = dropout(inputs)
    dropped = outputs == 0
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=2e-3)  # about 7 standard deviations
    assert torch.equal(outputs[~dropped], inputs[~dropped] * (1 / 0.9))
    outputs.sum().backward()
    assert torch.equal(inputs.grad, (~dropped).float() * (1 / 0.9))
    torch.manual_seed(0)
    assert torch.equal(dropout(inputs), outputs)  # reproducible under the global seed
    assert torch.equal(dropout.eval()(inputs), inputs)


def test_cpu_inference_chunks_do_not_change_outputs(tiny_model, tester, monkeypatch):
    _, inputs = tester.prepare_config_and_inputs()
    classes = torch.stack([inputs["input_ids"]] * 2, dim=1)
    embed_images = lambda pixels: tiny_model.get_image_features(pixels).pooler_output  # noqa: E731
    embed_classes = lambda ids: tiny_model.get_class_embeddings(ids).pooler_output  # noqa: E731
    with torch.no_grad():
        expected = embed_images(inputs["pixel_values"]), embed_classes(classes)
    monkeypatch.setattr(batch_inference, "CPU_CHUNK_TOKENS", 30)  # one image, or one class's two prompts, per call
    calls = []
    hooks = [tower.embeddings.register_forward_hook(lambda module, args, output: calls.append(len(output)))
             for tower in (tiny_model.vision_model, tiny_model.text_model)]
    with torch.enable_grad():  # no chunking when gradients are recorded
        batch_inference.in_cpu_chunks(embed_images, inputs["pixel_values"], tokens_per_sample=26)
    assert calls == [tester.batch_size]
    with torch.no_grad():
        images = batch_inference.in_cpu_chunks(embed_images, inputs["pixel_values"], tokens_per_sample=26)
        texts = batch_inference.in_cpu_chunks(embed_classes, classes,
                                              tokens_per_sample=2 * tiny_model.config.text_config.context_length)
    for hook in hooks:
        hook.remove()
    assert calls[1:] == [1] * tester.batch_size + [2] * len(classes)
    torch.testing.assert_close(images, expected[0])
    torch.testing.assert_close(texts, expected[1])


def test_a_callers_autocast_reaches_the_towers_but_not_the_hypergraph(tiny_model, tester):
    _, inputs = tester.prepare_config_and_inputs()
    recorded = {}

    def record_dtype(name):
        def hook(module, args, output):
            recorded[name] = output.dtype
        return hook

    hooks = [tiny_model.vision_model.layers[0].mlp.fc1.register_forward_hook(record_dtype("tower")),
             tiny_model.vision_model.hypergraph.edge_adapter.register_forward_hook(record_dtype("hypergraph"))]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embedding = tiny_model.get_image_features(inputs["pixel_values"]).pooler_output
    for hook in hooks:
        hook.remove()
    assert recorded == {"tower": torch.bfloat16, "hypergraph": torch.float32} and embedding.dtype == torch.float32
