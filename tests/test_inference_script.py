"""hf_model_inference.py: table, JSON, CSV metrics, explanation pictures, and its errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ace_lora_hf.metrics import classification_metrics

from conftest import REPO_ROOT, SAMPLES


sys.path.insert(0, str(REPO_ROOT))
import hf_model_inference  # noqa: E402


IMAGES = [SAMPLES / "nih_00000001_000.png", SAMPLES / "fake_monochrome1.dcm",
          SAMPLES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]


def run(capsys, *argv):
    hf_model_inference.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_classifies_files_and_writes_json_and_pictures(tiny_hub_folder, tmp_path, capsys):
    output = tmp_path / "results.json"
    out = run(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", output, "--explain", tmp_path / "ex")
    header, *rows = [line for line in out.splitlines() if line.startswith(("image", "/"))]
    assert header.split()[-3:] == ["Finding", "pneumonia", "prediction"]
    results = json.loads(output.read_text())
    assert results["labels"] == ["No Finding", "pneumonia"]
    assert results["templates"] == ["a chest X-ray image of {}.", "Findings suggesting {}."]
    for row, result in zip(rows, results["results"]):
        probabilities = result["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert result["prediction"] == max(probabilities, key=probabilities.get)
        assert row.endswith(result["prediction"])
        assert f"{probabilities['pneumonia']:.4f}" in row
    for image in IMAGES:
        picture = Image.open(tmp_path / "ex" / f"{image.stem}_explain.png")
        assert picture.size == (64, 32)  # input crop beside its overlay


def test_csv_reports_accuracy_and_auc(tiny_hub_folder, tmp_path, capsys):
    table = tmp_path / "rsna_test.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Path", "Target"])
        for image, target in zip(IMAGES, [0, 1, 1]):
            writer.writerow([image.name, target])
    output = tmp_path / "results.json"
    out = run(capsys, "--model", tiny_hub_folder, "--csv", table, "--image-root", SAMPLES, "--output", output)
    results = json.loads(output.read_text())
    probabilities = [[r["probabilities"]["No Finding"], r["probabilities"]["pneumonia"]] for r in results["results"]]
    assert results["metrics"] == classification_metrics(probabilities, [0, 1, 1])
    assert f"AUC (pneumonia) {results['metrics']['auc']:.4f}" in out


def test_existing_output_is_not_overwritten(tiny_hub_folder, tmp_path):
    output = tmp_path / "results.json"
    output.write_text("my earlier results")
    with pytest.raises(SystemExit):
        hf_model_inference.main(["--model", str(tiny_hub_folder), "--images", str(IMAGES[0]), "--output", str(output)])
    assert output.read_text() == "my earlier results"


def test_csv_missing_column_and_bad_image(tiny_hub_folder, tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("Path,Label\nx.png,1\n")
    with pytest.raises(SystemExit, match=r"bad.csv: missing column\(s\) Target"):
        hf_model_inference.main(["--model", str(tiny_hub_folder), "--csv", str(table)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SystemExit, match="broken.png: the image data is corrupt"):
        hf_model_inference.main(["--model", str(tiny_hub_folder), "--images", str(broken)])


def test_without_network_it_asks_for_a_local_folder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hf_model_inference.py"), "--images", str(IMAGES[0])],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 1
    assert "Cannot load 'aydnarda/ACE-LoRA'" in result.stderr and "--model PATH" in result.stderr


def test_full_size_model_on_the_samples(converted_dir, capsys, tmp_path):
    """The converted released adapters (on the stand-in base weights) classify the real sample files."""
    output = tmp_path / "results.json"
    images = IMAGES + [SAMPLES / "nih_00027426_000.png"]
    run(capsys, "--model", converted_dir, "--images", *images, "--output", output, "--explain", tmp_path / "ex")
    results = json.loads(output.read_text())["results"]
    assert len(results) == 4
    mono1, siim = results[1]["probabilities"]["pneumonia"], results[2]["probabilities"]["pneumonia"]
    assert mono1 != pytest.approx(siim, abs=1e-6)  # the inverted picture is a different input
    assert Image.open(tmp_path / "ex" / "nih_00000001_000_explain.png").size == (448, 224)
