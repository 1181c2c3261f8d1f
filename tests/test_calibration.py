"""Calibration, operating points and subgroups on small labelled tables made here, against hand computations."""

import json

import numpy as np
import pytest
import torch

from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.evaluation.calibrated_evaluation import calibrated, calibrated_evaluation, fit_calibration
from ace_lora_hf.evaluation.calibration import calibration_metrics, expected_calibration_error, fit_temperature
from ace_lora_hf.evaluation.metrics import classification_metrics
from ace_lora_hf.evaluation.operating_points import decision_metrics, operating_threshold
from ace_lora_hf.evaluation.subgroups import subgroup_metrics
from ace_lora_hf.models.ace_lora.calibration import Calibration


# Six images, two classes: the probability of class 1 and the true class.
POSITIVE = np.array([0.95, 0.80, 0.62, 0.40, 0.30, 0.05])
TARGETS = np.array([1, 1, 0, 1, 0, 0])
PROBABILITIES = np.stack([1 - POSITIVE, POSITIVE], axis=1)


def test_ece_and_brier_equal_a_hand_computation():
    # Top-class confidences 0.95, 0.80, 0.62, 0.60, 0.70, 0.95; correct: yes, yes, no, no, yes, yes.
    # 15 bins of width 1/15, bin i = (i/15, (i+1)/15]: 0.95 -> bin 14 (two images, both right), 0.80 -> bin 11,
    # 0.70 -> bin 10, 0.62 -> bin 9, 0.60 -> bin 8.
    bins = {"0.95": (2, 1.0, 0.95), "0.80": (1, 1.0, 0.80), "0.60": (1, 0.0, 0.60), "0.62": (1, 0.0, 0.62),
            "0.70": (1, 1.0, 0.70)}
    expected_ece = sum(count / 6 * abs(accuracy - confidence) for count, accuracy, confidence in bins.values())
    squared = [(p - y) ** 2 * 2 for p, y in zip(POSITIVE, TARGETS)]  # two classes: both components differ by as much
    metrics = calibration_metrics(PROBABILITIES, TARGETS)
    assert metrics["ece"] == pytest.approx(expected_ece, abs=1e-12)
    assert metrics["brier"] == pytest.approx(np.mean(squared), abs=1e-12)
    true_class = [p if y else 1 - p for p, y in zip(POSITIVE, TARGETS)]
    assert metrics["nll"] == pytest.approx(-np.mean(np.log(true_class)), abs=1e-12)


def test_ece_bins_share_a_confidence_bin_when_they_should():
    # 0.61 and 0.62 share the bin (0.6, 0.6667]: its accuracy 0.5 against its mean confidence 0.615.
    assert expected_calibration_error([0.61, 0.62], [1, 0]) == pytest.approx(abs(0.5 - 0.615))
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == pytest.approx(0.0)


def test_multilabel_calibration_is_the_mean_over_findings():
    probabilities = np.array([[0.9, 0.2], [0.3, 0.7], [0.6, 0.1]])
    targets = np.array([[1, 0], [0, 1], [0, 0]])
    per_finding = [expected_calibration_error(probabilities[:, c], targets[:, c]) for c in range(2)]
    metrics = calibration_metrics(probabilities, targets)
    assert metrics["ece"] == pytest.approx(np.mean(per_finding))
    assert metrics["brier"] == pytest.approx(((probabilities - targets) ** 2).mean())


