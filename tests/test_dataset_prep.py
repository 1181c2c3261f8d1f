"""dataset_prep/ on small fixtures in each release's exact format, and zero_shot_eval.py on each prepared set.

Bad inputs are tried as a user (or an attacker) would: each is refused by the command line with one error line
that names the file, line, column and value, and nothing is written, least of all outside --output.
"""

import csv
import errno
import gzip
import json
import os
import runpy
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ace_lora_hf.cli import evaluate as evaluate_cli
from ace_lora_hf.evaluation import benchmarks as evaluation
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.errors import DataFormatError, OutputPathError
from ace_lora_hf.evaluation.metrics import classification_metrics, multilabel_metrics
from ace_lora_hf.publishing.model_card import METRICS, evaluation_results
from ace_lora_hf.outputs.safe_outputs import folder_lock, json_safe

from conftest import REPO_ROOT
from dicom_fixtures import write_dicom


sys.path.insert(0, str(REPO_ROOT))  # this checkout's dataset_prep, whether or not it is installed
from dataset_prep import _common as common
from dataset_prep import __main__ as dispatcher
from dataset_prep import chestxray14, chexpert_5x200, lc25000, mhist, mimic_cxr, rsna, siim



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


def refused(capsys, module, *argv) -> str:
    """Run `module`'s command line in-process; it must exit 2 with one error line and no traceback. The line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, [str(arg) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert exit_info.value.code == EXIT_USER_ERROR and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def succeeds(module, *argv) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, [str(arg) for arg in argv])
    assert exit_info.value.code == 0


def appended(source, target, line: bytes) -> int:
    """Copy the CSV `source` (plain or .gz) to `target` with one more line; the number of that line."""
    compressed = source.suffix == ".gz"
    data = gzip.decompress(source.read_bytes()) if compressed else source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((gzip.compress if compressed else bytes)(data + line + b"\r\n"))
    return data.count(b"\n") + 1


def input_beside(source_root, target_root, table, line: bytes, *linked) -> int:
    """An input folder holding `source_root`'s `table` with `line` appended, and links to its `linked` files."""
    for name in linked:
        (target_root / name).parent.mkdir(parents=True, exist_ok=True)
        (target_root / name).symlink_to(source_root / name)
    return appended(source_root / table, target_root / table, line)


def files_under(folder) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


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
    with pytest.raises(OutputPathError, match="--overwrite"):
        rsna.prepare(rsna_input, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "stage_2_train_images").mkdir()
    write_rows(broken / "stage_2_train_labels.csv", ["patientId", "x", "y", "Target"], [["a", 1, 2, 0]])
    with pytest.raises(DataFormatError, match=r"missing column\(s\) 'width', 'height'"):
        rsna.prepare(broken, tmp_path / "out")


RSNA_BAD_ROWS = {
    "label outside the domain": (b"0099-patient,,,,,yes", "column 'Target' is 'yes'; expected 0 or 1"),
    "label not a number": (b"0099-patient,,,,,abc", "column 'Target' is 'abc'; expected 0 or 1"),
    "empty label": (b"0099-patient,,,,,", "column 'Target' is empty; expected 0 or 1"),
    "empty id": (b",,,,,0", "column 'patientId' is empty; expected a file name"),
    "contradicting duplicate": (b"0001-patient,1,2,3,4,1",
                                "column 'Target' is 1 but line 3 gives 0 for the same patientId '0001-patient'"),
    "id escaping the folder": (b"../0001-patient,,,,,0", "column 'patientId' is '../0001-patient'; expected a file"),
    "absolute id": (b"/etc/passwd,,,,,0", "column 'patientId' is '/etc/passwd'; expected a file name"),
    "positive without its box": (b"0000-patient,,20,30,40,1", "column 'x' is empty; expected a number, 0 or more"),
    "negative box size": (b"0000-patient,1,2,-30,40,1", "column 'width' is '-30'; expected a number above 0"),
    "infinite coordinate": (b"0000-patient,inf,2,30,40,1", "column 'x' is 'inf'; expected a number, 0 or more"),
    "negative with a box": (b"0001-patient,1,,,,0", "column 'x' is '1'; expected empty: a Target 0 row has no box"),
    "Latin-1 text": ("0099-café,,,,,0".encode("latin-1"),
                     "column 'patientId' is '0099-caf\ufffd': not UTF-8 text (byte b'\\xe9', e.g. Latin-1); "
                     "save the file as UTF-8"),
    "patient without image": (b"0099-patient,,,,,0", "0099-patient.dcm, the DICOM of patient '0099-patient', "
                              "not found"),
}


def test_rsna_merges_a_repeated_row(rsna_input, tmp_path):
    input_beside(rsna_input, tmp_path / "in", rsna.LABELS_FILE, b"0003-patient,100.0,110.0,5.0,6.0,1",
                 rsna.IMAGES_DIR)
    rsna.prepare(tmp_path / "in", tmp_path / "out")
    boxes = {r["Path"]: json.loads(r["boxes"]) for r in read_csv(tmp_path / "out" / "rsna_detection.csv")}
    assert boxes["stage_2_train_images/0003-patient.dcm"] == [[13.0, 20.0, 43.0, 60.0], [100.0, 110.0, 105.0, 116.0]]


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
        write_dicom(root / "stage_2_images" / f"{image_id}.dcm", np.zeros((height, width), np.uint8),
                    PatientID=f"patient-{image_id}")
    write_rows(root / "stage_2_train.csv", ["ImageId", " EncodedPixels"], rows)  # the release's leading space
    return root, first | second, first


