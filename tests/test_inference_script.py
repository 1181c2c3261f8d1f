"""hf_model_inference.py / ace-lora-classify: table, result files, metrics, explanations, and its behaviour on bad,
interrupted and hostile inputs."""

import csv
import errno
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from ace_lora_hf.cli.common import EXIT_INPUTS_SKIPPED, EXIT_USER_ERROR, run_cli
from ace_lora_hf.evaluation.metrics import classification_metrics
from ace_lora_hf.inference.dicom_ids import DICOM_ID_FIELDS
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier
from ace_lora_hf.outputs.result_files import ResultsFile

from conftest import REPO_ROOT, SAMPLES
from dicom_fixtures import write_dicom


sys.path.insert(0, str(REPO_ROOT))
import hf_model_inference  # noqa: E402


IMAGES = [SAMPLES / "nih_00000001_000.png", SAMPLES / "fake_monochrome1.dcm",
          SAMPLES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]


def run(capsys, *argv) -> str:
    assert hf_model_inference.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def run_exit(capsys, *argv) -> tuple[int, str, str]:
    """The command as a user runs it: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(hf_model_inference.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("image", "/"))]


def test_classifies_files_and_writes_json_and_pictures(tiny_hub_folder, tmp_path, capsys):
    output = tmp_path / "results.json"
    out = run(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", output, "--explain", tmp_path / "ex")
    header, *rows = table_rows(out)
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
        assert Image.open(tmp_path / "ex" / f"{image.stem}_explain.png").size == (1890, 1260)


def test_explain_overwrite_replaces_a_planted_link_and_never_writes_through_it(tiny_hub_folder, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "ex").mkdir()
    picture = tmp_path / "ex" / f"{IMAGES[0].stem}_explain.png"
    picture.symlink_to(victim)
    run(capsys, "--model", tiny_hub_folder, "--images", IMAGES[0], "--explain", tmp_path / "ex", "--overwrite")
    assert victim.read_text() == "precious"
    assert not picture.is_symlink() and Image.open(picture).size == (1890, 1260)


def _write_rsna_table(path, images, targets):
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Path", "Target"])
        writer.writerows([image.name, target] for image, target in zip(images, targets))
    return path


def test_csv_reports_accuracy_and_auc(tiny_hub_folder, tmp_path, capsys):
    table = _write_rsna_table(tmp_path / "rsna_test.csv", IMAGES, [0, 1, 1])
    output = tmp_path / "results.json"
    out = run(capsys, "--model", tiny_hub_folder, "--csv", table, "--image-root", SAMPLES, "--output", output)
    results = json.loads(output.read_text())
    probabilities = [[r["probabilities"]["No Finding"], r["probabilities"]["pneumonia"]] for r in results["results"]]
    assert results["metrics"] == classification_metrics(probabilities, [0, 1, 1])
    assert [r["target"] for r in results["results"]] == [0, 1, 1]
    assert f"AUC (pneumonia) {results['metrics']['auc']:.4f}" in out


def test_folders_are_searched_and_streamed_to_csv(tiny_hub_folder, tmp_path, capsys):
    scans = tmp_path / "scans" / "nested"
    scans.mkdir(parents=True)
    for image in IMAGES:
        shutil.copy(image, scans)
    (scans / "notes.txt").write_text("not an image")
    output = tmp_path / "results.csv"
    run(capsys, "--model", tiny_hub_folder, "--images", tmp_path / "scans", "--output", output, "--batch-size", 2)
    rows = list(csv.DictReader(output.open()))
    assert [row["image"] for row in rows] == sorted(str(scans / image.name) for image in IMAGES)
    assert list(rows[0]) == ["image", "No Finding", "pneumonia", "prediction", "error", *DICOM_ID_FIELDS]
    assert not (tmp_path / "results.csv.partial").exists()


SIIM_UIDS = {"StudyInstanceUID": "1.2.276.0.7230010.3.1.2.8323329.6904.1517875201.850818",
             "SeriesInstanceUID": "1.2.276.0.7230010.3.1.3.8323329.6904.1517875201.850817",
             "SOPInstanceUID": "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819", "ViewPosition": "PA"}


def test_dicom_rows_carry_their_uids_in_csv_and_json(tiny_hub_folder, tmp_path, capsys):
    for output in (tmp_path / "results.csv", tmp_path / "results.json"):
        run(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", output)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [{field: row[field] for field in DICOM_ID_FIELDS} for row in rows] == \
        [dict.fromkeys(DICOM_ID_FIELDS, ""), SIIM_UIDS, SIIM_UIDS]
    assert [record["ids"] for record in records] == [dict.fromkeys(DICOM_ID_FIELDS, ""), SIIM_UIDS, SIIM_UIDS]
    for row, record in zip(rows, records):  # the columns are added, the numbers unchanged
        assert float(row["pneumonia"]) == pytest.approx(record["probabilities"]["pneumonia"], abs=1e-6)


def test_no_dicom_ids_leaves_them_out_and_png_runs_have_no_id_columns(tiny_hub_folder, tmp_path, capsys):
    run(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", tmp_path / "a.csv", "--no-dicom-ids")
    run(capsys, "--model", tiny_hub_folder, "--images", IMAGES[0], "--output", tmp_path / "b.jsonl")
    assert list(next(csv.DictReader((tmp_path / "a.csv").open()))) == \
        ["image", "No Finding", "pneumonia", "prediction", "error"]
    assert "ids" not in json.loads((tmp_path / "b.jsonl").read_text())
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", tmp_path / "a.csv",
                            "--resume")
    assert code == EXIT_USER_ERROR and "a.csv has other columns" in err and "'SOPInstanceUID'" in err


def test_a_dicom_without_uids_still_comes_back_and_is_said(tiny_hub_folder, tmp_path, capsys):
    bare = write_dicom(tmp_path / "bare.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    dataset = pydicom.dcmread(bare)
    del dataset.SOPInstanceUID
    dataset.save_as(bare)
    out = run(capsys, "--model", tiny_hub_folder, "--images", bare, IMAGES[2], "--output", tmp_path / "r.json")
    records = json.loads((tmp_path / "r.json").read_text())
    assert [record["ids"] for record in records["results"]] == [dict.fromkeys(DICOM_ID_FIELDS, ""), SIIM_UIDS]
    assert records["without_dicom_ids"] == [{"image": str(bare), "missing": list(DICOM_ID_FIELDS[:3])}]
    assert f"{bare}: its DICOM header has no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID" in out


def test_long_paths_print_names_that_identify_their_files(tiny_hub_folder, tmp_path, capsys):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 4)
    for folder in ("left", "right"):  # the same file name twice: only the folder tells them apart
        (deep / folder).mkdir(parents=True)
        shutil.copy(IMAGES[0], deep / folder / "x.png")
    out = run(capsys, "--model", tiny_hub_folder, "--images", deep)
    header, *rows = out.splitlines()[:3]
    assert header.startswith(f"image (in {deep}/)")
    assert [row.split()[0] for row in rows] == ["left/x.png", "right/x.png"]


def test_one_bad_file_is_reported_and_the_others_are_kept(tiny_hub_folder, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    output = tmp_path / "results.jsonl"
    code, out, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", IMAGES[0], broken, IMAGES[1],
                              "--output", output)
    assert code == EXIT_INPUTS_SKIPPED and "Traceback" not in err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["image"] for record in records] == [str(IMAGES[0]), str(broken), str(IMAGES[1])]
    assert "probabilities" in records[0] and "probabilities" in records[2]
    assert records[1]["error"].startswith("the image data is corrupt")
    assert f"skipped 1:\n  {broken}: the image data is corrupt" in out


def test_strict_stops_at_the_first_bad_file(tiny_hub_folder, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", broken, "--strict")
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    assert f"error: {broken}: the image data is corrupt" in err.splitlines()[-1]


def test_an_interrupted_run_keeps_its_results_and_resumes(tiny_hub_folder, tmp_path, capsys, monkeypatch):
    output = tmp_path / "results.csv"
    classify = ZeroShotClassifier.classify

    def interrupted_after_one_batch(self, images, labels, **options):
        batches = classify(self, images, labels, **options)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(ZeroShotClassifier, "classify", interrupted_after_one_batch)
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", output,
                            "--batch-size", 2)
    assert code == 130 and not output.exists()
    kept = list(csv.DictReader((tmp_path / "results.csv.partial").open()))
    assert [row["image"] for row in kept] == [str(image) for image in IMAGES[:2]]

    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", output)
    assert code == EXIT_USER_ERROR and "interrupted run; pass --resume" in err

    monkeypatch.setattr(ZeroShotClassifier, "classify", classify)
    seen = []
    monkeypatch.setattr(ZeroShotClassifier, "classify", lambda self, images, labels, **options: seen.extend(images)
                        or classify(self, images, labels, **options))
    out = run(capsys, "--model", tiny_hub_folder, "--images", *IMAGES, "--output", output, "--resume")
    assert seen == [str(IMAGES[2])]
    rows = list(csv.DictReader(output.open()))
    assert [row["image"] for row in rows] == [str(image) for image in IMAGES]
    assert rows[:2] == kept and "classified 3 image(s)" in out


def test_a_disk_full_stop_then_resume_keeps_every_row_once(tiny_hub_folder, tmp_path, capsys, monkeypatch):
    """The disk fills in the middle of a batch's rows: the run stops with one line naming the file, and --resume
    ends with every image's row exactly once, with the numbers of an uninterrupted run."""
    images = [IMAGES[index % 3] for index in range(7)]
    links = []
    for index, image in enumerate(images):
        links.append(tmp_path / f"{index}{image.suffix}")
        links[-1].symlink_to(image)
    run(capsys, "--model", tiny_hub_folder, "--images", *links, "--output", tmp_path / "straight.csv",
        "--batch-size", 2)
    write, calls = ResultsFile.write, []

    def disk_fills_in_the_third_batch(self, records):
        calls.append(len(records))
        if len(calls) < 3:
            return write(self, records)
        text = io.StringIO()
        self._append(text, records)
        self._file.write(text.getvalue()[:-3])  # the last row reached the disk without its last character
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device", str(self.partial))

    monkeypatch.setattr(ResultsFile, "write", disk_fills_in_the_third_batch)
    output = tmp_path / "results.csv"
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", *links, "--output", output,
                            "--batch-size", 2)
    assert code == EXIT_USER_ERROR and f"no space left on the device while writing {output}.partial" in err
    monkeypatch.undo()
    run(capsys, "--model", tiny_hub_folder, "--images", *links, "--output", output, "--batch-size", 2, "--resume")
    rows = list(csv.DictReader(output.open()))
    straight = list(csv.DictReader((tmp_path / "straight.csv").open()))
    assert [row["image"] for row in rows] == [str(link) for link in links]
    assert rows == straight