def overconfident_logits(seed: int = 0, count: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Three classes whose logits are 6x too sharp for the true 70% accuracy."""
    generator = np.random.default_rng(seed)
    targets = generator.integers(0, 3, count)
    logits = generator.normal(size=(count, 3))
    logits[np.arange(count), targets] += 1.5
    return (6 * logits).astype(np.float32), targets


def test_temperature_scaling_lowers_the_validation_nll():
    logits, targets = overconfident_logits()
    temperature = fit_temperature(logits, targets)
    assert temperature > 1
    nll = lambda t: float(torch.nn.functional.cross_entropy(torch.from_numpy(logits).double() / t,
                                                            torch.from_numpy(targets)))
    assert nll(temperature) < nll(1.0)
    # A minimum: nearby temperatures do no better.
    assert nll(temperature) <= min(nll(temperature * 0.95), nll(temperature * 1.05))
    calibration = Calibration(("a", "b", "c"), ("{}",), temperature)
    before = calibration_metrics(torch.from_numpy(logits).softmax(-1).numpy(), targets)
    after = calibration_metrics(calibrated(calibration, logits), targets)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]


@pytest.mark.parametrize("metric, target", [("sensitivity", 0.95), ("sensitivity", 0.5), ("specificity", 0.9),
                                            ("specificity", 0.6)])
def test_operating_threshold_meets_its_target_on_the_validation_table(metric, target):
    generator = np.random.default_rng(1)
    positives = generator.integers(0, 2, 300).astype(bool)
    scores = np.clip(generator.normal(0.4 + 0.2 * positives, 0.15), 0, 1)
    threshold = operating_threshold(scores, positives, metric, target)
    achieved = decision_metrics(scores, positives, threshold)
    assert achieved[metric] >= target
    # The best such threshold: the next candidate in the favoured direction misses the target.
    candidates = np.unique(scores)
    other = (candidates[candidates > threshold].min() if metric == "sensitivity"
             else candidates[candidates < threshold].max())
    assert decision_metrics(scores, positives, other)[metric] < target


def test_decision_metrics_equal_a_hand_count():
    # At 0.5: decided 0.95, 0.80, 0.62 -> TP 2, FP 1; not decided 0.40 (FN), 0.30, 0.05 (TN 2).
    assert decision_metrics(POSITIVE, TARGETS, 0.5) == {"sensitivity": 2 / 3, "specificity": 2 / 3, "ppv": 2 / 3,
                                                        "npv": 2 / 3}
    assert decision_metrics(POSITIVE, TARGETS, 0.3)["sensitivity"] == 1.0


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_a_target_outside_zero_one_is_refused(value):
    with pytest.raises(InvalidArgumentError, match=f"--target-sensitivity {value}: give a value strictly between"):
        operating_threshold(POSITIVE, TARGETS, "sensitivity", value)


def test_subgroup_metrics_equal_the_metrics_of_each_subset_alone():
    generator = np.random.default_rng(2)
    targets = generator.integers(0, 2, 60)
    positive = np.clip(generator.normal(0.35 + 0.3 * targets, 0.2), 0.01, 0.99)
    probabilities = np.stack([1 - positive, positive], axis=1)
    sex = list(generator.choice(["F", "M"], 60))
    sex[0] = ""  # no group
    metric = lambda p, r: {**classification_metrics(p, r), **calibration_metrics(p, r)}
    report = subgroup_metrics(metric, probabilities, targets, {"sex": sex}, resamples=50, seed=0)["sex"]
    assert set(report["groups"]) == {"F", "M"}
    for value, group in report["groups"].items():
        chosen = np.asarray(sex) == value
        assert group["num_images"] == chosen.sum()
        assert group["metrics"] == metric(probabilities[chosen], targets[chosen])
    gap = report["largest_gap"]["auc"]
    aucs = {value: group["metrics"]["auc"] for value, group in report["groups"].items()}
    assert gap["gap"] == pytest.approx(max(aucs.values()) - min(aucs.values()))
    assert aucs[gap["highest"]] == max(aucs.values())


def test_fitted_calibration_round_trips_and_reports(tmp_path):
    logits, targets = overconfident_logits()
    labels = ["a", "b", "c"]
    calibration = fit_calibration(logits[:100], targets[:100], labels, ["x {}."], ("sensitivity", 0.9),
                                  {"table": "val.csv"}, "val.csv")
    assert set(calibration.thresholds) == set(labels)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration.to_dict()))
    assert Calibration.load(path) == calibration
    report = calibrated_evaluation(calibration, (logits[:100], targets[:100]), (logits[100:], targets[100:]),
                                   {"view": ["PA", "AP"] * 50}, resamples=20, seed=0)
    assert report["validation"]["after"]["nll"] < report["validation"]["before"]["nll"]
    assert report["test"]["after"]["a sensitivity"] == decision_metrics(
        calibrated(calibration, logits[100:])[:, 0], targets[100:] == 0, calibration.thresholds["a"])["sensitivity"]
    assert set(report["subgroups"]["view"]["groups"]) == {"AP", "PA"}


def test_a_validation_table_with_one_class_is_refused():
    logits, _ = overconfident_logits(count=10)
    with pytest.raises(InvalidArgumentError, match="--calibrate-on val.csv: every row is 'b'; calibration needs"):
        fit_calibration(logits, np.ones(10, dtype=int), ["a", "b", "c"], ["{}"], None, {}, "val.csv")


def test_a_label_without_both_outcomes_gets_no_threshold():
    logits, targets = overconfident_logits(count=30)
    targets[targets == 2] = 0
    with pytest.raises(InvalidArgumentError, match="val.csv: label 'c' is absent in every row"):
        fit_calibration(logits, targets, ["a", "b", "c"], ["{}"], ("specificity", 0.9), {}, "val.csv")


def test_calibration_file_for_other_labels_or_templates_is_refused():
    calibration = Calibration(("No Finding", "pneumonia"), ("a {}.",), 1.5, {"pneumonia": 0.3})
    calibration.check(["No Finding", "pneumonia"], ["a {}."])
    with pytest.raises(InvalidArgumentError, match=r"fitted for labels \['No Finding', 'pneumonia'\], not "
                                                   r"\['normal', 'pneumonia'\]; pass those labels"):
        calibration.check(["normal", "pneumonia"], ["a {}."])
    with pytest.raises(InvalidArgumentError, match="fitted for templates"):
        calibration.check(["No Finding", "pneumonia"], ["b {}."])


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not an ace-lora-calibration file"),
    ({"version": 9}, "version 9; this code reads version 1"),
    ({"temperature": -1}, "'temperature' is -1; it must be a positive number"),
    ({"thresholds": {"cat": 0.5}}, "'thresholds' must map labels"),
    ({"labels": "pneumonia"}, "'labels' must be a non-empty list of strings"),
])
def test_a_broken_calibration_file_is_refused_in_one_line(tmp_path, change, message):
    data = {**Calibration(("No Finding", "pneumonia"), ("a {}.",), 1.5).to_dict(), **change}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidArgumentError, match=f"calibration file {path}: {message}"):
        Calibration.load(path)


def test_apply_and_decide():
    calibration = Calibration(("n", "p"), ("{}",), 2.0, {"p": 0.6})
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    probabilities = calibration.apply(logits)
    torch.testing.assert_close(probabilities, torch.softmax(logits / 2, dim=-1))
    assert calibration.decide(probabilities)["p"].tolist() == [True, False]
