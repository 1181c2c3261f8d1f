"""dataset_prep/ on small fixtures in each release's exact format, and zero_shot_eval.py on each prepared set."""

import csv
import gzip
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ace_lora_hf.metrics import classification_metrics, multilabel_metrics

from conftest import REPO_ROOT
from dicom_fixtures import write_dicom


sys.path.insert(0, str(REPO_ROOT))  # this checkout's dataset_prep, whether or not it is installed
sys.path.insert(0, str(REPO_ROOT / "examples"))
from dataset_prep import _common as common
from dataset_prep import chestxray14, chexpert_5x200, lc25000, mhist, mimic_cxr, rsna, siim

zero_shot_eval = importlib.import_module("zero_shot_eval")


def read_csv(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def write_rows(path, header, rows, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def png(path, seed=0, size=(20, 24), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3) if mode == "RGB" else size[::-1],
                                                  dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------------------------------- RSNA


@pytest.fixture(scope="module")
def rsna_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    (root / "stage_2_train_images").mkdir()
    rows = []
    for index in range(20):
        patient = f"{index:04d}-patient"
        write_dicom(root / "stage_2_train_images" / f"{patient}.dcm", np.full((16, 16), index * 10, np.uint8))
        if index % 3 == 0:
            rows.append([patient, 10.0 + index, 20.0, 30.0, 40.0, 1])
            if index == 3:
                rows.append([patient, 100.0, 110.0, 5.0, 6.0, 1])  # a second box
        else:
            rows.append([patient, "", "", "", "", 0])
    write_rows(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    return root


def test_rsna_tables(rsna_input, tmp_path):
    rsna.prepare(rsna_input, tmp_path)
    classification = read_csv(tmp_path / "rsna_classification.csv")
    assert len(classification) == 20
    assert [r["split"] for r in classification].count("test") == 3  # 20 - round(0.85 * 20)
    assert {r["Target"] for r in classification if r["split"] == "test"} == {"0", "1"}
    targets = {r["Path"]: r["Target"] for r in classification}
    assert targets["stage_2_train_images/0003-patient.dcm"] == "1"
    assert targets["stage_2_train_images/0004-patient.dcm"] == "0"
    detection = read_csv(tmp_path / "rsna_detection.csv")
    assert len(detection) == 7 and [r["split"] for r in detection].count("train") == 5  # round(0.7 * 7)
    boxes = {r["Path"]: json.loads(r["boxes"]) for r in detection}
    assert boxes["stage_2_train_images/0003-patient.dcm"] == [[13.0, 20.0, 43.0, 60.0], [100.0, 110.0, 105.0, 116.0]]
    rsna.prepare(rsna_input, tmp_path / "again")
    assert read_csv(tmp_path / "again" / "rsna_classification.csv") == classification  # seeded


def test_rsna_errors(rsna_input, tmp_path):
    rsna.prepare(rsna_input, tmp_path)
    with pytest.raises(SystemExit, match="--overwrite"):
        rsna.prepare(rsna_input, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "stage_2_train_images").mkdir()
    write_rows(broken / "stage_2_train_labels.csv", ["patientId", "x", "y", "Target"], [["a", 1, 2, 0]])
    with pytest.raises(SystemExit, match=r"missing column\(s\) 'width', 'height'"):
        rsna.prepare(broken, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------- SIIM


def encode_rle(mask: np.ndarray) -> str:
    """The SIIM competition's mask2rle: relative runs over the column-major pixel order."""
    flat = mask.T.flatten()
    runs, last_end, index = [], 0, 0
    while index < flat.size:
        if flat[index]:
            start = index
            while index < flat.size and flat[index]:
                index += 1
            runs += [start - last_end, index - start]
            last_end = index
        else:
            index += 1
    return " ".join(map(str, runs))


@pytest.fixture(scope="module")
def siim_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    (root / "stage_2_images").mkdir()
    height, width = 12, 16  # not square: catches a transposed decode
    first, second = np.zeros((height, width), np.uint8), np.zeros((height, width), np.uint8)
    first[2:5, 3:9] = 1
    second[7:11, 10:15] = 1
    second[4, 8] = 1  # overlaps the first annotation's edge
    rows = [["1.2.3.0", encode_rle(first)], ["1.2.3.0", encode_rle(second)]]
    for index in range(1, 10):
        image_id = f"1.2.3.{index}"
        rows.append([image_id, encode_rle(first) if index % 2 == 0 else "-1"])
    for image_id in {row[0] for row in rows}:
        write_dicom(root / "stage_2_images" / f"{image_id}.dcm", np.zeros((height, width), np.uint8))
    write_rows(root / "stage_2_train.csv", ["ImageId", " EncodedPixels"], rows)  # the release's leading space
    return root, first | second, first


def test_siim_masks_are_decoded_pixel_exactly(siim_input, tmp_path):
    root, merged, single = siim_input
    siim.prepare(root, tmp_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / "1.2.3.0.png")), merged * 255)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / "1.2.3.2.png")), single * 255)
    assert not np.asarray(Image.open(tmp_path / "masks" / "1.2.3.1.png")).any()
    classification = read_csv(tmp_path / "siim_classification.csv")
    assert {r["Path"]: r["Target"] for r in classification}["stage_2_images/1.2.3.0.dcm"] == "1"
    assert sum(r["Target"] == "1" for r in classification) == 5
    assert [r["split"] for r in classification].count("test") == 3  # 10 - round(0.7 * 10)
    segmentation = read_csv(tmp_path / "siim_segmentation.csv")
    assert sorted(r["split"] for r in segmentation) == ["test"] + ["train"] * 7 + ["valid"] * 2  # round(1.5) = 2


