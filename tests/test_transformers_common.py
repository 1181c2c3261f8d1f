"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`, from the sdist of the installed version) run on
ACE-LoRA's composite model and on each tower, with the testers and skips of transformers' CLIP tests.

Skipped here: what `CLIPModelTest`, `CLIPVisionModelTest` and `CLIPTextModelTest` skip, each with CLIP's reason, and
one test that assumes a fully trainable model (the towers' `test_retain_grad_hidden_states_attentions`). The sources
come from `transformers_test_sources.py` (downloaded once and cached; without network the module is skipped with the
reason).
"""

import inspect
import sys
import tempfile
import unittest
import warnings

import pytest
import torch

from ace_lora_hf import AceLoraConfig, AceLoraModel, AceLoraTextConfig, AceLoraTextModel, AceLoraVisionConfig
from ace_lora_hf import AceLoraVisionModel

from conftest import AceLoraModelTester as TinyAceLoraModelTester
from transformers_test_sources import SourcesUnavailable, common_test_sources


pytest.importorskip("parameterized", reason="needs parameterized for transformers' common tests (the [test] extra)")
try:
    sources = common_test_sources()
except SourcesUnavailable as error:
    pytest.skip(f"needs transformers' common test sources: {error}", allow_module_level=True)
sys.path.insert(0, str(sources))
with warnings.catch_warnings():
    # Upstream registers its marks (flash_attn_test, torch_compile_test, ...) in a conftest the sdist lacks.
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import (
        ModelTesterMixin, _config_zero_init, floats_tensor, ids_tensor, random_attention_mask)
    from transformers_tests.utils.test_configuration_utils import config_common_kwargs


# CLIPVisionModelTest and CLIPTextModelTest skip the training tests (two without a reason, two because "This
# architecture seem to not compute gradients properly when using GC"); for a tower alone the cause is the same as
# CLIP's: it returns no loss. The composite model's training tests run.
TOWER_TRAINING_REASON = "As CLIP's tower tests: a tower returns no loss to train on"


def skipped(reason: str):
    """A common test that unittest reports as skipped with `reason`."""
    return unittest.skip(reason)(lambda self: None)


# --------------------------------------------------------------------------------------------------- testers


class TowerTester:
    """What the common tests read from a tower's tester, taken from conftest's tiny model."""

    def __init__(self, parent, is_training: bool = True):
        self.parent = parent
        self.tiny = TinyAceLoraModelTester()
        self.batch_size = self.tiny.batch_size
        self.hidden_size = self.tiny.hidden_size
        self.num_hidden_layers = self.tiny.num_layers
        self.num_attention_heads = self.tiny.num_heads
        self.is_training = is_training


class AceLoraVisionModelTester(TowerTester):
    """`CLIPVisionModelTester`'s part for `AceLoraVisionModel`: the vision tower of conftest's tiny model."""

    def __init__(self, parent, is_training: bool = True):
        super().__init__(parent, is_training)
        self.image_size = self.tiny.image_size
        self.patch_size = self.tiny.patch_size
        self.num_channels = 3
        self.seq_length = (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS

    def get_config(self) -> AceLoraVisionConfig:
        return self.tiny.get_config().vision_config

    def prepare_config_and_inputs(self) -> tuple[AceLoraVisionConfig, torch.Tensor]:
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self) -> tuple[AceLoraVisionConfig, dict]:
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class AceLoraTextModelTester(TowerTester):
    """`CLIPTextModelTester`'s part for `AceLoraTextModel`: texts as long as the tower's context (it pads to it)."""

    def __init__(self, parent, is_training: bool = True):
        super().__init__(parent, is_training)
        self.seq_length = self.tiny.text_context_length
        self.vocab_size = self.tiny.vocab_size

    def get_config(self) -> AceLoraTextConfig:
        return self.tiny.get_config().text_config

    def prepare_config_and_inputs(self) -> tuple[AceLoraTextConfig, torch.Tensor, torch.Tensor]:
        """Like CLIP's: random ids and a right-padded mask that keeps at least the first token."""
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        for row, length in enumerate(torch.randint(1, self.seq_length - 1, (self.batch_size,)).tolist()):
            attention_mask[row, :length] = 1
            attention_mask[row, length:] = 0
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self) -> tuple[AceLoraTextConfig, dict]:
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class AceLoraCompositeModelTester:
    """`CLIPModelTester`'s part for `AceLoraModel`: both towers, inputs for the contrastive loss."""

    def __init__(self, parent, is_training: bool = True):
        self.parent = parent
        self.tiny = TinyAceLoraModelTester()
        self.text_model_tester = AceLoraTextModelTester(parent)
        self.vision_model_tester = AceLoraVisionModelTester(parent)
        self.batch_size = self.text_model_tester.batch_size  # test_batching_equivalence slices by it
        self.is_training = is_training

    def get_config(self) -> AceLoraConfig:
        return self.tiny.get_config()

    def prepare_config_and_inputs(self) -> tuple[AceLoraConfig, torch.Tensor, torch.Tensor, torch.Tensor]:
        _, input_ids, attention_mask = self.text_model_tester.prepare_config_and_inputs()
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        return self.get_config(), input_ids, attention_mask, pixel_values

    def prepare_config_and_inputs_for_common(self) -> tuple[AceLoraConfig, dict]:
        config, input_ids, attention_mask, pixel_values = self.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "return_loss": True}
        return config, inputs


