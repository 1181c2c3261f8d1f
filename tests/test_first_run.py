"""The first README command on a fresh machine, against the weights that exist on the Hub today: BiomedCLIP in
open_clip format (no tokenizer inside; its config names PubMedBERT's tokenizer repository) and the authors' adapters
shipped with the package. A Hub cache filled with the deterministic stand-in under the real repository ids plays the
Hub; everything runs with HF_HUB_OFFLINE=1."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from ace_lora_hf import AceLoraModel
from ace_lora_hf.cli.convert import main as convert_main
from ace_lora_hf.errors import ModelSourceError
from ace_lora_hf.sources.folders import BIOMEDCLIP_REPO_ID, conversion_cache
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier

from conftest import REPO_ROOT, populate_hub_cache


TOKENIZER_REPO_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
EXAMPLES = sorted((REPO_ROOT / "examples" / "images").glob("*.png")) + \
    sorted((REPO_ROOT / "examples" / "images").glob("*.dcm"))


@pytest.fixture(scope="module")
def hf_home(biomedclip_dir, tmp_path_factory):
    """A Hugging Face home whose Hub cache holds BiomedCLIP and its tokenizer as the Hub serves them."""
    home = tmp_path_factory.mktemp("hf_home")
    biomedclip = tmp_path_factory.mktemp("biomedclip_repo")
    for name in ("open_clip_pytorch_model.bin", "open_clip_config.json", "pubmedbert_config"):
        os.symlink(biomedclip_dir / name, biomedclip / name)
    populate_hub_cache(biomedclip, home / "hub", BIOMEDCLIP_REPO_ID, link=True)
    tokenizer = tmp_path_factory.mktemp("tokenizer_repo")
    shutil.copy(biomedclip_dir / "vocab.txt", tokenizer)
    populate_hub_cache(tokenizer, home / "hub", TOKENIZER_REPO_ID)
    return home


@pytest.fixture
def offline_hub(hf_home, monkeypatch):
    """This process sees `hf_home` as its Hugging Face home, offline."""
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def run_first_command(hf_home, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / "hf_model_inference.py"), "--images", *map(str, EXAMPLES), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def first_run(hf_home, tmp_path_factory):
    """The README's first command, offline against the filled cache, with its results also written as JSON."""
    output = tmp_path_factory.mktemp("first_run") / "results.json"
    finished = run_first_command(hf_home, "--output", str(output))
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished, json.loads(output.read_text())


def test_the_first_command_builds_the_released_model_and_classifies_the_examples(first_run, ace_model, converted_dir):
    finished, results = first_run
    header, *rows = finished.stdout.splitlines()[:5]
    shared = re.match(r"image \(in (.+)/\)", header)  # long paths are shown relative to the folder they share
    folder = Path(shared.group(1)) if shared else Path()
    assert [folder / row.split()[0] for row in rows] == EXAMPLES
    assert results["classified"] == len(EXAMPLES) and not results["skipped"]
    from transformers import AutoProcessor

    expected = ZeroShotClassifier(ace_model, AutoProcessor.from_pretrained(converted_dir))(EXAMPLES, results["labels"])
    actual = torch.tensor([[r["probabilities"][label] for label in results["labels"]] for r in results["results"]])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_the_cached_conversion_is_what_an_explicit_local_conversion_writes(first_run, hf_home, converted_dir):
    (cached,) = [folder for folder in conversion_cache(hf_home / "ace-lora-hf" / "converted").iterdir()
                 if folder.is_dir()]
    explicit, converted = load_file(converted_dir / "model.safetensors"), load_file(cached / "model.safetensors")
    assert explicit.keys() == converted.keys()
    assert all(torch.equal(converted[key], tensor) for key, tensor in explicit.items())
    assert (cached / "tokenizer.json").read_text() == (converted_dir / "tokenizer.json").read_text()


def test_the_python_one_liner_reuses_the_cached_conversion(first_run, offline_hub, ace_model, monkeypatch):
    from ace_lora_hf.sources import folders as model_sources

    monkeypatch.setattr(model_sources, "convert_sources", lambda *args: pytest.fail("converted a second time"))
    model = AceLoraModel.from_biomedclip(BIOMEDCLIP_REPO_ID, adapters="released")
    expected = ace_model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in model.state_dict().items())


def test_the_converter_takes_hub_ids(offline_hub, converted_dir, tmp_path):
    convert_main(["--biomedclip", BIOMEDCLIP_REPO_ID, "--ace-checkpoint", "released", "--output", str(tmp_path)])
    explicit, converted = load_file(converted_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(converted[key], tensor) for key, tensor in explicit.items())
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "processor_config.json").is_file()


def test_offline_without_a_cache_fails_at_once_with_the_two_ways_forward(tmp_path):
    finished = run_first_command(tmp_path)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    message = finished.stderr.strip().splitlines()[-1]
    assert f"--biomedclip {BIOMEDCLIP_REPO_ID}: offline (HF_HUB_OFFLINE=1)" in message
    assert "not in the cache" in message and "pass a local folder" in message


def test_a_biomedclip_folder_without_a_tokenizer_is_refused_before_writing(biomedclip_dir, tmp_path):
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    config = json.loads((biomedclip_dir / "open_clip_config.json").read_text())
    del config["model_cfg"]["text_cfg"]["hf_tokenizer_name"]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    os.symlink(biomedclip_dir / "open_clip_pytorch_model.bin", folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="no tokenizer files .* pass --tokenizer"):
        convert_main(["--biomedclip", str(folder), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_folder_without_a_vocabulary_is_refused_before_writing(biomedclip_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"--tokenizer .*empty: no tokenizer files"):
        convert_main(["--biomedclip", str(biomedclip_dir), "--tokenizer", str(tmp_path / "empty"),
                      "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_text_tower_is_refused(biomedclip_dir, tmp_path):
    words = 30522 + 10  # PubMedBERT's vocabulary, the stand-in's text tower too
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                            *(f"w{i}" for i in range(words))]) + "\n")
    with pytest.raises(ModelSourceError, match="tokens do not fit the text tower's 30522 embeddings"):
        convert_main(["--biomedclip", str(biomedclip_dir), "--tokenizer", str(tmp_path / "big"),
                      "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_hub_repo_in_another_format_says_what_it_is(offline_hub, tmp_path):
    from ace_lora_hf.sources.folders import model_folder

    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "ACE_LoRA.pt").write_bytes(b"the authors' weights")
    populate_hub_cache(upload, offline_hub / "hub", "aydnarda/ACE-LoRA", missing=("config.json",))
    with pytest.raises(ModelSourceError, match="aydnarda/ACE-LoRA: not a model in ACE-LoRA's transformers format.*"
                                               "Leave --model out to build the released ACE-LoRA model"):
        model_folder("aydnarda/ACE-LoRA")