def test_siim_rle_decoding():
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 1] = mask[1, 1] = mask[2, 3] = 1
    # column-major order: column 1 holds pixels 3, 4 (rows 0, 1); column 3 row 2 is pixel 11.
    assert encode_rle(mask) == "3 2 6 1"
    assert np.array_equal(siim.decode_rle("3 2 6 1", 3, 4), mask)
    with pytest.raises(ValueError, match="outside"):
        siim.decode_rle("10 5", 3, 4)


# ------------------------------------------------------------------------------------------------- MIMIC-CXR


CHEXPERT = mimic_cxr.CHEXPERT_LABELS


@pytest.fixture(scope="module")
def mimic_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    images = [("d1", 10000032, 50000001, "PA", "train"), ("d2", 10000032, 50000001, "LATERAL", "train"),
              ("d3", 10000032, 50000002, "AP", "validate"), ("d4", 11000011, 50000003, "PA", "test"),
              ("d5", 11000011, 50000004, "AP", "train")]  # s50000004 has no report
    write_rows(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
               [row[:4] for row in images], compress=True)
    write_rows(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
               [[d, st, su, sp] for d, su, st, _, sp in images], compress=True)
    labels = {50000001: {"Cardiomegaly": 1.0, "Edema": -1.0}, 50000002: {"No Finding": 1.0}}
    write_rows(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT],
               [[10000032, study, *[labels[study].get(name, "") for name in CHEXPERT]] for study in labels],
               compress=True)
    (root / "files").mkdir()
    reports = {
        "files/p10/p10000032/s50000001.txt": "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND "
        "LAT)\n \n FINDINGS: \n Heart size is enlarged.\n Mild edema.\n \n IMPRESSION: \n Cardiomegaly.\n",
        "files/p10/p10000032/s50000002.txt": "FINAL REPORT\nNo acute cardiopulmonary process.\n",
        "files/p11/p11000011/s50000003.txt": "INDICATION: cough\n\nIMPRESSION:\nNormal chest.\n",
    }
    for name, text in reports.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_mimic_training_table(mimic_input, tmp_path, capsys):
    mimic_cxr.prepare(mimic_input, mimic_input, tmp_path)
    rows = read_csv(tmp_path / "mimic_cxr.csv")
    assert "left out 1 image(s)" in capsys.readouterr().out
    assert [(r["image"], r["split"], r["report"]) for r in rows] == [
        ("files/p10/p10000032/s50000001/d1.jpg", "train", "Heart size is enlarged. Mild edema. Cardiomegaly."),
        ("files/p10/p10000032/s50000002/d3.jpg", "validate", "No acute cardiopulmonary process."),
        ("files/p11/p11000011/s50000003/d4.jpg", "test", "Normal chest."),
    ]
    assert (rows[0]["Cardiomegaly"], rows[0]["Edema"], rows[0]["Atelectasis"]) == ("1", "-1", "")
    assert rows[1]["No Finding"] == "1" and all(rows[2][name] == "" for name in CHEXPERT)


def test_mimic_missing_table(tmp_path):
    (tmp_path / "files").mkdir()
    with pytest.raises(SystemExit, match="mimic-cxr-2.0.0-metadata.csv"):
        mimic_cxr.prepare(tmp_path, tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------- NIH, CheXpert, pathology


@pytest.fixture(scope="module")
def nih_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    names = [f"0000{index:04d}_000.png" for index in range(10)]
    findings = ["Cardiomegaly", "No Finding", "Effusion|Pleural_Thickening", "Hernia", "No Finding",
                "Atelectasis", "Mass|Nodule", "Pneumonia", "Edema", "Emphysema"]
    write_rows(root / "Data_Entry_2017_v2020.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"],
               [[name, finding, 0, index] for index, (name, finding) in enumerate(zip(names, findings))])
    (root / "test_list.txt").write_text("\n".join(names[2:] + names[:2]) + "\n")
    for index, name in enumerate(names):
        png(root / "images_001" / "images" / name, seed=index)
    return root


