"""Publishing: the staged Hub folder, its model card (whose snippet runs as written), adapter-only exports."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from ace_lora_hf import AceLoraModel
from ace_lora_hf.adapters import EXTRAS_WEIGHTS_NAME, PEFT_WEIGHTS_NAME, load_adapters, save_adapters
from ace_lora_hf.errors import AdapterMismatchError, CheckpointError, OutputPathError
from ace_lora_hf.model_card import PUBLISHED_RESULTS

from conftest import REPO_ROOT, SAMPLES, AceLoraModelTester, perturb_lora, populate_hub_cache
from test_loading import HUB_REPO_ID


def _push_to_hub_module():
    spec = importlib.util.spec_from_file_location("push_to_hub", REPO_ROOT / "examples" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def staged(tiny_hub_folder, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staging") / "repo"
    return _push_to_hub_module().stage_repository(tiny_hub_folder, HUB_REPO_ID, staging)


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the model card must open with YAML metadata"
    return yaml.safe_load(match.group(1))


def test_staged_repository_is_complete(staged):
    names = {path.name for path in staged.iterdir()}
    assert {
        "config.json", "model.safetensors", "configuration_ace_lora.py", "modeling_ace_lora.py", "loss_ace_lora.py",
        "processing_ace_lora.py", "image_processing_ace_lora.py", "processor_config.json", "tokenizer.json",
        "hf_model_inference.py", "README.md",
    } <= names
    assert "adapter_config.json" not in names
    assert set(json.loads((staged / "config.json").read_text())["auto_map"]) == {
        "AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"
    }


def test_model_card_metadata(staged):
    metadata = _front_matter((staged / "README.md").read_text())
    assert metadata["license"] == "mit" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert metadata["base_model"] == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert "medical" in metadata["tags"] and metadata["datasets"]
    values = [r["metrics"][0]["value"] for r in metadata["model-index"][0]["results"]]
    assert values == [value for *_, value in PUBLISHED_RESULTS] and 87.19 in values


def test_model_card_snippet_runs_against_the_hub_cache(staged, tmp_path):
    """The exact snippet users copy, run offline against the staged repository laid out as a Hub download."""
    card = (staged / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert f'"{HUB_REPO_ID}"' in snippet
    populate_hub_cache(staged, tmp_path / "hf_home" / "hub", HUB_REPO_ID)
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(SAMPLES / "nih_00000001_000.png", workdir / "chest_xray.png")
    (workdir / "snippet.py").write_text(snippet + "\nimport sys\nassert 'ace_lora_hf' not in sys.modules\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "snippet.py"], cwd=workdir, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    probabilities = eval(result.stdout.strip().splitlines()[-1])  # the snippet prints a dict literal
    assert set(probabilities) == {"No Finding", "pneumonia"}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_staging_refuses_a_non_empty_folder(tiny_hub_folder, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        _push_to_hub_module().stage_repository(tiny_hub_folder, HUB_REPO_ID, tmp_path)


# ------------------------------------------------------------------------------------------------- adapters


def test_adapter_export_round_trip(tiny_model, tester, tmp_path):
    save_adapters(tiny_model, tmp_path)
    size = sum((tmp_path / name).stat().st_size for name in (PEFT_WEIGHTS_NAME, EXTRAS_WEIGHTS_NAME))
    trainable = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert trainable * 4 <= size < trainable * 4 + 40_000  # float32 tensors plus the safetensors headers
    torch.manual_seed(0)  # the same base weights as `tiny_model`, different adapters
    fresh = perturb_lora(AceLoraModel(tester.get_config()), seed=5).eval()
    with torch.no_grad():
        fresh.logit_scale.fill_(3.0)
        fresh.vision_model.hypergraph.node_adapter.up.bias.normal_()
    _, inputs = tester.prepare_config_and_inputs()
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs).logits_per_image, tiny_model(**inputs).logits_per_image)
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits_per_image, tiny_model(**inputs).logits_per_image)
    with pytest.raises(OutputPathError, match="already holds adapters"):
        save_adapters(tiny_model, tmp_path)


def _lora_outputs(model, inputs):
    with torch.no_grad():
        return model.get_image_features(inputs["pixel_values"], use_hgnn=False).pooler_output


def test_exported_lora_is_a_peft_adapter(tiny_model, tester, tmp_path):
    """transformers' `load_adapter` and PEFT's `PeftModel` read the LoRA of `save_adapters` as their own."""
    from peft import PeftModel

    save_adapters(tiny_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"]
    _, inputs = tester.prepare_config_and_inputs()
    expected = _lora_outputs(tiny_model, inputs)

    torch.manual_seed(0)  # same base weights, fresh (no-op) LoRA
    model = AceLoraModel(tester.get_config()).eval()
    assert model.active_adapters() == ["default"]
    model.load_adapter(str(tmp_path), adapter_name="released")
    model.set_adapter("released")
    torch.testing.assert_close(_lora_outputs(model, inputs), expected)
    model.disable_adapters()
    assert not torch.allclose(_lora_outputs(model, inputs), expected)

    torch.manual_seed(0)
    wrapped = PeftModel.from_pretrained(AceLoraModel(tester.get_config()).eval(), str(tmp_path), adapter_name="released")
    torch.testing.assert_close(_lora_outputs(wrapped.base_model.model, inputs), expected)


def test_adapter_state_is_visible_to_transformers_peft_integration(tiny_model):
    lora = tiny_model.get_adapter_state_dict()
    expected = {name for name, _ in tiny_model.named_parameters() if ".lora_" in name}
    assert {name.replace(".weight", ".default.weight") for name in lora} == expected


def test_adapters_for_another_rank_are_refused(tiny_model, tmp_path):
    save_adapters(tiny_model, tmp_path)
    other = AceLoraModel(AceLoraModelTester().get_config(lora_rank=8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="vision_config.lora_rank: adapters 4, model 8"):
        load_adapters(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_adapters_with_nan_are_refused(tiny_model, tester, tmp_path):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(float("nan"))
    save_adapters(tiny_model, tmp_path)
    with pytest.raises(CheckpointError, match="tensor logit_scale contains NaN"):
        load_adapters(AceLoraModel(tester.get_config()), tmp_path)


def test_truncated_adapter_file_is_named(tiny_model, tester, tmp_path):
    save_adapters(tiny_model, tmp_path)
    weights = tmp_path / PEFT_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{PEFT_WEIGHTS_NAME}: not a readable safetensors file"):
        load_adapters(AceLoraModel(tester.get_config()), tmp_path)
