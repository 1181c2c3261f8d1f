"""Publishing: the staged Hub folder, its model card (built from data, round-tripping through huggingface_hub, with
snippets that run as written, claiming only the results of the model published), adapter-only exports."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from transformers import AutoModel, AutoModelForSemanticSegmentation, AutoProcessor

from ace_lora_hf import AceLoraForSegmentation, AceLoraModel
from ace_lora_hf.cli import publish as publish_cli
from ace_lora_hf.publishing import publish
from ace_lora_hf.sources import load as sources_load
from ace_lora_hf.sources.adapters import EXTRAS_WEIGHTS_NAME, PEFT_WEIGHTS_NAME, load_adapters, save_adapters
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.errors import AdapterMismatchError, CheckpointError, ModelSourceError, OutputPathError
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier
from ace_lora_hf.evaluation.published import PUBLISHED_RESULTS
from ace_lora_hf.publishing.model_card import paper_results
from ace_lora_hf.sources.checkpoints import BaseModel, write_trained_weights

from conftest import REPO_ROOT, SAMPLES, AceLoraModelTester, perturb_lora, populate_hub_cache
from test_loading import HUB_REPO_ID, isolated_env, run_python
from test_pipeline import IMAGES, LABELS, REMOTE_PIPELINE_SCRIPT, as_probabilities


def _released_is(folder):
    """`publish` with the released model built from `folder` (the real one is converted from BiomedCLIP on the Hub)."""
    real = publish.model_folder
    return lambda source, *args, **kwargs: str(folder) if source in (None, "released") else real(source, *args,
                                                                                                    **kwargs)


@pytest.fixture(scope="module")
def staged(tiny_hub_folder, tmp_path_factory):
    """The released model's repository, as `ace-lora-publish --model released` stages it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish, "model_folder", _released_is(tiny_hub_folder))
        patch.setattr(sources_load, "released_model_folder", lambda *args, **kwargs: tiny_hub_folder)
        return publish.stage_repository("released", HUB_REPO_ID, tmp_path_factory.mktemp("staging") / "repo")


@pytest.fixture(scope="module")
def fine_tune(tiny_hub_folder, tmp_path_factory):
    """A user's segmentation fine-tune: its light best/ (head weights + base reference) and its test results."""
    run = tmp_path_factory.mktemp("seg_run")
    torch.manual_seed(0)
    head = AceLoraForSegmentation.from_pretrained(tiny_hub_folder, head_hidden_size=16)
    with torch.no_grad():
        head.classifier.bias.fill_(0.25)
    (run / "best").mkdir()
    write_trained_weights(head, run / "best", BaseModel.of(head, tiny_hub_folder), epoch=3)
    results = {"task": "segmentation", "dataset": "SIIM-ACR Pneumothorax", "split": "test", "fraction": 0.01,
               "model": str(tiny_hub_folder), "metrics": {"dice_positive": 0.41234, "dice_pooled": 0.5, "num_images": 9,
                                                          "num_positive_images": 3,
                                                          "num_images_predicted_positive": 4}}
    (run / "test_results.json").write_text(json.dumps(results))
    return run, head


def _card(folder):
    return ModelCard.load(folder / "README.md")


def _identity(result):
    return (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split, result.metric_type,
            result.metric_config, result.metric_value, result.source_name)


def test_staged_repository_is_complete(staged):
    names = {path.name for path in staged.iterdir()}
    assert {
        "config.json", "model.safetensors", "configuration_ace_lora.py", "modeling_ace_lora.py", "loss_ace_lora.py",
        "processing_ace_lora.py", "image_processing_ace_lora.py", "processor_config.json", "tokenizer.json",
        "hf_model_inference.py", "README.md", "handler.py", "requirements.txt",
    } <= names
    assert "adapter_config.json" not in names
    assert set(json.loads((staged / "config.json").read_text())["auto_map"]) == {
        "AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"
    }