HEADER = "image,No Finding,pneumonia,prediction,error\n"


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("r.csv", b"garbage,,,\n", "has other columns (['garbage', '', '', '']) than this run's results"),
    ("r.csv", HEADER.encode() + b"a.png,abc,0.5,pneumonia,\nb.png,0.5,0.5,pneumonia,\n", "line 2 is not a result"),
    ("r.csv", b"\xff\xfe" + HEADER.encode(), "is not a UTF-8 text file"),
    ("r.jsonl", b'[1, 2]\n{"image": "b.png", "error": "x"}\n', "line 1 is not a result"),
    ("r.jsonl", b'{"image": "a.png", "probabilities": {"cat": 1.0}}\n', "line 1 is not a result"),
])
def test_resuming_from_a_file_that_is_not_these_results_leaves_it_alone(name, content, problem, tiny_hub_folder,
                                                                       tmp_path, capsys):
    earlier = tmp_path / name
    earlier.write_bytes(content)
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", IMAGES[0], "--output", earlier, "--resume")
    assert code == EXIT_USER_ERROR and "Traceback" not in err and f"{earlier} {problem}" in err
    assert earlier.read_bytes() == content and not (tmp_path / f"{name}.partial").exists()


def test_a_last_line_cut_off_by_an_interruption_runs_again(tiny_hub_folder, tmp_path, capsys):
    output, partial = tmp_path / "r.jsonl", tmp_path / "r.jsonl.partial"
    command = ("--model", tiny_hub_folder, "--images", IMAGES[0], IMAGES[1], "--output", output)
    run(capsys, *command)
    first, second = output.read_text().splitlines()
    output.rename(partial)
    partial.write_text(f"{first}\n{second[:len(second) // 2]}")  # stopped while writing the second row
    run(capsys, *command, "--resume")
    resumed = [json.loads(line) for line in output.read_text().splitlines()]
    assert resumed[0] == json.loads(first) and resumed[1]["image"] == json.loads(second)["image"]
    assert resumed[1]["probabilities"] == pytest.approx(json.loads(second)["probabilities"], abs=1e-6)  # batch of 1