# ------------------------------------------------------------------------------------------------------ towers


class AceLoraTowerTestMixin(ModelTesterMixin):
    """The tests and skips `CLIPVisionModelTest` and `CLIPTextModelTest` share."""

    all_model_classes: tuple[type, ...]
    main_input_name: str

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_forward_signature(self):
        (model_class,) = self.all_model_classes
        arg_names = list(inspect.signature(model_class.forward).parameters)[1:2]
        self.assertListEqual(arg_names, [self.main_input_name])

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.all_model_classes[0](config).eval()
        with torch.no_grad():
            output = model(**inputs)
        self.assertEqual(output.pooler_output.shape, (self.model_tester.batch_size, config.projection_dim))
        torch.testing.assert_close(output.pooler_output.norm(dim=-1), torch.ones(self.model_tester.batch_size))

    # CLIPVisionModelTest's and CLIPTextModelTest's skips
    test_inputs_embeds = skipped("CLIP does not use inputs_embeds (nor do ACE-LoRA's towers)")
    test_training = skipped(TOWER_TRAINING_REASON)
    test_training_gradient_checkpointing = skipped(TOWER_TRAINING_REASON)
    test_training_gradient_checkpointing_use_reentrant_false = skipped(TOWER_TRAINING_REASON)
    test_training_gradient_checkpointing_use_reentrant_true = skipped(TOWER_TRAINING_REASON)
    test_retain_grad_hidden_states_attentions = skipped(
        "Not a CLIP skip: ACE-LoRA freezes every base weight (only LoRA and the hypergraph train), so the embedding "
        "output hidden_states[0] needs no gradient and cannot retain one; test_training.py checks the adapters' "
        "gradients"
    )


