"""The ACE-LoRA zero-shot-image-classification pipeline: the stock call and output, the classifier's scores, class
embeddings kept between calls, the stock pipeline for other models, and the saved folder as remote code."""

import json
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, pipeline
from transformers.dynamic_module_utils import get_imports
from transformers.pipelines import ZeroShotImageClassificationPipeline

from ace_lora_hf import AceLoraZeroShotImageClassificationPipeline
from ace_lora_hf.errors import ImageLoadError, InvalidArgumentError
from ace_lora_hf.models.ace_lora import batch_inference
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier

from conftest import SAMPLES, write_test_vocab
from test_loading import isolated_env, run_python


TASK = "zero-shot-image-classification"
IMAGES = [str(SAMPLES / "nih_00000001_000.png"), str(SAMPLES / "fake_monochrome1.dcm"),
          str(SAMPLES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"),
          str(SAMPLES / "nih_00027426_000.png")]
LABELS = ["no finding", "pneumonia", "edema"]
# What the remote model needs anyway: transformers with torch, and PEFT (which brings accelerate).
REMOTE_CODE_PACKAGES = {"transformers", "torch", "peft", "accelerate", "huggingface_hub", "safetensors", "numpy",
                        "PIL", "tqdm"}

# A fresh interpreter in which the package cannot be imported, as where only the Hub folder exists.
REMOTE_PIPELINE_SCRIPT = """
import json, sys
sys.modules["ace_lora_hf"] = None
from transformers import pipeline
pipe = pipeline("zero-shot-image-classification", model=sys.argv[1], trust_remote_code=True)
result = pipe(json.loads(sys.argv[2]), candidate_labels=json.loads(sys.argv[3]))
print(json.dumps({"module": type(pipe).__module__, "result": result}))
"""


@pytest.fixture(scope="module")
def model_and_processor(tiny_hub_folder):
    return AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)


@pytest.fixture
def pipe(model_and_processor):
    model, processor = model_and_processor
    return pipeline(TASK, model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor)


def as_probabilities(results: list[list[dict]], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[{r["label"]: r["score"] for r in result}[label] for label in labels] for result in results])


def test_scores_equal_the_classifiers_with_the_papers_two_templates(pipe, model_and_processor, tiny_hub_folder):
    expected = ZeroShotClassifier(*model_and_processor)(IMAGES, LABELS)
    # The folder records the pipeline for the Hub route; in this process the package serves it without
    # trust_remote_code.
    assert TASK in json.loads((tiny_hub_folder / "config.json").read_text())["custom_pipelines"]
    by_path = pipeline(TASK, model=str(tiny_hub_folder))
    assert type(pipe) is type(by_path) is AceLoraZeroShotImageClassificationPipeline
    for results in (pipe(IMAGES, candidate_labels=LABELS), by_path(IMAGES, candidate_labels=LABELS, batch_size=3)):
        torch.testing.assert_close(as_probabilities(results, LABELS), expected, rtol=0, atol=1e-6)


def test_stock_output_format(pipe):
    result = pipe(Image.open(IMAGES[0]), candidate_labels=LABELS)
    assert [sorted(entry) for entry in result] == [["label", "score"]] * 3
    assert sorted(entry["label"] for entry in result) == sorted(LABELS)
    scores = [entry["score"] for entry in result]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-6)
    assert pipe(IMAGES[1], candidate_labels=LABELS) == pipe([IMAGES[1]], candidate_labels=LABELS)[0]


def test_class_prompts_are_encoded_once_per_labels_and_templates(pipe, monkeypatch):
    monkeypatch.setattr(batch_inference, "CPU_CHUNK_TOKENS", 10**6)  # one model call per label set
    calls = []
    encode = pipe.model.get_class_embeddings
    monkeypatch.setattr(pipe.model, "get_class_embeddings", lambda *a, **k: calls.append(a[0].shape) or encode(*a, **k))
    pipe(IMAGES[:2], candidate_labels=LABELS)
    pipe(IMAGES[2:], candidate_labels=LABELS)
    assert calls == [(3, 2, 256)]  # 3 labels x the default 2 templates, once
    pipe(IMAGES[0], candidate_labels=LABELS, hypothesis_template="a chest x-ray image of {}.")
    pipe(IMAGES[1], candidate_labels=LABELS, templates=["a chest x-ray image of {}."])
    pipe(IMAGES[0], candidate_labels=LABELS[:2])
    assert calls == [(3, 2, 256), (3, 1, 256), (2, 2, 256)]


def test_a_list_of_images_goes_through_the_model_in_batches(pipe, monkeypatch):
    batches = []
    embed = pipe.model.get_image_features
    monkeypatch.setattr(pipe.model, "get_image_features", lambda pixels: batches.append(len(pixels)) or embed(pixels))
    by_batch = pipe(IMAGES, candidate_labels=LABELS)
    one_by_one = pipe(IMAGES, candidate_labels=LABELS, batch_size=1)
    assert batches == [4, 1, 1, 1, 1]
    torch.testing.assert_close(as_probabilities(by_batch, LABELS), as_probabilities(one_by_one, LABELS), rtol=0,
                               atol=1e-6)