def test_outputs_never_replace_inputs_or_earlier_results(tiny_hub_folder, tmp_path, capsys):
    scan = tmp_path / "scan.png"
    shutil.copy(IMAGES[0], scan)
    original = scan.read_bytes()
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", scan, "--output", scan, "--overwrite")
    assert code == EXIT_USER_ERROR and "is also an input" in err and scan.read_bytes() == original
    earlier = tmp_path / "results.json"
    earlier.write_text("my earlier results")
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--images", scan, "--output", earlier)
    assert code == EXIT_USER_ERROR and "--overwrite" in err and earlier.read_text() == "my earlier results"


def test_a_missing_output_folder_is_created_before_the_work(tiny_hub_folder, tmp_path, capsys):
    output = tmp_path / "new" / "folder" / "results.json"
    run(capsys, "--model", tiny_hub_folder, "--images", IMAGES[0], "--output", output)
    assert json.loads(output.read_text())["classified"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--labels", "pneumonia"], "--csv evaluates a binary task"),
        (["--templates", "a chest X-ray"], "needs exactly one '{}'"),
        (["--labels", "a", "a"], "a label is repeated"),
        (["--batch-size", "0"], "argument --batch-size: '0': give a whole number of at least 1"),
        (["--output", "results.txt"], "name a .csv, .jsonl or .json file"),
    ],
)
def test_bad_arguments_are_one_line(tiny_hub_folder, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    table = _write_rsna_table(tmp_path / "t.csv", IMAGES, [0, 1, 1])
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--csv", table, "--image-root", SAMPLES, *argv)
    assert code == EXIT_USER_ERROR and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Path,Label\nx.png,1\n", "missing column(s) 'Target'"),
        ("Path,Target\nx.png,abc\n", "line 2: column 'Target' is 'abc'; expected one of 0, 1."),
        ("Path,Target\n,1\n", "line 2: column 'Path' is empty; give the image's path."),
        ("Path,Target\nx.png,1\ny.png,0\nx.png,0\n", "line 4: column 'Path' lists 'x.png' again (first on line 2)"),
    ],
)
def test_bad_tables_are_one_line(tiny_hub_folder, tmp_path, capsys, content, message):
    table = tmp_path / "bad.csv"
    table.write_text(content)
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--csv", table)
    assert code == EXIT_USER_ERROR and f"bad.csv{',' if 'line' in message else ':'}" in err and message in err