def test_nih_first_fifth_of_the_test_list(nih_input, tmp_path):
    chestxray14.prepare(nih_input, tmp_path, fraction=0.2)
    rows = read_csv(tmp_path / "chestxray14_test.csv")
    assert [r["Path"] for r in rows] == ["images_001/images/00000002_000.png", "images_001/images/00000003_000.png"]
    assert [name for name in chestxray14.FINDINGS if rows[0][name] == "1"] == ["Effusion", "Pleural_Thickening"]
    assert [name for name in chestxray14.FINDINGS if rows[1][name] == "1"] == ["Hernia"]


@pytest.fixture(scope="module")
def chexpert_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    classes = chexpert_5x200.CLASSES
    rows = []
    for index in range(1000):
        label = classes[index % 5]
        path = f"CheXpert-v1.0/valid/patient{index:05d}/study1/view1_frontal.jpg"
        rows.append([path, "Female", 60, "Frontal", "AP", *[1.0 if name == label else "" for name in classes]])
        if index < 10:
            png(root / path, seed=index, mode="RGB")
    write_rows(root / "chexpert_5x200.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *classes], rows)
    return root


def test_chexpert_5x200_checked_and_normalised(chexpert_input, tmp_path):
    chexpert_5x200.prepare(chexpert_input / "chexpert_5x200.csv", tmp_path)
    rows = read_csv(tmp_path / "chexpert_5x200.csv")
    assert len(rows) == 1000 and rows[7] == {"Path": "CheXpert-v1.0/valid/patient00007/study1/view1_frontal.jpg",
                                             "label": "Consolidation"}
    table = read_csv(chexpert_input / "chexpert_5x200.csv")
    table[4]["Edema"] = "1.0"  # a Pleural Effusion row, now with two positives
    with (tmp_path / "bad.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    with pytest.raises(SystemExit, match=r"bad.csv, line 6: positive for \['Edema', 'Pleural Effusion'\]"):
        chexpert_5x200.prepare(tmp_path / "bad.csv", tmp_path / "out")


@pytest.fixture(scope="module")
def lc25000_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("lc25000")
    for organ, (folder, classes) in lc25000.ORGANS.items():
        for position, label in enumerate(classes):
            for index in range(2):
                png(root / folder / label / f"{label}{index + 1}.jpeg", seed=position * 10 + index, mode="RGB")
    return root


def test_lc25000_tables(lc25000_input, tmp_path):
    lc25000.prepare(lc25000_input, tmp_path)
    lung = read_csv(tmp_path / "lc25000_lung.csv")
    assert [r["label"] for r in lung] == ["lung_aca"] * 2 + ["lung_n"] * 2 + ["lung_scc"] * 2
    assert lung[0]["Path"] == "lung_image_sets/lung_aca/lung_aca1.jpeg"
    assert [r["label"] for r in read_csv(tmp_path / "lc25000_colon.csv")] == ["colon_aca"] * 2 + ["colon_n"] * 2


@pytest.fixture(scope="module")
def mhist_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("mhist")
    rows = []
    for index in range(8):
        name = f"MHIST_{index:03d}.png"
        png(root / "images" / name, seed=index, mode="RGB")
        rows.append([name, "SSA" if index % 2 else "HP", 5 if index % 2 else 1, "test" if index < 6 else "train"])
    write_rows(root / "annotations.csv", ["Image Name", "Majority Vote Label",
                                          "Number of Annotators who Selected SSA (Out of 7)", "Partition"], rows)
    return root


def test_mhist_table(mhist_input, tmp_path):
    mhist.prepare(mhist_input, tmp_path)
    rows = read_csv(tmp_path / "mhist_test.csv")
    assert rows[1] == {"Path": "images/MHIST_001.png", "label": "SSA", "split": "test"}
    assert [r["split"] for r in rows].count("test") == 6


def test_split_ids_peels_splits_in_order():
    splits = common.split_ids(range(20), {"train": 0.7, "valid": 0.15, "test": 0.15}, seed=0)
    assert sorted(splits.values()).count("train") == 14 and sorted(splits.values()).count("valid") == 3
    assert splits == common.split_ids(reversed(range(20)), {"train": 0.7, "valid": 0.15, "test": 0.15}, seed=0)


# ------------------------------------------------------------------------------------------- zero-shot evaluation


def _prepared(dataset, request, tmp_path):
    """Run the dataset's prep script on its fixture; return (data root, prepared table)."""
    prepare = {
        "rsna": ("rsna_input", lambda i, o: rsna.prepare(i, o), "rsna_classification.csv"),
        "siim": ("siim_input", lambda i, o: siim.prepare(i[0], o), "siim_classification.csv"),
        "nih14": ("nih_input", lambda i, o: chestxray14.prepare(i, o, 1.0), "chestxray14_test.csv"),
        "chexpert5x200": ("chexpert_input", lambda i, o: chexpert_5x200.prepare(i / "chexpert_5x200.csv", o),
                          "chexpert_5x200.csv"),
        "lc25000_lung": ("lc25000_input", lambda i, o: lc25000.prepare(i, o), "lc25000_lung.csv"),
        "lc25000_colon": ("lc25000_input", lambda i, o: lc25000.prepare(i, o), "lc25000_colon.csv"),
        "mhist": ("mhist_input", lambda i, o: mhist.prepare(i, o), "mhist_test.csv"),
    }[dataset]
    fixture, run, table = prepare
    data = request.getfixturevalue(fixture)
    run(data, tmp_path)
    root = data[0] if dataset == "siim" else data
    if dataset == "chexpert5x200":  # only the first ten images exist in the fixture
        rows = read_csv(tmp_path / table)[:10]
        with (tmp_path / table).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["Path", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return root, tmp_path / table


@pytest.mark.parametrize("dataset", sorted(zero_shot_eval.BENCHMARKS))
def test_zero_shot_eval_end_to_end(dataset, tiny_hub_folder, request, tmp_path):
    root, table = _prepared(dataset, request, tmp_path)
    output = tmp_path / "results.json"
    results = zero_shot_eval.main(["--dataset", dataset, "--model", str(tiny_hub_folder), "--data-root", str(root),
                                   "--table", str(table), "--output", str(output), "--batch-size", "4"])
    saved = json.loads(output.read_text())
    benchmark = zero_shot_eval.BENCHMARKS[dataset]
    probabilities = [image["probabilities"] for image in saved["images"]]
    assert saved["num_images"] == len(probabilities) > 0 and saved["classes"] == list(benchmark.classes.values())
    references = zero_shot_eval.read_benchmark(benchmark, table, root)[1]
    expected = (multilabel_metrics if benchmark.target is None else classification_metrics)(probabilities, references)
    for key, value in expected.items():
        assert saved["metrics"][key] == pytest.approx(value, nan_ok=True)
    assert json.dumps(results["metrics"]) == json.dumps(saved["metrics"])
    published = {"rsna": 87.19, "chexpert5x200": 49.8, "mhist": 57.27, "lc25000_lung": 84.03, "lc25000_colon": 90.39}
    assert (saved["published"] or {}).get("value") == published.get(dataset)


def test_zero_shot_eval_rejects_an_unknown_label(lc25000_input, tiny_hub_folder, tmp_path):
    write_rows(tmp_path / "lung.csv", ["Path", "label"], [["lung_image_sets/lung_n/lung_n1.jpeg", "lung_xyz"]])
    with pytest.raises(SystemExit, match=r"unknown label value\(s\) \['lung_xyz'\]"):
        zero_shot_eval.main(["--dataset", "lc25000_lung", "--model", str(tiny_hub_folder), "--data-root",
                             str(lc25000_input), "--table", str(tmp_path / "lung.csv")])


# As after `pip install -e .`: the checkout's packages importable from anywhere.
INSTALLED = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("script", ["rsna", "siim", "mimic_cxr", "chestxray14", "chexpert_5x200", "lc25000", "mhist"])
def test_scripts_run_from_the_command_line(script, tmp_path):
    for command in ([REPO_ROOT / "dataset_prep" / f"{script}.py"], ["-m", f"dataset_prep.{script}"]):
        result = subprocess.run([sys.executable, *map(str, command), "--help"], capture_output=True, text=True,
                                env=INSTALLED, cwd=tmp_path)
        assert result.returncode == 0 and "--input" in result.stdout and "--overwrite" in result.stdout


def test_lc25000_command_line_run(lc25000_input, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "dataset_prep" / "lc25000.py"), "--input", str(lc25000_input),
               "--output", str(tmp_path)]
    assert subprocess.run(command, capture_output=True, env=INSTALLED).returncode == 0
    assert len(read_csv(tmp_path / "lc25000_lung.csv")) == 6
    again = subprocess.run(command, capture_output=True, text=True, env=INSTALLED)
    assert again.returncode != 0 and "--overwrite" in again.stderr
