"""Shared fixtures: the tiny ModelTester, the full-size BiomedCLIP stand-in and the reference outputs."""

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ace_lora_hf import AceLoraConfig, AceLoraModel
from ace_lora_hf.cli.convert import main as convert_main


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ACE_LORA_SHARED", REPO_ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
ACE_CHECKPOINT = SHARED / "checkpoints" / "ACE_LoRA.pt"
SAMPLES = SHARED / "samples"
REFERENCE_SEED = 20240601
# A small uncased WordPiece vocabulary with PubMedBERT's special-token ids ([PAD]=0 ... [MASK]=4).
TEST_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "-", "'"] + sorted(
    set("a an the of and with no finding findings suggesting chest x ray image pneumonia pneumothorax normal "
        "cardiomegaly edema effusion pleural atelectasis consolidation lung heart opacity histopathology "
        "h & e stained tissue section showing adenocarcinoma benign colon left right there is mild".split())
)


def write_test_vocab(folder: Path) -> Path:
    (folder / "vocab.txt").write_text("\n".join(TEST_VOCAB) + "\n")
    return folder


class AceLoraModelTester:
    """Tiny hyper-parameters in transformers' ModelTester style."""

    def __init__(self, batch_size=3, image_size=30, patch_size=6, hidden_size=32, num_layers=2, num_heads=4,
                 vocab_size=99, text_context_length=20, projection_dim=16, top_k=3):
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.vocab_size = vocab_size
        self.text_context_length = text_context_length
        self.projection_dim = projection_dim
        self.top_k = top_k

    def get_config(self, **overrides) -> AceLoraConfig:
        tower = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                     num_attention_heads=self.num_heads, intermediate_size=37)
        return AceLoraConfig(
            vision_config=dict(tower, image_size=self.image_size, patch_size=self.patch_size),
            text_config=dict(tower, vocab_size=self.vocab_size,
                             max_position_embeddings=max(64, self.text_context_length)),
            projection_dim=self.projection_dim,
            text_projection_hidden_size=24,
            text_context_length=self.text_context_length,
            hypergraph_hidden_size=8,
            hypergraph_top_k=self.top_k,
            **overrides,
        )

    def prepare_config_and_inputs(self, seed=0, **overrides):
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)
        input_ids = torch.randint(5, self.vocab_size, (self.batch_size, 12), generator=generator)
        input_ids[:, 0] = 2
        input_ids[1, 8:] = 0  # a shorter text, padded
        return self.get_config(**overrides), {"pixel_values": pixel_values, "input_ids": input_ids}


def perturb_lora(model: AceLoraModel, seed: int = 0) -> AceLoraModel:
    """Give every LoRA B a non-zero value so that the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="session")
def tiny_hub_folder(tmp_path_factory) -> Path:
    """A complete tiny model folder (weights, code, processor) as `push_to_hub` would upload it."""
    from transformers import BertTokenizer

    from ace_lora_hf import AceLoraImageProcessor, AceLoraProcessor

    tester = AceLoraModelTester(image_size=32, patch_size=8, text_context_length=256)
    torch.manual_seed(0)
    model = perturb_lora(AceLoraModel(tester.get_config()))
    folder = tmp_path_factory.mktemp("tiny_hub_model")
    model.save_pretrained(folder)
    tokenizer = BertTokenizer.from_pretrained(write_test_vocab(tmp_path_factory.mktemp("vocab")))
    image_processor = AceLoraImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    AceLoraProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


HUB_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(folder: Path, cache: Path, repo_id: str, link: bool = False,
                       missing: tuple[str, ...] = ()) -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo (refs/main -> snapshot), its files copied or
    (`link`) symbolically linked; `missing` files are recorded as absent from the repo, as an online check would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_SNAPSHOT)
    shutil.copytree(folder, repo / "snapshots" / HUB_SNAPSHOT, copy_function=os.symlink if link else shutil.copy2)
    for name in missing:
        (repo / ".no_exist" / HUB_SNAPSHOT).mkdir(parents=True, exist_ok=True)
        (repo / ".no_exist" / HUB_SNAPSHOT / name).touch()
    return repo


@pytest.fixture
def tester() -> AceLoraModelTester:
    return AceLoraModelTester()


@pytest.fixture
def tiny_model(tester) -> AceLoraModel:
    torch.manual_seed(0)
    return perturb_lora(AceLoraModel(tester.get_config())).eval()


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "case_a.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def biomedclip_dir(tmp_path_factory) -> Path:
    """The deterministic BiomedCLIP stand-in the reference outputs were computed with, in open_clip's layout."""
    out = tmp_path_factory.mktemp("biomedclip")
    subprocess.run(
        [sys.executable, str(REFERENCE / "make_random_biomedclip.py"), str(out), "--seed", str(REFERENCE_SEED)],
        check=True, capture_output=True,
    )
    return write_test_vocab(out)


@pytest.fixture(scope="session")
def plain_model(biomedclip_dir) -> AceLoraModel:
    """BiomedCLIP stand-in with fresh (no-op) adapters."""
    from ace_lora_hf.sources.convert import convert_sources, resolve_sources

    model, _ = convert_sources(resolve_sources(biomedclip_dir, None, None, None))
    return model


@pytest.fixture(scope="session")
def converted_dir(biomedclip_dir, tmp_path_factory) -> Path:
    """BiomedCLIP stand-in + the released adapters, written by the converter's command line."""
    out = tmp_path_factory.mktemp("ace_lora_converted")
    convert_main(["--biomedclip", str(biomedclip_dir), "--ace-checkpoint", str(ACE_CHECKPOINT),
                  "--output", str(out), "--overwrite"])
    return out


@pytest.fixture(scope="session")
def ace_model(converted_dir) -> AceLoraModel:
    from transformers import AutoModel

    return AutoModel.from_pretrained(converted_dir).eval()


# ------------------------------------------------------------------------------------------------------ skips

# Our own tests skip with a reason that starts "needs " when a package or a tool is missing; CI (ACE_LORA_CI=1)
# installs all of them, so there such a skip fails the run. Upstream's common tests skip for hardware this machine
# lacks or for features ACE-LoRA does not have.
MISSING_DEPENDENCY = "needs "
HARDWARE = re.compile(r"cuda|gpu|accelerator|flash|deepspeed|bitsandbytes|\bbnb\b|multi.?device|xpu|npu|tpu", re.I)
_skip_reasons: list[str] = []


def skip_cause(reason: str) -> str:
    if reason.startswith(MISSING_DEPENDENCY):
        return "a package or tool that is not installed"
    if HARDWARE.search(reason):
        return "hardware this machine lacks (CUDA, flash-attention, DeepSpeed, bitsandbytes)"
    return "transformers' common tests that do not apply to ACE-LoRA"


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _skip_reasons.append(report.longrepr[2].removeprefix("Skipped: "))


pytest_collectreport = pytest_runtest_logreport  # a module skipped as a whole


def pytest_terminal_summary(terminalreporter):
    if _skip_reasons:
        causes = Counter(map(skip_cause, _skip_reasons))
        terminalreporter.section("skipped tests, by cause")
        for cause, count in causes.most_common():
            terminalreporter.write_line(f"{count:5d}  {cause}")


def pytest_sessionfinish(session):
    missing = sorted({reason for reason in _skip_reasons if reason.startswith(MISSING_DEPENDENCY)})
    if os.environ.get("ACE_LORA_CI") and missing:
        print("\nCI installs every package and tool the tests use, yet tests were skipped:", *missing, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