def test_staged_repository_serves_the_ace_lora_pipeline_without_the_package(staged, tiny_hub_folder, tmp_path):
    """`pipeline(task, model=REPO, trust_remote_code=True)` from a Hub download, offline, where ace_lora_hf cannot be
    imported: the repository's own pipeline, with the scores of ZeroShotClassifier on a PNG and a DICOM."""
    populate_hub_cache(staged, tmp_path / "hf_home" / "hub", HUB_REPO_ID)
    remote = run_python(REMOTE_PIPELINE_SCRIPT, HUB_REPO_ID, json.dumps(IMAGES[:2]), json.dumps(LABELS),
                        env=isolated_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert remote["module"].startswith("transformers_modules.") and remote["module"].endswith(".pipeline_ace_lora")
    model, processor = AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)
    expected = ZeroShotClassifier(model, processor)(IMAGES[:2], LABELS)
    torch.testing.assert_close(as_probabilities(remote["result"], LABELS), expected, rtol=0, atol=1e-5)


def test_zero_shot_card_shows_an_explanation_and_how_to_try_it(staged):
    card = _card(staged)
    assert "![Explanation of a zero-shot classification" in card.text and "(explanation.png)" in card.text
    assert "`nih_00000001_000.png`" in card.text and "numbered by link weight" in card.text
    with Image.open(staged / "explanation.png") as picture:
        assert picture.format == "PNG" and picture.width >= 1800  # slide-sized, three panels a row
    assert f"ace-lora-app --model {HUB_REPO_ID}" in card.text and "huggingface.co/spaces" not in card.text


def test_card_links_the_demo_space_and_draws_the_image_given(tiny_hub_folder, tmp_path):
    image = tmp_path / "monochrome1.dcm"
    shutil.copy(SAMPLES / "fake_monochrome1.dcm", image)
    staging = publish.stage_repository(tiny_hub_folder, "me/mine", tmp_path / "repo", space="me/ace-lora-demo",
                                       example_image=image)
    card = _card(staging)
    assert "[the demo Space](https://huggingface.co/spaces/me/ace-lora-demo)" in card.text
    assert "`monochrome1.dcm`" in card.text and (staging / "explanation.png").is_file()


@pytest.mark.parametrize(("option", "name", "message"), [
    ("--repo-id", "bad id//x", "not a Hub repository name"), ("--repo-id", "ace-lora", "name its owner too"),
    ("--space", "me/demo space", "not a Hub repository name")])
def test_a_repository_name_the_hub_would_refuse_is_refused_before_loading(option, name, message, tmp_path, capsys):
    names = {"--repo-id": "me/mine", option: name}
    with pytest.raises(SystemExit) as exit_info:
        run_cli(publish_cli.main, ["--model", str(tmp_path / "no_model"), "--staging", str(tmp_path / "repo"),
                               *[item for pair in names.items() for item in pair]])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and f"{option} {name!r}: {message}" in err
    assert not (tmp_path / "repo").exists()


