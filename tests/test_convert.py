"""The converter: its command line, and a clear error for every wrong or mismatched input file."""

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

from ace_lora_hf import AceLoraConfig
from ace_lora_hf.sources.biomedclip import biomedclip_config, biomedclip_state_dict
from ace_lora_hf.sources.convert import convert_sources, resolve_sources
from ace_lora_hf.errors import CheckpointError, ModelSourceError
from ace_lora_hf.sources.released_adapters import adapter_state_dict, read_adapter_checkpoint

from conftest import ACE_CHECKPOINT


def test_converted_folder_layout(converted_dir):
    files = {path.name for path in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_ace_lora.py", "configuration_ace_lora.py",
            "processor_config.json", "tokenizer.json", "processing_ace_lora.py"} <= files
    assert "adapter_config.json" not in files
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "ace_lora" and config["vision_config"]["layer_norm_eps"] == 1e-6


def test_converted_processor_follows_open_clip_config(converted_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted_dir)
    assert list(processor.image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert processor.image_processor.crop_size == {"height": 224, "width": 224}
    assert processor(text=["a chest x-ray image of pneumonia."])["input_ids"][0][:3] == [2, 9, 16]  # [CLS] a chest


def test_converted_processor_pads_to_the_models_text_context(biomedclip_dir, tmp_path):
    folder = tmp_path / "biomedclip_77"
    shutil.copytree(biomedclip_dir, folder, ignore=shutil.ignore_patterns("open_clip_pytorch_model.bin"))
    (folder / "open_clip_pytorch_model.bin").symlink_to(biomedclip_dir / "open_clip_pytorch_model.bin")
    open_clip_config = json.loads((folder / "open_clip_config.json").read_text())
    open_clip_config["model_cfg"]["text_cfg"]["context_length"] = 77
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config))
    model, processor = convert_sources(resolve_sources(folder))
    assert model.config.text_config.context_length == processor.context_length == 77
    assert len(processor(text=["a chest x-ray image of pneumonia."])["input_ids"][0]) == 77


def test_cli_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "ace_lora_hf.cli.convert", "--biomedclip", str(tmp_path), "--output", str(output)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (output / "notes.txt").read_text() == "mine"


def test_bert_defaults_when_the_folder_has_no_bert_config(biomedclip_dir, tmp_path):
    folder = tmp_path / "hub_layout"
    folder.mkdir()
    shutil.copy(biomedclip_dir / "open_clip_config.json", folder)
    config = biomedclip_config(folder)
    assert config.text_config.vocab_size == 30522 and config.text_config.attention_probs_dropout_prob == 0.0
    assert config.vision_config.patch_size == 16 and config.text_config.context_length == 256


def test_missing_open_clip_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no open_clip_config.json"):
        resolve_sources(tmp_path, None, None, None)


# ------------------------------------------------------------------------------------------- BiomedCLIP weights


