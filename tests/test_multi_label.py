"""Per-finding (multi-label) zero-shot: each finding's positive prompts against its negative ones, a two-way softmax
per finding, the same numbers from the classifier, the pipeline and `ace-lora-classify --multi-label`."""

import csv
import json

import pytest
import torch
from transformers import AutoModel, AutoProcessor, pipeline

from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.inference.dicom_ids import DICOM_ID_FIELDS
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier, negated_templates

from conftest import SAMPLES


IMAGES = [str(SAMPLES / "nih_00000001_000.png"), str(SAMPLES / "fake_monochrome1.dcm"),
          str(SAMPLES / "nih_00027426_000.png")]
FINDINGS = ["pneumonia", "edema", "cardiomegaly"]
NEGATIVE = ["a chest x-ray image with no {}.", "no findings suggesting {}."]


@pytest.fixture(scope="module")
def model_and_processor(tiny_hub_folder):
    return AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)


def class_embeddings(model, processor, labels: list[str], templates) -> torch.Tensor:
    prompts = [template.format(label) for label in labels for template in templates]
    tokens = processor(text=prompts, return_tensors="pt")["input_ids"].view(len(labels), len(templates), -1)
    with torch.no_grad():
        return model.get_class_embeddings(tokens).pooler_output


def hand_computed(model, processor, findings, templates, negative_templates) -> torch.Tensor:
    """exp(s x.p) / (exp(s x.p) + exp(s x.n)) per finding, from the model's own embeddings."""
    positive = class_embeddings(model, processor, findings, templates)
    negative = class_embeddings(model, processor, findings, negative_templates)
    pixels = processor(images=[load_image(path) for path in IMAGES], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixels).pooler_output
    scale = model.logit_scale.item()
    yes, no = (torch.exp(scale * image @ side.t()) for side in (positive, negative))
    return yes / (yes + no)


def test_default_negatives_put_no_before_the_finding():
    assert negated_templates(CHEST_XRAY_TEMPLATES) == ("a chest X-ray image of no {}.", "Findings suggesting no {}.")


def test_per_finding_probabilities_equal_a_hand_computation(model_and_processor):
    model, processor = model_and_processor
    classifier = ZeroShotClassifier(model, processor, batch_size=2)
    probabilities = classifier(IMAGES, FINDINGS, multi_label=True)
    expected = hand_computed(model, processor, FINDINGS, CHEST_XRAY_TEMPLATES, negated_templates(CHEST_XRAY_TEMPLATES))
    assert probabilities.shape == (3, 3)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(probabilities.sum(-1), torch.ones(3))  # independent findings, not a softmax over them
    # One finding is a question of its own; the rows do not depend on which other findings are asked.
    torch.testing.assert_close(classifier(IMAGES, ["edema"], multi_label=True), probabilities[:, 1:2], rtol=0,
                               atol=1e-6)


def test_user_negative_templates(model_and_processor):
    model, processor = model_and_processor
    classifier = ZeroShotClassifier(model, processor, negative_templates=NEGATIVE)
    expected = hand_computed(model, processor, FINDINGS, CHEST_XRAY_TEMPLATES, NEGATIVE)
    torch.testing.assert_close(classifier(IMAGES, FINDINGS, multi_label=True), expected, rtol=0, atol=1e-6)


def test_single_label_is_unchanged_beside_per_finding(model_and_processor):
    model, processor = model_and_processor
    labels = ["No Finding", "pneumonia"]
    classifier = ZeroShotClassifier(model, processor)
    before = classifier(IMAGES, labels)
    classifier(IMAGES, labels, multi_label=True)
    pixels = processor(images=[load_image(path) for path in IMAGES], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model.logit_scale * model.get_image_features(pixels).pooler_output @ class_embeddings(
            model, processor, labels, CHEST_XRAY_TEMPLATES).t()
    torch.testing.assert_close(before, logits.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(classifier(IMAGES, labels), before, rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "labels", "message"), [
    ({"negative_templates": ["no pneumonia"]}, FINDINGS, r"template 'no pneumonia': needs exactly one '\{\}'"),
    ({"negative_templates": []}, FINDINGS, "give a non-empty list of templates"),
    ({}, [], "give a list of one or more findings"),
    ({}, "pneumonia", "give a list of one or more findings"),
    ({}, ["edema", "edema"], "a finding is repeated"),
    ({}, ["edema", " "], "every finding must be a non-empty string"),
])
def test_bad_findings_and_prompt_pairs_are_refused(model_and_processor, kwargs, labels, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ZeroShotClassifier(*model_and_processor, **kwargs)(IMAGES[0], labels, multi_label=True)


# ------------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture
def pipe(model_and_processor):
    model, processor = model_and_processor
    return pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                    image_processor=processor.image_processor)


def as_tensor(results: list[list[dict]], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[{r["label"]: r["score"] for r in result}[label] for label in labels] for result in results])