def test_siim_splits_keep_each_patients_dicoms_together(tmp_path):
    """Ten patients of three DICOMs each: split per image, six of them would land in train and test."""
    (tmp_path / "in" / "stage_2_images").mkdir(parents=True)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:5] = 1
    rows, patient_of = [], {}
    for index in range(30):
        image_id, patient = f"1.2.4.{index}", f"patient-{index // 3}"
        rows.append([image_id, encode_rle(mask) if index // 3 % 2 else "-1"])
        write_dicom(tmp_path / "in" / "stage_2_images" / f"{image_id}.dcm", np.zeros((8, 8), np.uint8),
                    PatientID=patient)
        patient_of[f"stage_2_images/{image_id}.dcm"] = patient
    write_rows(tmp_path / "in" / "stage_2_train.csv", ["ImageId", "EncodedPixels"], rows)
    siim.prepare(tmp_path / "in", tmp_path / "out")
    for table, splits in (("siim_classification.csv", {"train": 7, "test": 3}),
                          ("siim_segmentation.csv", {"train": 7, "valid": 2, "test": 1})):
        split_of_patient = {}
        for row in read_csv(tmp_path / "out" / table):
            assert split_of_patient.setdefault(patient_of[row["Path"]], row["split"]) == row["split"], row
        assert Counter(split_of_patient.values()) == splits  # patients, each with its three images


def test_siim_refuses_a_dicom_without_a_patient(siim_input, tmp_path, capsys):
    shutil.copytree(siim_input[0], tmp_path / "in")
    write_dicom(tmp_path / "in" / "stage_2_images" / "1.2.3.4.dcm", np.zeros((12, 16), np.uint8), PatientID="")
    error = refused(capsys, siim, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert "1.2.3.4.dcm: no PatientID in its header" in error


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


SIIM_BAD_ROWS = {
    "negative offset": (b"1.2.3.2,-3 5", "'-3' is not a whole number >= 0"),
    "negative length": (b"1.2.3.2,3 -5", "'-5' is not a whole number >= 0"),
    "zero-length run": (b"1.2.3.2,3 0", "a run of length 0; ImageId 1.2.3.2"),
    "non-integer token": (b"1.2.3.2,3 x", "'x' is not a whole number >= 0"),
    "fraction": (b"1.2.3.2,1.5 2", "'1.5' is not a whole number >= 0"),
    "odd count": (b"1.2.3.2,3 5 7", "an odd number (3) of values"),
    "empty cell": (b"1.2.3.2,", "column 'EncodedPixels' is empty; expected -1 or run-length pairs"),
    "run beyond the image": (b"1.2.3.2,150 50", "the runs reach pixel 200, beyond the 16x12 image 1.2.3.2"),
    "mask for an image marked -1": (b"1.2.3.1,3 5", "image '1.2.3.1' has both a mask"),
    "-1 for an image with a mask": (b"1.2.3.2,-1", "image '1.2.3.2' has both a mask"),
    "empty id": (b",-1", "column 'ImageId' is empty; expected a file name"),
    "image without DICOM": (b"1.2.3.99,-1", "1.2.3.99.dcm, the DICOM of image '1.2.3.99', not found"),
}


def test_siim_merges_a_repeated_annotation(siim_input, tmp_path):
    root, _, single = siim_input
    input_beside(root, tmp_path / "in", siim.LABELS_FILE, f"1.2.3.2,{encode_rle(single)}".encode(), siim.IMAGES_DIR)
    siim.prepare(tmp_path / "in", tmp_path / "out")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / "1.2.3.2.png")), single * 255)