class AceLoraVisionModelTest(AceLoraTowerTestMixin, unittest.TestCase):
    all_model_classes = (AceLoraVisionModel,)
    main_input_name = "pixel_values"
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = AceLoraVisionModelTester(self)
        self.config_tester = ConfigTester(self, config_class=AceLoraVisionConfig, has_text_modality=False,
                                          hidden_size=37)

    def test_model_get_set_embeddings(self):
        """CLIPVisionModelTest's version: the patch embedding is the input embedding, and there is no output one."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = AceLoraVisionModel(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())


class AceLoraTextModelTest(AceLoraTowerTestMixin, unittest.TestCase):
    all_model_classes = (AceLoraTextModel,)
    main_input_name = "input_ids"
    model_split_percents = [0.5, 0.8, 0.9]

    def setUp(self):
        self.model_tester = AceLoraTextModelTester(self)
        self.config_tester = ConfigTester(self, config_class=AceLoraTextConfig, hidden_size=37)


# --------------------------------------------------------------------------------------------------- composite


class AceLoraModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (AceLoraModel,)
    additional_model_inputs = ["pixel_values"]
    test_resize_embeddings = False
    _is_composite = True

    def setUp(self):
        self.model_tester = AceLoraCompositeModelTester(self)
        self.config_tester = ConfigTester(self, config_class=AceLoraConfig, has_text_modality=False,
                                          common_properties=["projection_dim", "logit_scale_init_value"])

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, input_ids, attention_mask, pixel_values = self.model_tester.prepare_config_and_inputs()
        model = AceLoraModel(config).eval()
        with torch.no_grad():
            result = model(input_ids, pixel_values, attention_mask)
        batch_size = self.model_tester.batch_size
        self.assertEqual(result.logits_per_image.shape, (batch_size, batch_size))
        self.assertEqual(result.logits_per_text.shape, (batch_size, batch_size))

    def test_initialization(self):
        """CLIPModelTest's override, for ACE-LoRA's init: the logit scale is the config's value (stored on the
        exponentiated scale) and every LoRA B starts at zero, so that the adapters start as a no-op."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = AceLoraModel(_config_zero_init(config))
        self.assertAlmostEqual(model.logit_scale.item(), config.logit_scale_init_value, delta=1e-3)
        lora_b = [parameter for name, parameter in model.named_parameters() if ".lora_B." in name]
        self.assertTrue(lora_b and all(parameter.requires_grad and not parameter.any() for parameter in lora_b))

    def test_load_vision_text_config(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            vision_config = AceLoraVisionConfig.from_pretrained(folder)
            text_config = AceLoraTextConfig.from_pretrained(folder)
        self.assertDictEqual(config.vision_config.to_dict(), vision_config.to_dict())
        self.assertDictEqual(config.text_config.to_dict(), text_config.to_dict())

    # CLIPModelTest's skips
    test_hidden_states_output = skipped("Hidden_states is tested in individual model tests")
    test_inputs_embeds = skipped("Inputs_embeds is tested in individual model tests")
    test_retain_grad_hidden_states_attentions = skipped("Retain_grad is tested in individual model tests")
    test_model_get_set_embeddings = skipped("As CLIPModel, AceLoraModel does not have input/output embeddings")
    test_attention_outputs = skipped(
        "CLIPModelTest sets test_attention_outputs = False: the composite output keeps the attentions in each tower's "
        "output, which the tower tests check"
    )


def test_the_config_stub_covers_every_public_config_field():
    """Upstream's completeness check of `config_common_kwargs`, for the stub written in place of its module."""
    from transformers import PreTrainedConfig

    fields = {name.removeprefix("_") if name == "_output_attentions" else name for name in vars(PreTrainedConfig())}
    public = {name for name in fields if not name.startswith("_")} - {"is_encoder_decoder", "transformers_version"}
    assert set(config_common_kwargs) == public


def test_the_sources_unpack_from_the_cached_sdist_without_downloading(tmp_path, monkeypatch):
    import transformers_test_sources

    version = transformers_test_sources.installed_version()
    cached = tmp_path / version
    cached.mkdir()
    tarball = f"transformers-{version}.tar.gz"
    (cached / tarball).symlink_to(sources / tarball)
    monkeypatch.setenv(transformers_test_sources.CACHE_VARIABLE, str(tmp_path))
    monkeypatch.setattr(transformers_test_sources.subprocess, "run", None)  # any download attempt fails
    assert common_test_sources() == cached
    unpacked = {path.relative_to(cached / "transformers_tests").as_posix()
                for path in (cached / "transformers_tests").rglob("*.py")}
    assert unpacked == {*transformers_test_sources.COMMON_TEST_FILES, *transformers_test_sources.STUBS}
