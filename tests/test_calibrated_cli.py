"""ace-lora-evaluate --calibrate-on writes a calibration file that ace-lora-classify --calibration and the pipeline's
calibration= apply with the same numbers as the file applied by hand to the model's zero-shot logits."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

from ace_lora_hf.cli import classify, evaluate
from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.evaluation.operating_points import decision_metrics
from ace_lora_hf.models.ace_lora.calibration import Calibration
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier

from conftest import SAMPLES
from test_training import write_csv


LABELS = ["No Finding", "pneumonia"]
SUBGROUPS = {"sex": ["F", "M"], "view": ["PA", "AP", "PA"]}


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory):
    """24 noise images (brighter ones labelled 1), a test table with subgroup columns and a validation table."""
    root = tmp_path_factory.mktemp("calibration_data")
    generator = np.random.default_rng(0)
    rows = []
    for index in range(24):
        target = index % 2
        pixels = generator.integers(0, 160, (40, 40)) + 60 * target * generator.random()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"x{index}.png")
        rows.append({"Path": f"x{index}.png", "Target": str(target), "split": "test" if index < 12 else "val",
                     **{column: values[index // 2 % len(values)] for column, values in SUBGROUPS.items()}})
    write_csv(root / "rsna_classification.csv", rows[:12])
    write_csv(root / "val.csv", [{"Path": row["Path"], "Target": row["Target"]} for row in rows[12:]])
    return root


@pytest.fixture(scope="module")
def fitted(labelled_images, tiny_hub_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration_out")
    status = evaluate.main(["--dataset", "rsna", "--data-root", str(labelled_images), "--model", str(tiny_hub_folder),
                            "--calibrate-on", str(labelled_images / "val.csv"), "--target-sensitivity", "0.8",
                            "--subgroup-columns", "sex,view", "--calibration-output", str(out / "calibration.json"),
                            "--output", str(out / "report.json"), "--bootstrap", "20", "--batch-size", "5"])
    assert status == 0
    return out


def model_logits(tiny_hub_folder, images: list[str]) -> torch.Tensor:
    model, processor = AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)
    batches = list(ZeroShotClassifier(model, processor, CHEST_XRAY_TEMPLATES, num_workers=0).classify(images, LABELS))
    return torch.cat([batch.logits for batch in batches])


def test_evaluate_reports_calibration_thresholds_and_subgroups(fitted, labelled_images, tiny_hub_folder):
    report = json.loads((fitted / "report.json").read_text())["datasets"]["rsna"]
    calibration = Calibration.load(fitted / "calibration.json")
    assert calibration.labels == tuple(LABELS) and calibration.templates == CHEST_XRAY_TEMPLATES
    assert calibration.target == {"metric": "sensitivity", "value": 0.8}
    assert list(calibration.thresholds) == ["pneumonia"]
    assert report["calibrated"]["temperature"] == calibration.temperature
    validation = report["calibrated"]["validation"]
    assert validation["after"]["nll"] <= validation["before"]["nll"]
    assert set(report["calibration"]["metrics"]) == {"ece", "brier", "nll"}
    assert set(report["subgroups"]) == {"sex", "view"} and set(report["calibrated"]["subgroups"]["view"]["groups"]) \
        == {"AP", "PA"}
    assert "pneumonia sensitivity" in report["calibrated"]["test"]["confidence_intervals_95"]
    assert all((fitted / f"report_rsna_{name}.png").stat().st_size > 0 for name in ("reliability", "roc", "pr"))
    # The threshold meets the target on the validation table, recomputed from the model's own logits.
    images = [str(labelled_images / f"x{index}.png") for index in range(12, 24)]
    probabilities = calibration.apply(model_logits(tiny_hub_folder, images))
    targets = np.array([index % 2 for index in range(12, 24)])
    achieved = decision_metrics(probabilities[:, 1].numpy(), targets == 1, calibration.thresholds["pneumonia"])
    assert achieved["sensitivity"] >= 0.8


def test_classify_and_the_pipeline_apply_the_file_as_by_hand(fitted, labelled_images, tiny_hub_folder, tmp_path):
    images = [str(labelled_images / f"x{index}.png") for index in range(6)]
    calibration = Calibration.load(fitted / "calibration.json")
    expected = calibration.apply(model_logits(tiny_hub_folder, images))
    decided = calibration.decide(expected)["pneumonia"].tolist()
    output = tmp_path / "results.csv"
    assert classify.main(["--images", *images, "--model", str(tiny_hub_folder), "--calibration",
                          str(fitted / "calibration.json"), "--output", str(output), "--quiet"]) == 0
    rows = list(csv.DictReader(output.open()))
    got = torch.tensor([[float(row[label]) for label in LABELS] for row in rows])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert [row["decision"] == "pneumonia" for row in rows] == decided
    assert all(row["decision"] in ("", "pneumonia") for row in rows)

    pipe = pipeline("zero-shot-image-classification", model=str(tiny_hub_folder))
    for image, row, decision in zip(images, expected, decided):
        result = {entry["label"]: entry for entry in pipe(image, candidate_labels=LABELS,
                                                         calibration=fitted / "calibration.json")}
        torch.testing.assert_close(torch.tensor([result[label]["score"] for label in LABELS]), row, rtol=0, atol=1e-5)
        assert result["pneumonia"]["decision"] == decision and "decision" not in result["No Finding"]
    raw = pipe(images[0], candidate_labels=LABELS)
    assert all(set(entry) == {"score", "label"} for entry in raw)
    # A calibration given when the pipeline is built is checked against each call's labels too: in another order
    # the thresholds would land on the wrong label.
    built = pipeline("zero-shot-image-classification", model=str(tiny_hub_folder),
                     calibration=fitted / "calibration.json")
    assert {entry["label"] for entry in built(images[0], candidate_labels=LABELS)} == set(LABELS)
    with pytest.raises(InvalidArgumentError, match="the calibration file was fitted for labels"):
        built(images[0], candidate_labels=LABELS[::-1])


def exit_of(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(argument) for argument in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return exit_info.value.code, err


def test_classify_refuses_a_calibration_for_other_labels(fitted, tiny_hub_folder, capsys):
    code, err = exit_of(classify.main, ["--images", "x.png", "--labels", "normal", "pneumonia", "--model",
                                        tiny_hub_folder, "--calibration", fitted / "calibration.json"], capsys)
    assert code == 2 and "fitted for labels ['No Finding', 'pneumonia'], not ['normal', 'pneumonia']" in err


@pytest.mark.parametrize("extra, message", [
    (["--subgroup-columns", "sex,ward"], "missing column(s) 'ward'; found ['Path', 'Target', 'split', 'sex', 'view']"),
    (["--calibrate-on", "{root}/one_class.csv"], "one_class.csv: every row is 'pneumonia'; calibration needs"),
    (["--calibrate-on", "{root}/val.csv", "--calibration-output", "{model}/calibration.json"],
     "is inside the --model folder"),
    (["--calibrate-on", "{root}/rsna_classification.csv"], "is the test table"),
])
def test_evaluate_refuses_bad_calibration_inputs_before_loading(extra, message, labelled_images, tiny_hub_folder,
                                                                 capsys, monkeypatch):
    from ace_lora_hf.sources import load as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded the model before checking the inputs"))
    write_csv(labelled_images / "one_class.csv",
                [{"Path": "x13.png", "Target": "1"}, {"Path": "x15.png", "Target": "1"}])
    extra = [value.format(root=labelled_images, model=tiny_hub_folder) for value in extra]
    code, err = exit_of(evaluate.main, ["--dataset", "rsna", "--data-root", labelled_images, "--model", tiny_hub_folder,
                                        *extra], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("value", ["0", "1", "1.5", "nan"])
def test_evaluate_refuses_a_target_outside_zero_one(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--dataset", "rsna", "--data-root", ".", "--calibrate-on", "v.csv",
                             "--target-sensitivity", value])
    assert exit_info.value.code == 2 and "give a value strictly between 0 and 1" in capsys.readouterr().err


def test_a_published_repo_carries_the_calibration_and_its_card_the_subgroups(fitted, tiny_hub_folder, tmp_path):
    from ace_lora_hf.publishing import publish

    repo = publish.stage_repository(tiny_hub_folder, "me/mine", tmp_path / "repo", results=[fitted / "report.json"],
                                    calibration=fitted / "calibration.json")
    assert Calibration.load(repo / "calibration.json") == Calibration.load(fitted / "calibration.json")
    card = (repo / "README.md").read_text()
    report = json.loads((fitted / "report.json").read_text())["datasets"]["rsna"]["subgroups"]
    group = report["view"]["groups"]["PA"]
    low, high = (100 * bound for bound in group["confidence_intervals_95"]["accuracy"])
    assert (f"| RSNA Pneumonia, view PA (n = {group['num_images']}) | zero-shot-image-classification | accuracy (%) | "
            f"{100 * group['metrics']['accuracy']:.2f} [{low:.2f}, {high:.2f}] |") in card
    gap = report["sex"]["largest_gap"]["accuracy"]
    assert f"RSNA Pneumonia, largest gap across sex ({gap['highest']} vs {gap['lowest']})" in card
    assert "## Calibration" in card and "for a target sensitivity of 0.8" in card
    assert "**Not a medical device**" in card and "Zero-shot scores are not diagnoses" in card


def test_a_subgroup_value_the_card_would_render_as_markup_is_refused(fitted, tiny_hub_folder, tmp_path):
    from ace_lora_hf.errors import DataFormatError
    from ace_lora_hf.publishing import publish

    report = json.loads((fitted / "report.json").read_text())
    groups = report["datasets"]["rsna"]["subgroups"]["sex"]["groups"]
    groups["[x](javascript:alert(1))"] = groups.pop("F")
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(DataFormatError, match=r"'value of sex' is '\[x\]\(javascript:alert\(1\)\)'"):
        publish.stage_repository(tiny_hub_folder, "me/mine", tmp_path / "repo", results=[tmp_path / "report.json"])


def test_the_app_serves_calibrated_scores_and_decisions(fitted, tiny_hub_folder):
    pytest.importorskip("gradio", reason="needs the [app] extra (gradio)")
    from ace_lora_hf.cli import app
    from ace_lora_hf.inference import demo

    calibration = Calibration.load(fitted / "calibration.json")
    model, processor, _ = app.load_demo_model(app.parse_args(["--model", str(tiny_hub_folder), "--device", "cpu"]))
    page = demo.ZeroShotDemo(model, processor, calibration)
    image = str(SAMPLES / "nih_00000001_000.png")
    expected = calibration.apply(model_logits(tiny_hub_folder, [image]))
    decided = calibration.decide(expected)["pneumonia"][0]
    message, bars, _, _ = page.classify(image, "\n".join(LABELS), "\n".join(CHEST_XRAY_TEMPLATES))
    assert bars == pytest.approx(dict(zip(LABELS, expected[0].tolist())), abs=1e-5)
    assert f"Calibrated scores (temperature {calibration.temperature:.3f})" in message
    assert f"pneumonia: **{'yes' if decided else 'no'}**" in message
    message, bars, _, _ = page.classify(image, "normal\npneumonia", "\n".join(CHEST_XRAY_TEMPLATES))
    assert "fitted for other labels or templates: these scores are uncalibrated" in message
    assert sum(bars.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["results.csv", "results.jsonl"])
def test_decisions_survive_an_interrupted_run(tmp_path, name):
    from ace_lora_hf.errors import OutputPathError
    from ace_lora_hf.outputs.result_files import ResultsFile

    records = [{"image": f"{index}.png", "probabilities": {"No Finding": 0.4, "pneumonia": 0.6},
                "prediction": "pneumonia", "decision": decision} for index, decision in enumerate([["pneumonia"], []])]
    provenance = {"model": "sha256:aaaa", "calibration": "sha256:cccc"}
    results = ResultsFile(tmp_path / name, LABELS, provenance=provenance, with_decision=True)
    results.write(records)
    results._file.close()
    resumed = ResultsFile(tmp_path / name, LABELS, resume=True, provenance=provenance, with_decision=True)
    assert resumed.records == records
    with pytest.raises(OutputPathError, match="calibration"):  # raw and calibrated scores never share a file
        ResultsFile(tmp_path / name, LABELS, resume=True, provenance={"model": "sha256:aaaa"}, with_decision=True)


def test_a_label_missing_from_the_validation_table_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from ace_lora_hf.sources import load as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded the model before checking the inputs"))
    write_csv(tmp_path / "test.csv", [{"Path": "t1.png", "label": "lung_scc"}, {"Path": "t2.png", "label": "lung_n"}])
    write_csv(tmp_path / "val.csv", [{"Path": "v1.png", "label": "lung_aca"}, {"Path": "v2.png", "label": "lung_n"}])
    code, err = exit_of(evaluate.main, ["--dataset", "lc25000_lung", "--data-root", tmp_path, "--table",
                                        tmp_path / "test.csv", "--calibrate-on", tmp_path / "val.csv",
                                        "--target-sensitivity", "0.9"], capsys)
    assert code == 2 and "val.csv: label 'lung squamous cell carcinoma' is absent in every row" in err