@pytest.mark.parametrize("negative_templates", [None, NEGATIVE])
def test_the_pipeline_gives_the_classifiers_scores(pipe, model_and_processor, negative_templates):
    expected = ZeroShotClassifier(*model_and_processor, negative_templates=negative_templates)(
        IMAGES, FINDINGS, multi_label=True)
    extra = {} if negative_templates is None else {"negative_templates": negative_templates}
    results = pipe(IMAGES, candidate_labels=FINDINGS, multi_label=True, **extra)
    torch.testing.assert_close(as_tensor(results, FINDINGS), expected, rtol=0, atol=1e-5)
    assert all([r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
               for result in results)
    single = pipe(IMAGES, candidate_labels=FINDINGS)  # without multi_label: the softmax over the labels, as before
    torch.testing.assert_close(as_tensor(single, FINDINGS), ZeroShotClassifier(*model_and_processor)(IMAGES, FINDINGS),
                               rtol=0, atol=1e-6)


def test_the_pipeline_refuses_negative_templates_without_multi_label(pipe):
    with pytest.raises(InvalidArgumentError, match="pass multi_label=True too"):
        pipe(IMAGES[0], candidate_labels=FINDINGS, negative_templates=NEGATIVE)


# ------------------------------------------------------------------------------------------- ace-lora-classify


def test_classify_multi_label_writes_a_column_per_finding(tiny_hub_folder, model_and_processor, tmp_path, capsys):
    from ace_lora_hf.cli.classify import main

    expected = ZeroShotClassifier(*model_and_processor, negative_templates=NEGATIVE)(IMAGES, FINDINGS, multi_label=True)
    output = tmp_path / "findings.csv"
    assert main(["--model", str(tiny_hub_folder), "--images", *IMAGES, "--labels", *FINDINGS, "--multi-label",
                 "--negative-template", *NEGATIVE, "--output", str(output)]) == 0
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["image", *FINDINGS, "prediction", "error", *DICOM_ID_FIELDS]  # a DICOM is among them
    written = torch.tensor([[float(row[finding]) for finding in FINDINGS] for row in rows])
    torch.testing.assert_close(written, expected, rtol=0, atol=1e-5)  # the CSV keeps 6 decimals
    for row, probabilities in zip(rows, expected.tolist()):
        assert row["prediction"] == "; ".join(f for f, p in zip(FINDINGS, probabilities) if p > 0.5)
    meta = json.loads((tmp_path / "findings.csv.meta.json").read_text())
    assert meta["multi_label"] is True and meta["negative_templates"] == NEGATIVE
    capsys.readouterr()
    json_output = tmp_path / "findings.json"
    main(["--model", str(tiny_hub_folder), "--images", *IMAGES, "--labels", "edema", "--multi-label", "--output",
          str(json_output), "--quiet"])
    summary = json.loads(json_output.read_text())
    assert summary["negative_templates"] == list(negated_templates(CHEST_XRAY_TEMPLATES))
    single = ZeroShotClassifier(*model_and_processor)(IMAGES, ["edema"], multi_label=True)
    torch.testing.assert_close(torch.tensor([[r["probabilities"]["edema"]] for r in summary["results"]]), single,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(("argv", "message"), [
    (["--negative-templates", "no {}."], "--negative-templates scores findings one by one: pass --multi-label too"),
    (["--multi-label", "--explain", "pictures"], "--multi-label: --explain is for single-label classification"),
    (["--multi-label", "--negative-templates", "no pneumonia"], "template 'no pneumonia': needs exactly one"),
])
def test_classify_refuses_inconsistent_per_finding_options(tiny_hub_folder, tmp_path, capsys, argv, message):
    from ace_lora_hf.cli.classify import main
    from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--model", str(tiny_hub_folder), "--images", IMAGES[0], *argv])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- ace-lora-evaluate

TABLE_ROWS = {  # image -> (pneumonia, edema, cardiomegaly): each finding has both outcomes
    "nih_00000001_000.png": (1, 0, 1), "fake_monochrome1.dcm": (0, 1, 0), "nih_00027426_000.png": (1, 1, 0),
    "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm": (0, 0, 1),
}


@pytest.fixture
def findings_table(tmp_path):
    table = tmp_path / "labels.csv"
    rows = ["Path," + ",".join(FINDINGS)] + [f"{image},{','.join(map(str, row))}" for image, row in TABLE_ROWS.items()]
    table.write_text("\n".join(rows) + "\n")
    return table


@pytest.mark.parametrize("negative_templates", [None, NEGATIVE])
def test_a_table_of_findings_gets_per_finding_aucs_with_intervals(findings_table, tiny_hub_folder,
                                                                   model_and_processor, tmp_path, capsys,
                                                                   negative_templates):
    from sklearn.metrics import roc_auc_score

    from ace_lora_hf.cli.evaluate import main

    output = tmp_path / "report.json"
    negatives = ["--negative-templates", *negative_templates] if negative_templates else []
    assert main(["--findings", *FINDINGS, "--table", str(findings_table), "--data-root", str(SAMPLES),
                 "--model", str(tiny_hub_folder), "--bootstrap", "40", "--output", str(output), *negatives]) == 0
    result = json.loads(output.read_text())["datasets"]["findings"]
    assert result["per_finding"] is True and result["classes"] == FINDINGS
    assert result["negative_templates"] == list(negative_templates or negated_templates(CHEST_XRAY_TEMPLATES))
    images = [str(SAMPLES / image) for image in TABLE_ROWS]
    assert [entry["image"] for entry in result["images"]] == images
    probabilities = torch.tensor([entry["probabilities"] for entry in result["images"]])
    expected = ZeroShotClassifier(*model_and_processor, negative_templates=negative_templates)(
        images, FINDINGS, multi_label=True)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)
    truth = list(TABLE_ROWS.values())
    sklearn_aucs = [roc_auc_score([row[f] for row in truth], probabilities[:, f].numpy()) for f in range(3)]
    assert result["metrics"]["auc_per_class"] == pytest.approx(sklearn_aucs, abs=1e-12)
    assert result["metrics"]["auc"] == pytest.approx(sum(sklearn_aucs) / 3, abs=1e-12)
    intervals = result["confidence_intervals_95"]["auc_per_class"]
    assert len(intervals) == 3 and all(0 <= low <= high <= 1 for low, high in intervals)
    out = capsys.readouterr().out
    assert "AUC per finding" in out and all(finding in out for finding in FINDINGS)


def test_bootstrap_intervals_of_a_list_metric_are_those_of_each_element():
    import numpy as np

    from ace_lora_hf.evaluation.bootstrap import bootstrap_intervals
    from ace_lora_hf.evaluation.metrics import multilabel_metrics

    generator = np.random.default_rng(0)
    targets = generator.integers(0, 2, (60, 2))
    scores = np.clip(targets * 0.4 + generator.random((60, 2)) * 0.6, 0, 1)
    both = bootstrap_intervals(multilabel_metrics, scores, targets, resamples=50, seed=3)
    for column in range(2):
        alone = bootstrap_intervals(lambda p, r: {"auc": multilabel_metrics(p, r)["auc_per_class"][column]},
                                    scores, targets, resamples=50, seed=3)
        assert both["auc_per_class"][column] == alone["auc"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--dataset", "rsna", "--data-root", ".", "--multi-label"], "--multi-label: rsna is single-label"),
    (["--findings", "edema", "--data-root", "."], "--findings: give the table of your own as one --table"),
    (["--findings", "edema", "--dataset", "rsna", "--data-root", "."], "not allowed with argument"),
    (["--findings", "edema", "effusion", "--table", "TABLE", "--data-root", str(SAMPLES)], "effusion"),
    (["--dataset", "chestxray14", "--data-root", ".", "--negative-templates", "no {}."], "pass --multi-label"),
    (["--findings", "edema", "--table", "TABLE", "--data-root", ".", "--negative-templates", "no"],
     "needs exactly one '{}'"),
])
def test_evaluate_refuses_bad_per_finding_options_in_one_line(findings_table, tiny_hub_folder, capsys, argv,
                                                              message):
    from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
    from ace_lora_hf.cli.evaluate import main

    argv = [str(findings_table) if arg == "TABLE" else arg for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*argv, "--model", str(tiny_hub_folder)])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and message in err and "Traceback" not in err


def test_options_given_to_the_pipeline_at_construction_apply_to_every_call(model_and_processor):
    model, processor = model_and_processor
    pipe = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                    image_processor=processor.image_processor, multi_label=True)
    expected = ZeroShotClassifier(model, processor, negative_templates=NEGATIVE)(IMAGES, FINDINGS, multi_label=True)
    results = pipe(IMAGES, candidate_labels=FINDINGS, negative_templates=NEGATIVE)
    torch.testing.assert_close(as_tensor(results, FINDINGS), expected, rtol=0, atol=1e-5)