def test_a_latin_1_table_is_one_line(tiny_hub_folder, tmp_path, capsys):
    table = tmp_path / "latin.csv"
    table.write_bytes("Path,Target\nradiographie_é.png,1\n".encode("latin-1"))
    code, _, err = run_exit(capsys, "--model", tiny_hub_folder, "--csv", table)
    assert code == EXIT_USER_ERROR and "not UTF-8 text" in err


def test_a_foreign_model_folder_says_what_to_run_instead(tmp_path, capsys):
    upload = tmp_path / "ACE-LoRA"
    upload.mkdir()
    (upload / "ACE_LoRA.pt").write_bytes(b"weights in the authors' format")
    (upload / "inference.py").write_text("# the authors' script")
    code, _, err = run_exit(capsys, "--model", upload, "--images", IMAGES[0])
    assert code == EXIT_USER_ERROR and "not a model in ACE-LoRA's transformers format" in err
    assert f"--adapters {upload / 'ACE_LoRA.pt'}" in err


def test_full_size_model_on_the_samples(converted_dir, capsys, tmp_path):
    """The converted released adapters (on the stand-in base weights) classify the real sample files."""
    output = tmp_path / "results.json"
    images = IMAGES + [SAMPLES / "nih_00027426_000.png"]
    run(capsys, "--model", converted_dir, "--images", *images, "--output", output, "--explain", tmp_path / "ex")
    results = json.loads(output.read_text())["results"]
    assert len(results) == 4
    mono1, siim = results[1]["probabilities"]["pneumonia"], results[2]["probabilities"]["pneumonia"]
    assert mono1 != pytest.approx(siim, abs=1e-6)  # the inverted picture is a different input
    assert Image.open(tmp_path / "ex" / "nih_00000001_000_explain.png").size == (1890, 1260)


def _damaged_copy(tiny_hub_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_hub_folder, folder)
    return folder