def _mutated_biomedclip(biomedclip_dir, tmp_path, mutate):
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    shutil.copy(biomedclip_dir / "open_clip_config.json", folder)
    state = torch.load(biomedclip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    mutate(state)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("visual.trunk.blocks.3.mlp.fc1.weight"), r"missing weights for vision_model\.layers\.3\.mlp"),
        (lambda s: s.update({"visual.trunk.head.weight": torch.zeros(2)}), "unexpected key 'visual.trunk.head.weight'"),
        (lambda s: s.update({"text.proj.2.weight": torch.zeros(256, 640)}), r"'text.proj.2.weight' has shape \[256, 640\]"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_bad_biomedclip_weights_name_file_and_key(biomedclip_dir, plain_model, tmp_path, mutate, message):
    folder = _mutated_biomedclip(biomedclip_dir, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message) as error:
        biomedclip_state_dict(folder, plain_model)
    assert str(folder / "open_clip_pytorch_model.bin") in str(error.value)


# ------------------------------------------------------------------------------------------- ACE-LoRA adapters


@pytest.fixture(scope="module")
def released():
    return torch.load(ACE_CHECKPOINT, map_location="cpu", weights_only=True)


def _write_checkpoint(tmp_path, checkpoint):
    path = tmp_path / "adapters.pt"
    torch.save(checkpoint, path)
    return path


def ace_state_dict(path, config):
    return adapter_state_dict(read_adapter_checkpoint(path), config)


def test_released_checkpoint_maps_onto_every_trainable_parameter(released, tmp_path):
    state = ace_state_dict(ACE_CHECKPOINT, AceLoraConfig())
    assert sum(t.numel() for t in state.values()) == 969_217
    assert torch.equal(state["vision_model.layers.0.attention.q_proj.lora_A.default.weight"],
                       released["weights"]["layer_12"]["q_proj"]["w_lora_A"])
    assert torch.equal(state["text_model.encoder.layer.11.attention.self.value.lora_B.default.weight"],
                       released["weights"]["layer_11"]["v_proj"]["w_lora_B"])


def _drop_key(checkpoint):
    del checkpoint["weights"]["layer_5"]["k_proj"]["w_lora_B"]


def _wrong_shape(checkpoint):
    checkpoint["weights"]["text_node_adapter"]["up.weight"] = torch.zeros(512, 64)


def _nan(checkpoint):
    checkpoint["weights"]["img_edge_adapter"]["down.bias"][3] = float("nan")


def _rank_8(checkpoint):
    checkpoint["weights"]["layer_0"]["q_proj"]["w_lora_A"] = torch.zeros(8, 768)


def _integers(checkpoint):
    adapter = checkpoint["weights"]["layer_2"]["v_proj"]
    adapter["w_lora_B"] = adapter["w_lora_B"].to(torch.int64)  # cast to the model's dtype, it would load silently


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_key, r"missing tensor layer_5/k_proj/w_lora_B"),
        (_wrong_shape, r"text_node_adapter/up.weight has shape \[512, 64\], expected \[512, 128\]"),
        (_nan, r"img_edge_adapter/down.bias contains NaN"),
        (_rank_8, r"layer_0/q_proj/w_lora_A has rank 8 but the config has lora_rank=4"),
        (_integers, r"tensor layer_2/v_proj/w_lora_B is stored as torch.int64; weights are floating point"),
    ],
    ids=["missing-key", "wrong-shape", "nan", "other-rank", "integers"],
)
def test_bad_adapter_checkpoints_name_file_and_key(released, tmp_path, mutate, message):
    checkpoint = copy.deepcopy(released)
    mutate(checkpoint)
    path = _write_checkpoint(tmp_path, checkpoint)
    with pytest.raises(CheckpointError, match=message) as error:
        ace_state_dict(path, AceLoraConfig())
    assert str(path) in str(error.value)


def test_full_model_passed_as_adapters(tmp_path):
    path = _write_checkpoint(tmp_path, {"visual.trunk.cls_token": torch.zeros(1, 1, 768)})
    with pytest.raises(CheckpointError, match="full BiomedCLIP state dict"):
        ace_state_dict(path, AceLoraConfig())


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "adapters.pt"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a weights-only torch checkpoint"):
        ace_state_dict(path, AceLoraConfig())


def test_checkpoint_metadata_sets_rank_and_top_k(released, biomedclip_dir, tmp_path):
    checkpoint = {"weights": released["weights"], "metadata": {**released["metadata"], "r": 8, "topk": 7}}
    updates = read_adapter_checkpoint(_write_checkpoint(tmp_path, checkpoint)).config_updates()
    config = biomedclip_config(biomedclip_dir, **updates)
    assert (config.vision_config.lora_rank, config.text_config.hypergraph_top_k) == (8, 7)
    overridden = biomedclip_config(biomedclip_dir, **{**updates, "hypergraph_top_k": 3})
    assert overridden.vision_config.hypergraph_top_k == overridden.text_config.hypergraph_top_k == 3