def test_templates_set_at_construction_apply_to_every_call(model_and_processor):
    model, processor = model_and_processor
    templates = ["a chest x-ray image of {}.", "findings suggesting {}.", "{}"]
    pipe = pipeline(TASK, model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor,
                    templates=templates)
    expected = ZeroShotClassifier(model, processor, templates)(IMAGES[:2], LABELS)
    torch.testing.assert_close(as_probabilities(pipe(IMAGES[:2], candidate_labels=LABELS), LABELS), expected,
                               rtol=0, atol=1e-6)


def test_bad_arguments_are_refused_naming_the_fix(pipe, tmp_path):
    with pytest.raises(InvalidArgumentError, match="not both"):
        pipe(IMAGES[0], candidate_labels=LABELS, templates=["{}"], hypothesis_template="{}")
    with pytest.raises(InvalidArgumentError, match="needs exactly one"):
        pipe(IMAGES[0], candidate_labels=LABELS, templates=["no placeholder"])
    with pytest.raises(InvalidArgumentError, match="list of two or more class names"):
        pipe(IMAGES[0], candidate_labels="pneumonia")
    with pytest.raises(ImageLoadError, match="missing.png: file not found"):
        pipe(str(tmp_path / "missing.png"), candidate_labels=LABELS)


def test_dicom_without_pydicom_is_an_image_error(monkeypatch):
    """The remote-code copy of the image loader must import without pydicom; then only DICOM files need it."""
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImageLoadError, match="reading DICOM needs pydicom"):
        load_image(IMAGES[1])
    assert load_image(IMAGES[0]).mode == "L"


def test_other_models_get_the_stock_pipeline(tmp_path):
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config = CLIPConfig(text_config=dict(tower, vocab_size=99, max_position_embeddings=64),
                        vision_config=dict(tower, image_size=30, patch_size=6), projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    parts = {"tokenizer": BertTokenizer.from_pretrained(write_test_vocab(tmp_path)),
             "image_processor": CLIPImageProcessor(size={"shortest_edge": 30}, crop_size=30)}
    ours = pipeline(TASK, model=clip, **parts)
    stock = ZeroShotImageClassificationPipeline(model=clip, **parts)
    assert type(ours) is AceLoraZeroShotImageClassificationPipeline
    image = Image.open(IMAGES[0]).convert("RGB")
    call = dict(candidate_labels=LABELS, hypothesis_template="a chest x-ray image of {}.")
    assert ours([image, image], **call) == stock([image, image], **call)


def remote_pipeline_probabilities(folder, tmp_path) -> torch.Tensor:
    """`pipeline(TASK, model=folder, trust_remote_code=True)` on a PNG and a DICOM, where the package cannot be
    imported: the probabilities of LABELS, after checking that the folder's own pipeline code served them."""
    remote = run_python(REMOTE_PIPELINE_SCRIPT, str(folder), json.dumps(IMAGES[:2]), json.dumps(LABELS),
                        env=isolated_env(tmp_path))
    assert remote["module"].startswith("transformers_modules.")
    assert remote["module"].endswith(".pipeline_ace_lora")
    return as_probabilities(remote["result"], LABELS)


def assert_self_contained_code(folder) -> None:
    assert {"pipeline_ace_lora.py", "zero_shot.py", "image_loading.py"} <= {path.name for path in folder.glob("*.py")}
    for code_file in folder.glob("*.py"):
        packages = set(get_imports(code_file)) - set(sys.stdlib_module_names)
        assert packages <= REMOTE_CODE_PACKAGES, f"{code_file.name} imports {packages - REMOTE_CODE_PACKAGES}"


def test_a_saved_model_folder_serves_the_pipeline_as_remote_code(tiny_hub_folder, model_and_processor, tmp_path):
    """A folder as ace-lora-convert and ace-lora-publish write it (model and processor `save_pretrained`)."""
    config = json.loads((tiny_hub_folder / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_ace_lora.AceLoraZeroShotImageClassificationPipeline"
    assert_self_contained_code(tiny_hub_folder)
    expected = ZeroShotClassifier(*model_and_processor)(IMAGES[:2], LABELS)
    torch.testing.assert_close(remote_pipeline_probabilities(tiny_hub_folder, tmp_path), expected, rtol=0, atol=1e-5)


def test_saving_leaves_the_models_config_as_it_was(model_and_processor, tmp_path):
    model, _ = model_and_processor
    assert not hasattr(model.config, "custom_pipelines")  # loaded in this process: the package serves the task
    model.save_pretrained(tmp_path / "saved")
    assert not hasattr(model.config, "custom_pipelines")
    assert TASK in json.loads((tmp_path / "saved" / "config.json").read_text())["custom_pipelines"]


def test_saved_pipeline_serves_as_remote_code(tiny_hub_folder, tmp_path):
    model = AutoModel.from_pretrained(tiny_hub_folder).eval()  # its own config: the pipeline records itself there
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    pipe = pipeline(TASK, model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_ace_lora.AceLoraZeroShotImageClassificationPipeline"
    assert_self_contained_code(folder)
    expected = as_probabilities(pipe(IMAGES[:2], candidate_labels=LABELS), LABELS)
    torch.testing.assert_close(remote_pipeline_probabilities(folder, tmp_path), expected, rtol=0, atol=1e-5)
