"""`ace-lora-prepare training-set`: a prepared set gives the file route's pixel values exactly and the same loss,
keeps patients in one split, resumes after an interruption and is pushed privately with the licence warning."""

import csv
import re
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from transformers import AutoModel, AutoProcessor

from ace_lora_hf import AceLoraImageProcessor
from ace_lora_hf.data import prepared
from ace_lora_hf.data.image_tables import ImageTextCollator, ImageTextColumns, load_image_text_dataset
from ace_lora_hf.data.pixels import PixelTable, stacked_pixels
from ace_lora_hf.data.prepared import check_column_names
from ace_lora_hf.errors import DataFormatError
from ace_lora_hf.models.ace_lora.image_loading import load_image
from dataset_prep.__main__ import main as prepare_main

from dicom_fixtures import write_dicom
from test_training import run_cli_in_process, write_csv


LABELS = ["No Finding", "Pneumonia"]


@pytest.fixture(scope="module")
def image_table(tmp_path_factory):
    """Ten images of five patients in every kind the loader reads: 8-bit grayscale PNG, RGB JPEG, 16-bit PNG and
    DICOM, at sizes whose resize and center crop round differently."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(1)
    rows = []
    for index in range(10):
        height, width = 250 + 7 * index, 301 - 5 * index
        kind = ("gray.png", "rgb.jpg", "deep.png", "dcm")[index % 4]
        name = f"{index:02d}_{kind}"
        if kind == "gray.png":
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(root / name)
        elif kind == "rgb.jpg":
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name, quality=90)
        elif kind == "deep.png":
            Image.fromarray(rng.integers(0, 4096, (height, width), dtype=np.uint16)).save(root / name)
        else:
            write_dicom(root / name, rng.integers(0, 4096, (height, width), dtype=np.uint16), BitsStored=12,
                        HighBit=11)
        rows.append({"image": name, "report": f"no finding {index}", "No Finding": 1 if index % 2 else "",
                     "Pneumonia": (-1, 0, "")[index % 3], "subject": f"p{index // 2}"})
    write_csv(root / "train.csv", rows)
    return root


def prepare(table, output, *extra):
    prepare_main(["training-set", "--input", str(table), "--label-columns", *LABELS, "--output", str(output),
                  *map(str, extra)])


def test_prepared_pixel_values_are_the_files_exactly(image_table, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "CHUNK_ROWS", 3)  # four chunks, for two worker processes
    prepare(image_table / "train.csv", tmp_path / "set", "--num-proc", 2)
    processor = AceLoraImageProcessor()
    saved = datasets.load_from_disk(str(tmp_path / "set"))["train"]
    names = [row["image"] for row in csv.DictReader((image_table / "train.csv").open())]
    assert len(saved) == 10 and saved[0]["image"].size == (224, 224)
    for row in saved:
        stored, original = row["image"], load_image(image_table / names[row["line"] - 2])
        assert stored.mode == original.mode  # one channel where the source is grayscale
        from_file = processor(original, return_tensors="pt")["pixel_values"]
        from_set = processor(load_image(stored), return_tensors="pt")["pixel_values"]
        assert (from_set - from_file).abs().max().item() == 0.0


def test_a_batch_from_the_prepared_set_has_the_files_loss(image_table, tiny_hub_folder, tmp_path):
    prepare(image_table / "train.csv", tmp_path / "set", "--model", tiny_hub_folder)
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    columns = ImageTextColumns(labels=LABELS)
    files = list(load_image_text_dataset(image_table / "train.csv", columns))
    saved = datasets.load_from_disk(str(tmp_path / "set"))["train"].cast_column("image", datasets.Image(decode=False))
    from_files = ImageTextCollator(processor)(files)
    from_set = ImageTextCollator(processor, columns=ImageTextColumns(labels=LABELS),
                                 uint8_pixels=True)(list(saved))
    assert from_set["pixel_values"].dtype == torch.uint8 and from_set["pixel_values"].shape == (10, 3, 32, 32)
    from_set["pixel_values"] = PixelTable(processor.image_processor)(from_set["pixel_values"])
    assert from_files.keys() == from_set.keys()
    for key in from_files:
        assert torch.equal(from_files[key].nan_to_num(7), from_set[key].nan_to_num(7)), key
    model = AutoModel.from_pretrained(tiny_hub_folder).eval()
    with torch.no_grad():
        losses = [model(**{key: batch[key] for key in ("pixel_values", "input_ids", "labels")}).loss.item()
                  for batch in (from_files, from_set)]
    assert losses[0] == losses[1]


def test_pixel_table_finishes_grayscale_batches_exactly(image_table, tmp_path):
    prepare(image_table / "train.csv", tmp_path / "set")
    processor = AceLoraImageProcessor()
    gray = [row["image"] for row in datasets.load_from_disk(str(tmp_path / "set"))["train"] if row["image"].mode == "L"]
    pixels = stacked_pixels(gray)
    assert pixels.shape == (len(gray), 1, 224, 224) and len(gray) == 7
    assert torch.equal(PixelTable(processor)(pixels), processor(gray, return_tensors="pt")["pixel_values"])


def test_validation_split_keeps_each_patient_in_one_split(image_table, tmp_path):
    prepare(image_table / "train.csv", tmp_path / "set", "--patient-column", "subject", "--validation-fraction", 0.4)
    saved = datasets.load_from_disk(str(tmp_path / "set"))
    patients = {name: set(saved[name]["patient"]) for name in ("train", "validation")}
    assert not patients["train"] & patients["validation"]
    assert len(patients["validation"]) == 2 and len(patients["train"]) == 3  # 40% of five patients
    info = json.loads((tmp_path / "set" / prepared.PREPARED_INFO).read_text())
    assert info["patient_disjoint"] is True
    assert info["splits"] == {"train": {"rows": 6, "patients": 3}, "validation": {"rows": 4, "patients": 2}}


def test_an_interrupted_preparation_resumes_with_the_missing_chunks(image_table, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepared, "CHUNK_ROWS", 3)
    table = tmp_path / "train.csv"
    rows = list(csv.DictReader((image_table / "train.csv").open()))
    for row in rows:
        row["image"] = str(image_table / row["image"])
    rows[7]["image"] = str(tmp_path / "corrupt.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_csv(table, rows)
    code, err = run_cli_in_process(prepare_main, ["training-set", "--input", table, "--label-columns", *LABELS,
                                                   "--output", tmp_path / "set"], capsys)
    assert code == 2 and "line 9" in err and "corrupt.png" in err and "run the same command again" in err
    assert not (tmp_path / "set").exists()
    parts = sorted(path.name for path in (tmp_path / ".set.parts").glob("chunk_*.arrow"))
    assert parts == ["chunk_000000.arrow", "chunk_000001.arrow"]  # rows 1-6; the chunk of row 8 failed

    Image.open(image_table / "00_gray.png").save(tmp_path / "corrupt.png")
    written = []
    monkeypatch.setattr(prepared, "_write_chunk", lambda job, write=prepared._write_chunk: written.append(
        job[3].name) or write(job))
    prepare(table, tmp_path / "set")
    assert written == ["chunk_000002.arrow", "chunk_000003.arrow"] and not (tmp_path / ".set.parts").exists()
    resumed = datasets.load_from_disk(str(tmp_path / "set"))["train"]
    monkeypatch.setattr(prepared, "CHUNK_ROWS", 500)
    prepare(table, tmp_path / "fresh")
    fresh = datasets.load_from_disk(str(tmp_path / "fresh"))["train"]
    assert resumed.to_pandas().equals(fresh.to_pandas())


def test_a_bad_option_or_label_is_one_line(image_table, tmp_path, capsys):
    code, err = run_cli_in_process(prepare_main, ["training-set", "--input", image_table / "train.csv",
                                                   "--label-columns", "Fracture", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "'Fracture'" in err
    code, err = run_cli_in_process(prepare_main, ["training-set", "--input", image_table / "train.csv", "--no-labels",
                                                   "--validation-fraction", "1.5", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "--validation-fraction 1.5" in err


def test_a_column_name_the_set_would_use_twice_is_refused(image_table, tmp_path, capsys):
    code, err = run_cli_in_process(prepare_main, ["training-set", "--input", image_table / "train.csv",
                                                   "--label-columns", "Pneumonia", "Pneumonia", "--output",
                                                   tmp_path / "o"], capsys)
    assert code == 2 and err.strip().endswith("error: label column 'Pneumonia' is given twice; name each column once.")
    assert not (tmp_path / "o").exists()
    for columns, message in [
        (ImageTextColumns(image="image", text="report", labels=("line",)),
         "label column 'line': a prepared set keeps each row's table line under that name"),
        (ImageTextColumns(image="patient", text="report"), "image column 'patient': a prepared set keeps each row's "
                                                           "patient id under that name"),
        (ImageTextColumns(image="Path", text="report", labels=("image",)),
         "label column 'image': a prepared set names its images so while it is made"),
        (ImageTextColumns(image="image", text="report", labels=("Edema", "report")),
         "label column 'report' is also the report column"),
    ]:
        with pytest.raises(DataFormatError, match=re.escape(message)):
            check_column_names(columns)


def test_push_to_hub_is_private_and_warns_about_the_licences(image_table, tmp_path, monkeypatch, caplog):
    uploads = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo_id, **kwargs: uploads.append((repo_id, sorted(self), kwargs)))
    metadata = []
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kwargs: metadata.append(kwargs))
    prepare(image_table / "train.csv", tmp_path / "set", "--no-labels", "--push-to-hub", "me/cxr")
    assert uploads == [("me/cxr", ["train"], {"private": True})]
    assert [(m["path_in_repo"], m["repo_id"], m["repo_type"]) for m in metadata] == \
        [("ace_lora_prepared.json", "me/cxr", "dataset")]
    assert json.loads(Path(metadata[0]["path_or_fileobj"]).read_text())["splits"]
    assert "MIMIC-CXR and CheXpert licences forbid redistributing" in caplog.text
    prepare(image_table / "train.csv", tmp_path / "set", "--no-labels", "--overwrite", "--push-to-hub", "me/cxr",
            "--public")
    assert uploads[-1][2] == {"private": False}