@pytest.mark.parametrize("escape", ["../../outside", "absolute"])
def test_siim_ids_never_write_outside_the_output_folder(escape, siim_input, tmp_path, capsys):
    """An ImageId that is a path would put its mask as far from masks/ as its DICOM is from the images folder."""
    target = tmp_path / "elsewhere" / "outside" if escape == "absolute" else tmp_path / "outside"
    image_id = str(target) if escape == "absolute" else escape
    target.parent.mkdir(exist_ok=True)
    write_dicom(target.with_suffix(".dcm"), np.zeros((12, 16), np.uint8))  # so that nothing else stops the run
    shutil.copytree(siim_input[0] / siim.IMAGES_DIR, tmp_path / "in" / siim.IMAGES_DIR)  # a link would move '..'
    appended(siim_input[0] / siim.LABELS_FILE, tmp_path / "in" / siim.LABELS_FILE, f"{image_id},-1".encode())
    error = refused(capsys, siim, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert f"column 'ImageId' is {image_id[:20]!r}"[:-1] in error and "; expected a file name without '/'" in error
    assert not target.with_suffix(".png").exists() and not (tmp_path / "out").exists()


def test_siim_run_failing_half_way_leaves_nothing_and_a_rerun_succeeds(siim_input, tmp_path, capsys, monkeypatch):
    save = Image.Image.save

    def disk_full_at_the_sixth_mask(image, path, *args, **kwargs):
        if str(path).endswith("1.2.3.5.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_at_the_sixth_mask)
    output = tmp_path / "out"
    error = refused(capsys, siim, "--input", siim_input[0], "--output", output)
    assert "no space left on the device while writing" in error
    assert files_under(tmp_path) == []  # no tables, masks, staging folders or lock file
    monkeypatch.undo()
    succeeds(siim, "--input", siim_input[0], "--output", output)
    assert files_under(output) == ["masks", *sorted(f"masks/1.2.3.{i}.png" for i in range(10)),
                                   "siim_classification.csv", "siim_segmentation.csv"]


def test_siim_overwrite_never_deletes_a_users_file_beside_the_masks(siim_input, tmp_path, capsys):
    output = tmp_path / "out"
    succeeds(siim, "--input", siim_input[0], "--output", output)
    (output / "masks" / "my_notes.txt").write_text("mine")
    error = refused(capsys, siim, "--input", siim_input[0], "--output", output, "--overwrite")
    assert f"{output / 'masks'} holds 'my_notes.txt', which this script does not write there (*.png)" in error
    assert (output / "masks" / "my_notes.txt").read_text() == "mine"
    (output / "masks" / "my_notes.txt").unlink()
    succeeds(siim, "--input", siim_input[0], "--output", output, "--overwrite")


def test_siim_bad_last_row_leaves_nothing_and_the_fixed_input_runs(siim_input, tmp_path, capsys):
    root, _, single = siim_input
    input_beside(root, tmp_path / "in", siim.LABELS_FILE, b"1.2.3.8,3 5 7", siim.IMAGES_DIR)
    refused(capsys, siim, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert files_under(tmp_path / "out") == []
    appended(root / siim.LABELS_FILE, tmp_path / "in" / siim.LABELS_FILE, b"1.2.3.8,3 5")  # pixels 3-7, column 0
    succeeds(siim, "--input", tmp_path / "in", "--output", tmp_path / "out")
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "1.2.3.8.png")) // 255
    assert mask[3:8, 0].all() and mask.sum() == single.sum() + 5


def test_siim_refuses_an_unreadable_dicom(siim_input, tmp_path, capsys):
    shutil.copytree(siim_input[0], tmp_path / "in")
    (tmp_path / "in" / siim.IMAGES_DIR / "1.2.3.4.dcm").write_bytes(b"<html>Download failed</html>")
    error = refused(capsys, siim, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert "1.2.3.4.dcm: not a readable image DICOM (" in error and "download it again" in error


def test_siim_overwrite_replaces_the_masks_folder(siim_input, tmp_path):
    siim.prepare(siim_input[0], tmp_path)
    (tmp_path / "masks" / "stale.png").write_bytes(b"from an older run")
    with pytest.raises(OutputPathError, match="--overwrite"):
        siim.prepare(siim_input[0], tmp_path)
    siim.prepare(siim_input[0], tmp_path, overwrite=True)
    assert not (tmp_path / "masks" / "stale.png").exists() and len(files_under(tmp_path / "masks")) == 10


# ------------------------------------------------------------------------------------------------- MIMIC-CXR


CHEXPERT = mimic_cxr.CHEXPERT_LABELS


@pytest.fixture(scope="module")
def mimic_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    images = [("d1", 10000032, 50000001, "PA", "train"), ("d2", 10000032, 50000001, "LATERAL", "train"),
              ("d3", 10000032, 50000002, "AP", "train"), ("d4", 11000011, 50000003, "PA", "test"),
              ("d5", 11000011, 50000004, "AP", "test")]  # s50000004 has no report
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
    assert [(r["image"], r["split"], r["subject_id"], r["report"]) for r in rows] == [
        ("files/p10/p10000032/s50000001/d1.jpg", "train", "10000032",
         "Heart size is enlarged. Mild edema. Cardiomegaly."),
        ("files/p10/p10000032/s50000002/d3.jpg", "train", "10000032", "No acute cardiopulmonary process."),
        ("files/p11/p11000011/s50000003/d4.jpg", "test", "11000011", "Normal chest."),
    ]
    assert (rows[0]["Cardiomegaly"], rows[0]["Edema"], rows[0]["Atelectasis"]) == ("1", "-1", "")
    assert rows[1]["No Finding"] == "1" and all(rows[2][name] == "" for name in CHEXPERT)


def test_mimic_missing_table(tmp_path):
    (tmp_path / "files").mkdir()
    with pytest.raises(DataFormatError, match="mimic-cxr-2.0.0-metadata.csv"):
        mimic_cxr.prepare(tmp_path, tmp_path, tmp_path / "out")


MIMIC_TABLES = {name: f"mimic-cxr-2.0.0-{name}.csv.gz" for name in ("metadata", "split", "chexpert")}
MIMIC_BAD_ROWS = {
    "chexpert": {
        "label outside the domain": (b"10000032,50000009,yes" + b"," * 13,
                                     "column 'Atelectasis' is 'yes'; expected 1 or 0 or -1 or empty"),
        "contradicting labels": (b"10000032,50000001,,0,,-1" + b"," * 10,
                                 "column 'Cardiomegaly' is 0 but line 2 gives 1 for the same (subject_id, study_id) "
                                 "(10000032, 50000001)"),
    },
    "split": {
        "split outside the domain": (b"d9,50000009,10000032,dev",
                                     "column 'split' is 'dev'; expected 'train' or 'validate' or 'test'"),
        "contradicting split": (b"d1,50000001,10000032,test",
                                "column 'split' is 'test' but line 2 gives 'train' for the same dicom_id 'd1'"),
        "patient in two splits": (b"d9,50000009,10000032,validate",
                                  "patient 10000032 is in split 'validate', but line 2 puts them in split 'train'"),
    },
    "metadata": {
        "contradicting study": (b"d1,10000032,50000002,PA",
                                "column 'study_id' is 50000002 but line 2 gives 50000001 for the same dicom_id 'd1'"),
        "id not a number": (b"d9,abc,50000001,PA", "column 'subject_id' is 'abc'; expected a whole number"),
        "empty id": (b",10000032,50000001,PA", "column 'dicom_id' is empty; expected a file name"),
        "id escaping the folder": (b"../../d9,10000032,50000001,PA",
                                   "column 'dicom_id' is '../../d9'; expected a file name without '/'"),
    },
}


def test_mimic_refuses_an_image_without_a_split(mimic_input, tmp_path, capsys):
    shutil.copytree(mimic_input, tmp_path / "in")
    split = tmp_path / "in" / MIMIC_TABLES["split"]
    split.write_bytes(gzip.compress(b"".join(line for line in gzip.decompress(split.read_bytes()).splitlines(True)
                                             if not line.startswith(b"d4,"))))
    error = refused(capsys, mimic_cxr, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert f"{MIMIC_TABLES['metadata']}, line 5: image 'd4' has no row in {split}" in error


def test_mimic_refuses_a_report_that_is_not_utf8_and_a_broken_archive(mimic_input, tmp_path, capsys):
    shutil.copytree(mimic_input, tmp_path / "in")
    report = tmp_path / "in" / "files/p11/p11000011/s50000003.txt"
    report.write_bytes("INDICATION: cough\n\nIMPRESSION:\nNormal chest, café.\n".encode("latin-1"))
    error = refused(capsys, mimic_cxr, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert f"{report}, line 4: not UTF-8 text (byte b'\\xe9'" in error
    metadata = tmp_path / "in" / MIMIC_TABLES["metadata"]
    metadata.write_bytes(metadata.read_bytes()[:-10])
    error = refused(capsys, mimic_cxr, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert f"{metadata} is not a complete gzip file" in error and "download it again" in error


# ---------------------------------------------------------------------------------------- NIH, CheXpert, pathology


@pytest.fixture(scope="module")
def nih_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    names = [f"0000{index:04d}_000.png" for index in range(10)]
    findings = ["Cardiomegaly", "No Finding", "Effusion|Pleural_Thickening", "Hernia", "No Finding",
                "Atelectasis", "Mass|Nodule", "Pneumonia", "Edema", "Emphysema"]
    write_rows(root / "Data_Entry_2017_v2020.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                                                    "Patient Age", "Patient Gender", "View Position"],
               [[name, finding, 0, index, 30 + 5 * index, "MF"[index % 2], ("PA", "AP")[index % 3 == 0]]
                for index, (name, finding) in enumerate(zip(names, findings))])
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
    # Subgroup columns of images 2 and 3: ages 40 and 45, M then F, views PA then AP.
    assert [[row[column] for column in ("sex", "age", "age_group", "view")] for row in rows] == [
        ["M", "40", "40-59", "PA"], ["F", "45", "40-59", "AP"]]


@pytest.mark.parametrize("age, group", [(0, "0-17"), (17, "0-17"), (18, "18-39"), (69, "60-69"), (70, "70+"),
                                        (120, "70+"), (414, "")])
def test_nih_age_groups(age, group):
    assert chestxray14.age_group(age) == group


NIH_BAD_ENTRIES = {
    "unknown finding": (b"00000099_000.png,Foo|Mass,0,99,40,F,PA",
                        "column 'Finding Labels' is 'Foo|Mass'; expected 'No Finding' or findings among Atelectasis"),
    "empty findings": (b"00000099_000.png,,0,99,40,F,PA", "column 'Finding Labels' is empty; expected 'No Finding' or"),
    "contradicting duplicate": (b"00000002_000.png,Hernia,0,2,40,F,PA",
                                "column 'Finding Labels' is 'Hernia' but line 4 "
                                "gives 'Effusion|Pleural_Thickening' for the same image '00000002_000.png'"),
    "unknown sex": (b"00000099_000.png,Mass,0,99,40,X,PA", "column 'Patient Gender' is 'X'; expected 'M' or 'F'"),
    "unknown view": (b"00000099_000.png,Mass,0,99,40,F,LL", "column 'View Position' is 'LL'; expected 'PA' or 'AP'"),
    "age not a number": (b"00000099_000.png,Mass,0,99,40Y,F,PA", "column 'Patient Age' is '40Y'; expected a whole"),
    "id escaping the folder": (b"../00000002_000.png,Hernia,0,2,40,F,PA",
                               "column 'Image Index' is '../00000002_000.png'; expected a file name without '/'"),
}


NIH_BAD_TEST_LISTS = {
    "name escaping the folder": (b"../../etc/passwd\n", "line 1: '../../etc/passwd' is not a plain image file name"),
    "repeated name": (b"00000002_000.png\n00000002_000.png\n",
                      "line 2: '00000002_000.png' is listed again (first on line 1)"),
    "name without a data entry": (b"00000099_000.png\n", "line 1: '00000099_000.png' has no row in Data_Entry"),
    "Latin-1 text": ("\n00000002_000.png caf\u00e9\n".encode("latin-1"), "line 2: not UTF-8 text (byte b'\\xe9'"),
}


@pytest.mark.parametrize("case", sorted(NIH_BAD_TEST_LISTS))
def test_nih_refuses_a_bad_test_list_naming_the_line(case, nih_input, tmp_path, capsys):
    content, message = NIH_BAD_TEST_LISTS[case]
    input_beside(nih_input, tmp_path / "in", chestxray14.ENTRIES_FILE, b"", "images_001")
    (tmp_path / "in" / "test_list.txt").write_bytes(content + (nih_input / "test_list.txt").read_bytes())
    error = refused(capsys, chestxray14, "--input", tmp_path / "in", "--output", tmp_path / "out", "--fraction", 1)
    assert f"test_list.txt, {message}" in error


def test_nih_refuses_a_listed_image_that_is_missing(nih_input, tmp_path, capsys):
    input_beside(nih_input, tmp_path / "in", chestxray14.ENTRIES_FILE, b"00000099_000.png,Hernia,0,99,40,F,PA",
                 "images_001")
    (tmp_path / "in" / "test_list.txt").write_text("00000099_000.png\n")
    error = refused(capsys, chestxray14, "--input", tmp_path / "in", "--output", tmp_path / "out", "--fraction", 1)
    assert "test_list.txt, line 1: image '00000099_000.png' not found under" in error


@pytest.mark.parametrize("fraction", ["0", "1.5", "nan", "0.01"])
def test_nih_refuses_a_fraction_that_selects_nothing(fraction, nih_input, tmp_path, capsys):
    error = refused(capsys, chestxray14, "--input", nih_input, "--output", tmp_path / "out", "--fraction", fraction)
    assert f"--fraction {'must be in (0, 1]' if fraction != '0.01' else '0.01 of the 10 names'}" in error
    assert not (tmp_path / "out").exists()


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
    with pytest.raises(DataFormatError, match=r"bad.csv, line 6: positive for \['Edema', 'Pleural Effusion'\]"):
        chexpert_5x200.prepare(tmp_path / "bad.csv", tmp_path / "out")


CHEXPERT_PATH = "CheXpert-v1.0/valid/patient00000/study1/view1_frontal.jpg"
CHEXPERT_BAD_ROWS = {
    "label outside the domain": (b"CheXpert-v1.0/x.jpg,Female,60,Frontal,AP,,,,yes,",
                                 "column 'Edema' is 'yes'; expected 1 or 0 or -1 or empty"),
    "repeated image": (f"{CHEXPERT_PATH},Female,60,Frontal,AP,1.0,,,,".encode(),
                       f"column 'Path': '{CHEXPERT_PATH}' is listed again (first on line 2)"),
    "empty path": (b",Female,60,Frontal,AP,1.0,,,,", "column 'Path' is empty; expected a relative path"),
    "path escaping the data root": (b"../../secret.jpg,Female,60,Frontal,AP,1.0,,,,",
                                    "column 'Path' is '../../secret.jpg'; expected a relative path"),
    "absolute path": (b"/etc/secret.jpg,Female,60,Frontal,AP,1.0,,,,",
                      "column 'Path' is '/etc/secret.jpg'; expected a relative path"),
    "Latin-1 text": ("CheXpert-v1.0/café.jpg,Female,60,Frontal,AP,1.0,,,,".encode("latin-1"),
                     "column 'Path' is 'CheXpert-v1.0/caf\ufffd.jpg': not UTF-8 text"),
}


def test_chexpert_5x200_never_replaces_its_input(chexpert_input, tmp_path, capsys):
    table = shutil.copy(chexpert_input / "chexpert_5x200.csv", tmp_path / "chexpert_5x200.csv")
    before = table.read_bytes()
    error = refused(capsys, chexpert_5x200, "--input", table, "--output", tmp_path, "--overwrite")
    assert "is also an input of this job" in error and "--overwrite never replaces an input" in error
    error = refused(capsys, chexpert_5x200, "--input", table, "--output", table, "--overwrite")
    assert "is a file, not a folder" in error
    assert table.read_bytes() == before
    assert files_under(tmp_path) == ["chexpert_5x200.csv"]


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


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_lc25000_refuses_a_missing_or_empty_class_folder_and_writes_neither_table(problem, lc25000_input, tmp_path,
                                                                                  capsys):
    shutil.copytree(lc25000_input, tmp_path / "in")
    colon_n = tmp_path / "in" / "colon_image_sets" / "colon_n"
    shutil.rmtree(colon_n)
    if problem == "empty":
        colon_n.mkdir()
    error = refused(capsys, lc25000, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert (f"{colon_n} holds no .jpeg/.jpg/.png images" if problem == "empty" else f"{colon_n} not found") in error
    assert not (tmp_path / "out").exists()  # not even the lung table, which was fine


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


MHIST_BAD_ROWS = {
    "label outside the domain": (b"MHIST_999.png,XYZ,1,test",
                                 "column 'Majority Vote Label' is 'XYZ'; expected 'HP' or"),
    "partition outside the domain": (b"MHIST_999.png,HP,1,val", "column 'Partition' is 'val'; expected 'train' or"),
    "repeated image": (b"MHIST_001.png,SSA,5,test", "column 'Image Name': 'MHIST_001.png' is listed again (first on "
                       "line 3)"),
    "image escaping the folder": (b"../annotations.csv,HP,1,test", "column 'Image Name' is '../annotations.csv'; "
                                  "expected a file name without '/'"),
    "missing image": (b"MHIST_999.png,HP,1,test", "column 'Image Name': image"),
}


def test_tables_are_read_as_saved_by_excel_or_a_text_editor(tmp_path):
    table = tmp_path / "table.csv"
    table.write_bytes('\ufeffid, label \r\n1,yes\r\n\r\n2,"two\r\nlines"\r\n3,no\r\n'.encode())
    rows = list(common.read_rows(table, ["id", "label"], "a table"))
    assert [(row.line, row.cells) for row in rows] == [(2, {"id": "1", "label": "yes"}),
                                                       (4, {"id": "2", "label": "two\r\nlines"}),
                                                       (6, {"id": "3", "label": "no"})]


BROKEN_TABLES = {
    "extra cells": (b"id,label\n1,a\n2,b,c\n", "table.csv, line 3: 3 cells but the header names 2 columns"),
    "bad quoting": (b'id,label\n1,"a\n2,b\n', "table.csv, line 2: not valid CSV (unexpected end of data)"),
    "stray quote": (b'id,label\n1,"a"b\n', "table.csv, line 2: not valid CSV"),
    "empty file": (b"", "table.csv is empty: expected a table with columns ['id', 'label']"),
    "repeated column": (b"id,label,id\n1,a,2\n", "table.csv: column(s) 'id' appear more than once"),
    "missing column": (b"id\n1\n", "table.csv: missing column(s) 'label'; found ['id']"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TABLES))
def test_a_broken_table_is_refused_naming_the_line(case, tmp_path):
    content, message = BROKEN_TABLES[case]
    (tmp_path / "table.csv").write_bytes(content)
    with pytest.raises(DataFormatError) as error:
        list(common.read_rows(tmp_path / "table.csv", ["id", "label"], "a table"))
    assert message in str(error.value)


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
        "chestxray14": ("nih_input", lambda i, o: chestxray14.prepare(i, o, 1.0), "chestxray14_test.csv"),
        "chexpert_5x200": ("chexpert_input", lambda i, o: chexpert_5x200.prepare(i / "chexpert_5x200.csv", o),
                          "chexpert_5x200.csv"),
        "lc25000_lung": ("lc25000_input", lambda i, o: lc25000.prepare(i, o), "lc25000_lung.csv"),
        "lc25000_colon": ("lc25000_input", lambda i, o: lc25000.prepare(i, o), "lc25000_colon.csv"),
        "mhist": ("mhist_input", lambda i, o: mhist.prepare(i, o), "mhist_test.csv"),
    }[dataset]
    fixture, run, table = prepare
    data = request.getfixturevalue(fixture)
    run(data, tmp_path)
    root = data[0] if dataset == "siim" else data
    if dataset == "chexpert_5x200":  # only the first ten images exist in the fixture
        rows = read_csv(tmp_path / table)[:10]
        with (tmp_path / table).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["Path", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return root, tmp_path / table


@pytest.mark.parametrize("dataset", sorted(evaluation.BENCHMARKS))
def test_zero_shot_eval_end_to_end(dataset, tiny_hub_folder, request, tmp_path):
    root, table = _prepared(dataset, request, tmp_path)
    output = tmp_path / "results.json"
    status = evaluate_cli.main(["--dataset", dataset, "--model", str(tiny_hub_folder), "--data-root", str(root),
                              "--table", str(table), "--output", str(output), "--batch-size", "4", "--bootstrap", "20"])
    assert status == 0
    saved = json.loads(output.read_text())["datasets"][dataset]
    benchmark = evaluation.BENCHMARKS[dataset]
    probabilities = [image["probabilities"] for image in saved["images"]]
    assert saved["num_images"] == len(probabilities) > 0 and saved["classes"] == list(benchmark.classes.values())
    references = evaluation.read_benchmark(benchmark, table, root)[1]
    expected = (multilabel_metrics if benchmark.target is None else classification_metrics)(probabilities, references)
    assert saved["metrics"] == json_safe(expected)  # an undefined AUC (NaN) is written as null
    published = {"rsna": 87.19, "chexpert_5x200": 49.8, "mhist": 57.27, "lc25000_lung": 84.03, "lc25000_colon": 90.39}
    assert (saved["published"] or {}).get("value") == published.get(dataset)
    # The report, as written, is what ace-lora-publish --results puts on a model card (in percent).
    on_card = {r.metric_type: r.metric_value for r in evaluation_results(json.loads(output.read_text()), output)}
    assert on_card == {METRICS[key][0]: round(100 * value, 2) for key, value in saved["metrics"].items()
                       if key in METRICS and value is not None}


def test_nih_subgroups_are_the_metrics_of_each_subset(nih_input, tiny_hub_folder, tmp_path):
    chestxray14.prepare(nih_input, tmp_path, 1.0)
    table, output = tmp_path / chestxray14.TABLE, tmp_path / "results.json"
    assert evaluate_cli.main(["--dataset", "chestxray14", "--model", str(tiny_hub_folder), "--data-root",
                              str(nih_input), "--table", str(table), "--output", str(output), "--bootstrap", "5",
                              "--subgroup-columns", "sex,age_group,view"]) == 0
    saved = json.loads(output.read_text())["datasets"]["chestxray14"]
    probabilities = np.array([image["probabilities"] for image in saved["images"]])
    references = np.array(evaluation.read_benchmark(evaluation.BENCHMARKS["chestxray14"], table, nih_input)[1])
    rows = read_csv(table)
    for column in ("sex", "age_group", "view"):
        for value, group in saved["subgroups"][column]["groups"].items():
            chosen = np.array([row[column] == value for row in rows])
            assert group["num_images"] == chosen.sum()
            assert group["metrics"]["auc"] == json_safe(multilabel_metrics(probabilities[chosen],
                                                                           references[chosen])["auc"])


def test_zero_shot_eval_writes_its_report_only_as_json(lc25000_input, tiny_hub_folder, tmp_path, capsys):
    error = refused(capsys, evaluate_cli, "--dataset", "lc25000_lung", "--model", tiny_hub_folder, "--data-root",
                    lc25000_input, "--output", tmp_path / "report.csv")
    assert "--output" in error and "report.csv: the report is JSON; name a .json file" in error
    assert not (tmp_path / "report.csv").exists()


def test_zero_shot_eval_rejects_an_image_listed_twice(lc25000_input, tiny_hub_folder, tmp_path, capsys):
    image = "lung_image_sets/lung_n/lung_n1.jpeg"
    write_rows(tmp_path / "lung.csv", ["Path", "label"], [[image, "lung_n"], [image, "lung_aca"]])
    error = refused(capsys, evaluate_cli, "--dataset", "lc25000_lung", "--model", tiny_hub_folder, "--data-root",
                    lc25000_input, "--table", tmp_path / "lung.csv")
    assert f"lung.csv, line 3: column 'Path' lists '{image}' again (first on line 2)" in error


def test_zero_shot_eval_rejects_an_unknown_label(lc25000_input, tiny_hub_folder, tmp_path, capsys):
    write_rows(tmp_path / "lung.csv", ["Path", "label"], [["lung_image_sets/lung_n/lung_n1.jpeg", "lung_xyz"]])
    error = refused(capsys, evaluate_cli, "--dataset", "lc25000_lung", "--model", tiny_hub_folder, "--data-root",
                    lc25000_input, "--table", tmp_path / "lung.csv")
    assert "lung.csv, line 2: column 'label' is 'lung_xyz'; expected one of ['lung_aca', 'lung_n', 'lung_scc']." in error


# ------------------------------------------------------------------------------------------------- bad rows


# Where a bad line goes, per table: (command line, input fixture, the table, files linked beside it, the cases).
BAD_ROW_TABLES = {
    "rsna": (rsna, "rsna_input", rsna.LABELS_FILE, [rsna.IMAGES_DIR], RSNA_BAD_ROWS),
    "siim": (siim, "siim_input", siim.LABELS_FILE, [siim.IMAGES_DIR], SIIM_BAD_ROWS),
    "nih": (chestxray14, "nih_input", chestxray14.ENTRIES_FILE, ["test_list.txt", "images_001"], NIH_BAD_ENTRIES),
    "mhist": (mhist, "mhist_input", mhist.ANNOTATIONS_FILE, ["images"], MHIST_BAD_ROWS),
    "chexpert": (chexpert_5x200, "chexpert_input", chexpert_5x200.TABLE, [], CHEXPERT_BAD_ROWS),  # --input: the table
    **{f"mimic {key}": (mimic_cxr, "mimic_input", table, ["files", *(t for k, t in MIMIC_TABLES.items() if k != key)],
                        MIMIC_BAD_ROWS[key]) for key, table in MIMIC_TABLES.items()},
}


@pytest.mark.parametrize("table, case", [(t, case) for t, (*_, cases) in BAD_ROW_TABLES.items() for case in cases])
def test_a_bad_row_is_refused_naming_its_file_line_column_and_value(table, case, request, tmp_path, capsys):
    module, fixture, name, linked, cases = BAD_ROW_TABLES[table]
    line, message = cases[case]
    root = request.getfixturevalue(fixture)
    number = input_beside(root[0] if table == "siim" else root, tmp_path / "in", name, line, *linked)
    source = tmp_path / "in" / name if table == "chexpert" else tmp_path / "in"
    error = refused(capsys, module, "--input", source, "--output", tmp_path / "out")
    assert f"{name}, line {number}" in error and message in error
    assert not (tmp_path / "out").exists()  # nothing written, not even the --output folder


# -------------------------------------------------------------------------------------- outputs and command lines


def test_a_second_run_on_the_same_output_folder_is_refused(lc25000_input, tmp_path, capsys):
    with folder_lock(tmp_path / "out"):  # as a run in progress holds it (the lock is per open file, so this works)
        error = refused(capsys, lc25000, "--input", lc25000_input, "--output", tmp_path / "out")
    assert "is in use by another running job" in error and files_under(tmp_path / "out") == []
    succeeds(lc25000, "--input", lc25000_input, "--output", tmp_path / "out")


def test_a_table_failing_to_write_leaves_none_of_the_tables(rsna_input, tmp_path, capsys, monkeypatch):
    write_rows, written = common.write_rows, []

    def disk_full_at_the_second_table(file, columns, rows):
        written.append(file)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", "rsna_detection.csv")
        return write_rows(file, columns, rows)

    monkeypatch.setattr(common, "write_rows", disk_full_at_the_second_table)
    error = refused(capsys, rsna, "--input", rsna_input, "--output", tmp_path / "out")
    assert "no space left on the device" in error and not (tmp_path / "out").exists()


def test_the_dispatcher_knows_every_dataset_and_runs_one(lc25000_input, tmp_path):
    scripts = sorted(path.stem for path in (REPO_ROOT / "dataset_prep").glob("[!_]*.py"))
    assert [name.replace("-", "_") for name in dispatcher.DATASETS] == scripts  # training-set: training_set.py
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dispatcher.main, ["lc25000", "--input", str(lc25000_input), "--output", str(tmp_path)])
    assert exit_info.value.code == 0 and len(read_csv(tmp_path / "lc25000_colon.csv")) == 4


# As after `pip install -e .`: the checkout's packages importable from anywhere.
INSTALLED = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def run_together(*commands, cwd) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each command, started together: each start imports torch, which is slow."""
    processes = [subprocess.Popen([sys.executable, *map(str, command)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=INSTALLED, cwd=cwd) for command in commands]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append((process.returncode, out, err))
    return results


@pytest.mark.parametrize("script", dispatcher.DATASETS)
def test_scripts_run_from_the_command_line(script, capsys, monkeypatch):
    """Each file's `__main__` block, in-process (a new process per file would import torch seven times); the
    lc25000 and rsna tests below start real processes."""
    path = REPO_ROOT / "dataset_prep" / f"{script.replace('-', '_')}.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--input" in out and "--overwrite" in out


def test_installed_modules_and_the_dispatcher_run(rsna_input, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dispatcher.main, ["rsna", "--help"])
    assert exit_info.value.code == 0 and "usage: ace-lora-prepare rsna [-h] --input INPUT" in capsys.readouterr().out
    rsna.prepare(rsna_input, tmp_path / "done")
    module, dispatched = run_together(["-m", "dataset_prep.rsna", "--input", rsna_input, "--output", tmp_path / "new"],
                                      ["-m", "dataset_prep", "rsna", "--input", rsna_input, "--output",
                                       tmp_path / "done"], cwd=tmp_path)
    assert module[0] == 0 and "wrote" in module[1] and (tmp_path / "new" / "rsna_detection.csv").is_file()
    assert dispatched[0] == EXIT_USER_ERROR and "Traceback" not in dispatched[2]
    assert dispatched[2].splitlines()[-1].endswith("rsna_classification.csv exists; pass --overwrite to replace it, "
                                                   "or choose another name.")


def test_lc25000_command_line_run(lc25000_input, tmp_path):
    command = [REPO_ROOT / "dataset_prep" / "lc25000.py", "--input", lc25000_input, "--output", tmp_path]
    assert run_together(command, cwd=tmp_path)[0][0] == 0
    assert len(read_csv(tmp_path / "lc25000_lung.csv")) == 6
    code, _, err = run_together(command, cwd=tmp_path)[0]
    assert code == EXIT_USER_ERROR and "--overwrite" in err and "Traceback" not in err


def test_release_tables_are_read_as_a_stream(tmp_path):
    """An 11 MB table (gzip) costs the reader a few hundred kB, not the table's size."""
    import tracemalloc

    lines = b"".join(b"%d,%d,5%07d,PA\n" % (index, 10000000 + index, index) for index in range(400_000))
    path = tmp_path / "metadata.csv.gz"
    path.write_bytes(gzip.compress(b"dicom_id,subject_id,study_id,ViewPosition\n" + lines, compresslevel=1))
    tracemalloc.start()
    count = sum(1 for _ in common.read_rows(path, ["dicom_id", "ViewPosition"], "a metadata table"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 400_000 and len(lines) > 11_000_000 and peak < 1_000_000