def test_non_finite_weights_are_refused_naming_the_tensor(tiny_hub_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _damaged_copy(tiny_hub_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["vision_hypergraph.edge_adapter.up.bias"][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_exit(capsys, "--model", folder, "--images", IMAGES[0])
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    assert "weight vision_model.hypergraph.edge_adapter.up.bias contains NaN or infinite values" in err


def test_a_truncated_weights_file_and_an_invalid_config_are_one_line(tiny_hub_folder, tmp_path, capsys):
    folder = _damaged_copy(tiny_hub_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_exit(capsys, "--model", folder, "--images", IMAGES[0])
    assert code == EXIT_USER_ERROR and "its weights file is unreadable" in err and "truncated" in err
    shutil.copy(tiny_hub_folder / "model.safetensors", weights)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hypergraph_top_k"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_exit(capsys, "--model", folder, "--images", IMAGES[0])
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    assert f"{folder}/config.json: vision_config.hypergraph_top_k=0" in err.splitlines()[-1]


def _edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _drop_tensor(folder, name):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _pickled_weights(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Exception("not a tensor")}, folder / "pytorch_model.bin")


DAMAGES = {
    "a config that does not fit the weights": (
        lambda folder: _edit_json(folder / "config.json", lambda c: c["vision_config"].update(intermediate_size=40)),
        "config.json does not fit its weights: vision_model."),
    "a tensor missing": (
        lambda folder: _drop_tensor(folder, "vision_model.encoder.layer.0.attention.attention.query.base_layer.weight"),
        "its weights lack vision_model.layers.0.attention.q_proj.base_layer.weight"),
    "an unknown dtype": (
        lambda folder: _edit_json(folder / "config.json", lambda c: c.update(dtype="float99")),
        "config.json: dtype is 'float99'; ACE-LoRA runs in float32, float16, bfloat16"),
    "pickled weights": (_pickled_weights, "its weights are a pickle with more than tensors in it"),
    "a tensor the config does not call for": (
        lambda folder: _edit_json(folder / "config.json", lambda c: c["vision_config"].update(use_hypergraph=False)),
        "its weights hold vision_model.hypergraph."),
    "no tokenizer": (
        lambda folder: [(folder / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
        "cannot load its processor"),
    "an unparsable tokenizer": (lambda folder: (folder / "tokenizer.json").write_text("{not json"),
                                "cannot load its processor"),
    "a negative image size": (
        lambda folder: _edit_json(folder / "processor_config.json",
                                  lambda c: c["image_processor"].update(size={"shortest_edge": -5})),
        "size={'shortest_edge': -5}: every side must be a positive whole number of pixels"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_model_folder_is_one_line_naming_it(damage, tiny_hub_folder, tmp_path, capsys):
    folder = _damaged_copy(tiny_hub_folder, tmp_path)
    damage_folder, message = DAMAGES[damage]
    damage_folder(folder)
    code, _, err = run_exit(capsys, "--model", folder, "--images", IMAGES[0])
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == EXIT_USER_ERROR and "Traceback" not in err and len(errors) == 1, err
    assert str(folder) in errors[0] and message in errors[0], errors[0]


def test_two_processes_shard_the_images_and_gather_them_in_input_order(tiny_hub_folder, tmp_path):
    """`accelerate launch` on two CPU processes: each classifies its shard, the results come back in input order."""
    from transformers import AutoModel, AutoProcessor

    images = [*IMAGES, SAMPLES / "nih_00027426_000.png", IMAGES[0]]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    finished = subprocess.run([*launch, str(REPO_ROOT / "hf_model_inference.py"), "--model", str(tiny_hub_folder),
                               "--images", *map(str, images), "--batch-size", "2", "--device", "cpu",
                               "--num-workers", "0", "--quiet", "--output", str(tmp_path / "two.csv")],
                              capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "two.csv").open()))
    assert [row["image"] for row in rows] == [str(image) for image in images]
    model = AutoModel.from_pretrained(tiny_hub_folder)
    model.merge_lora()
    expected = ZeroShotClassifier(model, AutoProcessor.from_pretrained(tiny_hub_folder))(images, ["No Finding", "pneumonia"])
    actual = [float(row[label]) for row in rows for label in ("No Finding", "pneumonia")]
    assert actual == pytest.approx(expected.flatten().tolist(), abs=1e-6)
