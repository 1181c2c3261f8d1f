"""Zero-shot evaluation users can report: bootstrap intervals, the paper's scale, several datasets per call,
unreadable images reported rather than fatal."""

import json
import shutil

import numpy as np
import pytest

from ace_lora_hf.cli import evaluate as evaluate_cli
from ace_lora_hf.evaluation import benchmarks as evaluation
from ace_lora_hf.evaluation.bootstrap import bootstrap_intervals
from ace_lora_hf.cli.common import EXIT_INPUTS_SKIPPED, EXIT_USER_ERROR, run_cli
from ace_lora_hf.evaluation.metrics import classification_metrics

from conftest import SAMPLES


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate():
    generator = np.random.default_rng(1)
    targets = generator.integers(0, 2, 200)
    positive = np.clip(targets * 0.3 + generator.random(200) * 0.7, 0, 1)
    probabilities = np.stack([1 - positive, positive], axis=1)
    first = bootstrap_intervals(classification_metrics, probabilities, targets, resamples=200, seed=7)
    assert first == bootstrap_intervals(classification_metrics, probabilities, targets, resamples=200, seed=7)
    assert first != bootstrap_intervals(classification_metrics, probabilities, targets, resamples=200, seed=8)
    estimate = classification_metrics(probabilities, targets)
    for metric in ("accuracy", "auc"):
        low, high = first[metric]
        assert low < estimate[metric] < high and high - low < 0.2


def test_bootstrap_leaves_out_resamples_where_a_metric_is_undefined():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    intervals = bootstrap_intervals(classification_metrics, probabilities, np.array([0, 1]), resamples=50, seed=0)
    assert intervals["auc"] == [1.0, 1.0]  # the one-class resamples have no AUC; the others rank perfectly
    assert intervals["accuracy"] == [1.0, 1.0]


def test_a_class_missing_from_the_targets_has_no_macro_auc_in_any_scikit_learn():
    """scikit-learn 1.5 raises where later releases warn and give NaN: the metric is NaN either way, without a call
    into scikit-learn, and the macro one-vs-rest AUC of targets holding every class is scikit-learn's."""
    from sklearn.metrics import roc_auc_score

    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    missing = classification_metrics(probabilities[:4], np.array([0, 1, 0, 1]))
    assert np.isnan(missing["auc"]) and missing["accuracy"] == 1.0
    targets = np.array([0, 1, 1, 1, 2])
    expected = roc_auc_score(targets, probabilities, multi_class="ovr", average="macro")
    assert classification_metrics(probabilities, targets)["auc"] == pytest.approx(expected, abs=1e-12)


@pytest.fixture
def two_prepared_sets(tmp_path):
    """RSNA- and SIIM-style test tables over the sample files, one unreadable, sharing one image root."""
    root = tmp_path / "data"
    root.mkdir()
    for sample in SAMPLES.iterdir():
        shutil.copy(sample, root)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    names = sorted(path.name for path in SAMPLES.iterdir())
    rows = ["Path,Target,split"] + [f"{name},{index % 2},test" for index, name in enumerate(names)]
    (root / "rsna_classification.csv").write_text("\n".join(rows + ["broken.png,1,test", "x.png,0,train"]) + "\n")
    (root / "siim_classification.csv").write_text("\n".join(rows) + "\n")
    return root


def test_several_datasets_in_one_call_with_intervals_and_the_paper_scale(two_prepared_sets, tiny_hub_folder,
                                                                         tmp_path, capsys):
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_cli.main, ["--dataset", "rsna", "--dataset", "siim", "--data-root", str(two_prepared_sets),
                                    "--model", str(tiny_hub_folder), "--bootstrap", "30", "--output", str(output)])
    assert exit_info.value.code == EXIT_INPUTS_SKIPPED
    out = capsys.readouterr().out
    report = json.loads(output.read_text())
    rsna, siim = report["datasets"]["rsna"], report["datasets"]["siim"]
    assert rsna["num_images"] == siim["num_images"] == 4
    assert [entry["image"] for entry in rsna["skipped"]] == [str(two_prepared_sets / "broken.png")]
    assert not siim["skipped"] and rsna["published"] == {"metric": "AUC", "value": 87.19}
    for result in (rsna, siim):
        assert result["paper_scale"]["accuracy"] == pytest.approx(100 * result["metrics"]["accuracy"])
        low, high = result["confidence_intervals_95"]["accuracy"]
        assert low <= result["metrics"]["accuracy"] <= high
    assert "87.19" in out and f"wrote {output}" in out and "skipped" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "rsna", "--dataset", "siim", "--data-root", "a", "--data-root", "b", "--data-root", "c"],
         "give one for all datasets or one per --dataset"),
        (["--dataset", "rsna", "--dataset", "rsna", "--data-root", "a"], "names a dataset twice"),
        (["--dataset", "rsna", "--data-root", "missing"], "--data-root missing: no such folder"),
        (["--dataset", "rsna", "--data-root", "."], "rsna_classification.csv not found"),
    ],
)
def test_bad_arguments_are_one_line(tiny_hub_folder, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_cli.main, [*argv, "--model", str(tiny_hub_folder)])
    assert exit_info.value.code == EXIT_USER_ERROR and message in capsys.readouterr().err