def test_a_missing_example_image_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(publish_cli.main, ["--model", str(tmp_path / "no_model"), "--repo-id", "me/mine", "--staging",
                               str(tmp_path / "repo"), "--example-image", str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and "--example-image" in err and "missing.png: no such file" in err
    assert not (tmp_path / "repo").exists()


def test_released_card_metadata_round_trips_through_huggingface_hub(staged):
    card = _card(staged)
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.base_model == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert "medical" in card.data.tags and card.data.datasets == ["MIMIC-CXR-JPG"]
    loaded = [_identity(result) for result in card.data.eval_results]
    assert loaded == [_identity(result) for result in paper_results()]  # nothing folded or lost, LC25000 twice
    assert [value for *_, value, _ in loaded] == [result.value for result in PUBLISHED_RESULTS]
    assert all(result.source_name.startswith("ACE-LoRA paper") and result.source_url for result in
               card.data.eval_results)
    _, again = model_index_to_eval_results(eval_results_to_model_index("m", card.data.eval_results))
    assert [_identity(result) for result in again] == loaded
    assert "Results reported in the paper" in card.text and "the authors' release" in card.text


def test_model_card_snippet_runs_against_the_hub_cache(staged, tmp_path):
    """The exact snippet users copy, run offline against the staged repository laid out as a Hub download."""
    assert run_card_snippet(staged, tmp_path).startswith("{")


def test_staged_inference_script_classifies_with_its_repository(staged, tmp_path):
    """The repository's hf_model_inference.py, run from a Hub download offline, defaults to that repository."""
    populate_hub_cache(staged, tmp_path / "hf_home" / "hub", HUB_REPO_ID)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(staged / "hf_model_inference.py"), "--images", str(SAMPLES / "nih_00000001_000.png"),
               "--output", str(tmp_path / "out.json")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    classified = json.loads((tmp_path / "out.json").read_text())
    assert HUB_REPO_ID in json.dumps(classified) and "nih_00000001_000.png" in json.dumps(classified)


def run_card_snippet(staged, tmp_path) -> str:
    snippet = _card(staged).text.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'"{HUB_REPO_ID}"' in snippet
    populate_hub_cache(staged, tmp_path / "hf_home" / "hub", HUB_REPO_ID)
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(SAMPLES / "nih_00000001_000.png", workdir / "chest_xray.png")
    (workdir / "snippet.py").write_text(snippet + "\nimport sys\nassert 'ace_lora_hf' not in sys.modules\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "snippet.py"], cwd=workdir, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()[-1]
    if printed.startswith("{"):
        probabilities = eval(printed)  # the zero-shot snippet prints a dict literal
        assert set(probabilities) == {"No Finding", "pneumonia"}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    return printed


def test_own_fine_tune_card_claims_only_its_own_results(fine_tune, tmp_path):
    run, head = fine_tune
    staging = publish.stage_repository(run / "best", "me/ace-lora-siim", tmp_path / "repo",
                                       results=[run / "test_results.json"])
    card = _card(staging)
    assert card.data.pipeline_tag == "image-segmentation" and not card.data.datasets
    assert [(r.metric_config, r.metric_value, r.dataset_split, r.source_name) for r in card.data.eval_results] == [
        ("positive-images", 41.23, "test", None), ("pooled", 50.0, "test", None)]
    assert "1% of the training split" in card.data.eval_results[0].task_name
    for paper_claim in ("46.34", "87.19", "authors' release", "reported in the paper"):
        assert paper_claim not in card.content
    assert "not the paper's released weights" in card.text
    # The staged weights are the fine-tune's: its base with its trained head, loadable as the head it is.
    assert "AutoModelForSemanticSegmentation" in json.loads((staging / "config.json").read_text())["auto_map"]
    staged_head = AutoModelForSemanticSegmentation.from_pretrained(staging)
    assert all(torch.equal(a, b) for a, b in zip(staged_head.state_dict().values(), head.state_dict().values()))
    assert not {"hf_model_inference.py", "explanation.png"} & {path.name for path in staging.iterdir()}
    assert "custom_pipelines" not in json.loads((staging / "config.json").read_text())  # no zero-shot pipeline
    assert "ace-lora-app" not in card.text


def test_fine_tune_card_snippet_runs_against_the_hub_cache(fine_tune, tmp_path):
    run, _ = fine_tune
    staging = publish.stage_repository(run / "best", HUB_REPO_ID, tmp_path / "repo")
    assert run_card_snippet(staging, tmp_path).endswith("of the image predicted as foreground")


def test_a_users_model_without_results_claims_none(tiny_hub_folder, tmp_path):
    card = _card(publish.stage_repository(tiny_hub_folder, "me/mine", tmp_path / "repo"))
    assert card.data.eval_results is None and "No evaluation results were given" in card.text
    assert "87.19" not in card.content and "not the paper's released weights" in card.text


def test_zero_shot_results_keep_both_lc25000_sets(tiny_hub_folder, tmp_path):
    """ace-lora-evaluate reports, one with both LC25000 sets and one with RSNA, give one card entry per metric."""
    both = {"datasets": {"lc25000_lung": {"metrics": {"accuracy": 0.8, "auc": None}},
                         "lc25000_colon": {"metrics": {"accuracy": 0.9, "auc": None}}}}
    rsna = {"datasets": {"rsna": {"metrics": {"accuracy": 0.75, "auc": 0.8123}}}}
    files = [tmp_path / "lc25000.json", tmp_path / "rsna.json"]
    for path, report in zip(files, (both, rsna)):
        path.write_text(json.dumps(report))
    card = _card(publish.stage_repository(tiny_hub_folder, "me/mine", tmp_path / "repo", results=files))
    assert [(r.dataset_type, r.dataset_config, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("lc25000", "lung", "accuracy", 80.0), ("lc25000", "colon", "accuracy", 90.0),
        ("rsna-pneumonia", None, "accuracy", 75.0), ("rsna-pneumonia", None, "roc_auc", 81.23)]


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not a JSON file"),
    ('{"datasets": {"imagenet": {"metrics": {"accuracy": 0.5}}}}', "neither a fine-tune's test_results.json"),
    ('{"dataset": "rsna", "metrics": {"accuracy": 0.5}}', "neither a fine-tune's test_results.json"),
    ('{"datasets": {"rsna": {}}}', "rsna: no 'metrics'"),
    ('{"task": "segmentation", "dataset": "SIIM"}', "no 'metrics'"),
    # what a card would render as markup, a heading or a link, or a value it cannot format
    ('{"task": "segmentation", "dataset": "<img src=x onerror=alert(1)>", "metrics": {"dice": 0.5}}',
     "'dataset' is '<img src=x onerror=alert(1)>'; a name on the card is letters"),
    ('{"task": "segmentation", "dataset": "# Owned", "metrics": {"dice": 0.5}}', "'dataset' is '# Owned'"),
    ('{"task": "detection", "dataset": "RSNA", "split": "[x](javascript:alert(1))", "metrics": {"map": 0.2}}',
     "'split' is '[x](javascript:alert(1))'"),
    ('{"task": "segmentation", "dataset": "SIIM", "fraction": "all", "metrics": {"dice": 0.5}}',
     "'fraction' is 'all'; expected a number in (0, 1]"),
])
def test_results_files_that_are_not_evaluations_are_one_line(content, message, tiny_hub_folder, tmp_path, capsys):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(publish_cli.main, ["--model", str(tiny_hub_folder), "--repo-id", "me/mine", "--staging",
                               str(tmp_path / "repo"), "--results", str(tmp_path / "results.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists()


def test_staging_refuses_a_non_empty_folder(tiny_hub_folder, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="is not empty; pass --overwrite"):
        publish.stage_repository(tiny_hub_folder, HUB_REPO_ID, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_overwriting_a_staging_folder_never_takes_or_loses_the_users_files(tiny_hub_folder, tmp_path):
    staging = tmp_path / "repo"
    publish.stage_repository(tiny_hub_folder, HUB_REPO_ID, staging)
    staged = sorted(path.name for path in staging.iterdir())
    (staging / "notes.txt").write_text("mine")  # the folder is uploaded as a whole: it must not go along, nor go
    with pytest.raises(OutputPathError, match="holds 'notes.txt', which this command does not write there"):
        publish.stage_repository(tiny_hub_folder, HUB_REPO_ID, staging, overwrite=True)
    assert (staging / "notes.txt").read_text() == "mine"
    (staging / "notes.txt").unlink()
    publish.stage_repository(tiny_hub_folder, HUB_REPO_ID, staging, overwrite=True)
    assert sorted(path.name for path in staging.iterdir()) == staged


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


def test_the_readme_peft_snippet_runs_as_written(tiny_hub_folder, tmp_path):
    """The README's PEFT-integration block, verbatim, in a fresh interpreter beside a folder named as it names one."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Adapters and PEFT"):]
    snippet = section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]
    assert "active_adapters()" in snippet and "disable_adapters()" in snippet
    shutil.copytree(tiny_hub_folder, tmp_path / "ace-lora")
    finished = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "['default']"
    assert (tmp_path / "my-adapters" / "adapter_config.json").is_file()


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


@pytest.mark.parametrize("offline", [True, False])
def test_pushing_without_the_hub_is_one_line_and_keeps_the_staged_repository(tmp_path, monkeypatch, offline):
    """Offline (HF_HUB_OFFLINE=1) or with no route to the Hub (a closed local port stands for it)."""
    from huggingface_hub import constants

    staging = tmp_path / "repo"
    staging.mkdir()
    (staging / "README.md").write_text("card")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelSourceError, match=rf"--push: the Hub cannot be reached .*staged in {staging}: upload it "
                                               rf"later with hf upload me/mine {staging}"):
        publish.upload(staging, "me/mine", private=True)
    assert (staging / "README.md").read_text() == "card"
