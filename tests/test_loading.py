"""Both Auto paths: in-process registration after `import ace_lora_hf`, and Hub remote code (`auto_map`)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import ace_lora_hf
from ace_lora_hf import AceLoraConfig
from ace_lora_hf import load
from ace_lora_hf.errors import CheckpointError, ConfigError
from ace_lora_hf.models.ace_lora.configuration_ace_lora import FORMAT_VERSION
from ace_lora_hf.models.ace_lora.errors import FormatVersionError
from ace_lora_hf.sources.folders import load_pretrained

from conftest import populate_hub_cache


HUB_REPO_ID = "aydnarda/ACE-LoRA"
FIXTURE_0_1 = Path(__file__).parent / "fixtures" / "ace_lora_0_1" / "model"

# Runs in a fresh interpreter that never imports ace_lora_hf; prints the class module and an embedding.
REMOTE_CODE_SCRIPT = """
import json, sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "ace_lora_hf" not in sys.modules
pixels = torch.load(sys.argv[2])
with torch.no_grad():
    embedding = model.get_image_features(pixels).pooler_output
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(json.dumps({"module": type(model).__module__, "embedding": embedding.tolist(), "trainable": trainable}))
"""

IMPORTED_SCRIPT = """
import json, sys, torch
import ace_lora_hf
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    embedding = model.get_image_features(torch.load(sys.argv[2])).pooler_output
print(json.dumps({"module": type(model).__module__, "embedding": embedding.tolist()}))
"""


def run_python(script: str, *args: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def saved_tiny(tiny_model, tester, tmp_path):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    _, inputs = tester.prepare_config_and_inputs()
    torch.save(inputs["pixel_values"], tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = tiny_model.get_image_features(inputs["pixel_values"]).pooler_output
    return folder, tmp_path / "pixels.pt", expected


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def isolated_env(tmp_path: Path, **extra: str) -> dict:
    """The current environment with its own, empty Hugging Face home (Hub cache and remote-code modules)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), **extra)
    return env


def test_saved_folder_is_self_contained_remote_code(saved_tiny, tiny_model, tmp_path):
    folder, pixels, expected = saved_tiny
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ace_lora.AceLoraConfig",
        "AutoModel": "modeling_ace_lora.AceLoraModel",
        "AutoModelForZeroShotImageClassification": "modeling_ace_lora.AceLoraModel",
    }
    for code_file in ("configuration_ace_lora.py", "modeling_ace_lora.py", "loss_ace_lora.py"):
        source = (folder / code_file).read_text()
        # Only AceLoraModel.from_biomedclip reaches for the package, inside the method and guarded.
        assert not re.search(r"^(from|import) ace_lora_hf", source, re.MULTILINE)
        assert "from .." not in source
    result = run_python(REMOTE_CODE_SCRIPT, str(folder), str(pixels), env=isolated_env(tmp_path))
    assert result["module"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(result["embedding"]), expected)
    assert result["trainable"] == trainable_count(tiny_model)


def test_hub_repo_id_loads_offline_from_the_cache(saved_tiny, tmp_path):
    folder, pixels, expected = saved_tiny
    env = isolated_env(tmp_path, HF_HUB_OFFLINE="1")
    populate_hub_cache(folder, tmp_path / "hf_home" / "hub", HUB_REPO_ID)
    imported = run_python(IMPORTED_SCRIPT, HUB_REPO_ID, str(pixels), env=env)
    assert imported["module"] == "ace_lora_hf.models.ace_lora.modeling_ace_lora"
    torch.testing.assert_close(torch.tensor(imported["embedding"]), expected)
    remote = run_python(REMOTE_CODE_SCRIPT, HUB_REPO_ID, str(pixels), env=env)
    assert remote["module"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(remote["embedding"]), expected)


def test_converted_full_model_loads_as_remote_code(converted_dir, ace_model, reference, tmp_path):
    pixels = tmp_path / "pixels.pt"
    torch.save(torch.from_numpy(reference["input_images"][:1]), pixels)
    result = run_python(REMOTE_CODE_SCRIPT, str(converted_dir), str(pixels), env=isolated_env(tmp_path))
    assert result["trainable"] == 969_217
    embedding = torch.tensor(result["embedding"])
    torch.testing.assert_close(embedding, torch.from_numpy(reference["img_ace_emb"][:1]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ format versions


def test_saved_folders_record_their_format_version(saved_tiny):
    folder, _, _ = saved_tiny
    assert json.loads((folder / "config.json").read_text())["ace_lora_format_version"] == FORMAT_VERSION == 1


def test_a_folder_without_a_format_version_is_format_1():
    config = json.loads((FIXTURE_0_1 / "config.json").read_text())
    assert "ace_lora_format_version" not in config
    assert AceLoraConfig.from_dict(config).ace_lora_format_version == 1


@pytest.mark.parametrize("loader", ["load", "AutoModel"])
def test_a_newer_format_is_refused_in_one_line_naming_the_file_and_the_fix(saved_tiny, loader):
    folder, _, _ = saved_tiny
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ace_lora_format_version": FORMAT_VERSION + 1}))
    with pytest.raises(FormatVersionError) as refused:
        ace_lora_hf.load(folder) if loader == "load" else AutoModel.from_pretrained(folder)
    message = str(refused.value)
    assert "\n" not in message and "upgrade ace-lora-hf" in message
    assert f"ace_lora_format_version={FORMAT_VERSION + 1}" in message
    assert message.startswith(f"--model {folder}/config.json:" if loader == "load" else "config.json:")


def test_non_finite_weights_are_refused_when_loading_naming_the_tensor(saved_tiny):
    folder, _, _ = saved_tiny
    weights = load_file(folder / "model.safetensors")
    weights["logit_scale"] = torch.tensor(float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weight logit_scale contains NaN or infinite values"):
        load_pretrained(AutoModel, folder)


@pytest.mark.parametrize("stored", [torch.bool, torch.uint8, torch.int64, torch.float8_e4m3fn])
def test_weights_stored_in_a_non_float_dtype_are_refused_naming_the_tensor(saved_tiny, tmp_path, stored):
    folder = tmp_path / "copy"
    shutil.copytree(saved_tiny[0], folder)
    weights = load_file(folder / "model.safetensors")
    name = next(key for key in weights if key.endswith("lora_A.default.weight"))
    weights[name] = weights[name].to(stored)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)} of model.safetensors is stored as"):
        load(folder)


@pytest.mark.parametrize("field", ["dtype", "vision_config.dtype"])
def test_a_config_dtype_the_model_cannot_run_in_is_refused(saved_tiny, tmp_path, field):
    folder = tmp_path / "copy"
    shutil.copytree(saved_tiny[0], folder)
    config = json.loads((folder / "config.json").read_text())
    *parent, key = field.split(".")
    (config[parent[0]] if parent else config)[key] = "int8"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"config.json: {re.escape(field)} is 'int8'"):
        load(folder)


def test_a_truncated_weights_file_through_from_pretrained_is_a_checkpoint_error(saved_tiny, tmp_path):
    folder = shutil.copytree(saved_tiny[0], tmp_path / "copy")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder))}: its weights file is unreadable .* "
                                              "it may be truncated"):
        AutoModel.from_pretrained(folder)


def test_a_folder_without_its_weights_file_says_which_file_and_the_fix(saved_tiny, tmp_path):
    folder = shutil.copytree(saved_tiny[0], tmp_path / "copy")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"copy: no weights file \(model.safetensors\) in the folder; download "
                                              "or convert the model again"):
        load(folder)
