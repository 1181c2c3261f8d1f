"""Formulas planted in image names, labels and report text never reach a spreadsheet as formulas, and every CSV the
package writes reads back cell for cell through its own readers."""

import csv

import pytest

from ace_lora_hf.data.csv_cells import defused, restored
from ace_lora_hf.data.tables import read_rows
from ace_lora_hf.outputs.result_files import ResultsFile
from dataset_prep._common import write_tables


FORMULAS = ["=HYPERLINK(\"http://x\",\"click\")", "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "'=already quoted",
            "''-x"]
PLAIN = ["-1", "-0.25", "+3", "1e-3", "-1E+5", ".5", "pneumonia", "'quoted", "", "a=b"]


@pytest.mark.parametrize("text", FORMULAS + PLAIN)
def test_every_cell_reads_back_as_written(text):
    assert restored(defused(text)) == text


@pytest.mark.parametrize("text", FORMULAS)
def test_formula_text_is_prefixed(text):
    assert defused(text) == "'" + text


@pytest.mark.parametrize("text", PLAIN)
def test_numbers_and_plain_text_are_written_as_they_are(text):
    assert defused(text) == text


def _spreadsheet_cells(path):
    """Every cell as a spreadsheet reads it: none may start a formula."""
    with path.open(newline="", encoding="utf-8") as file:
        return [cell for row in csv.reader(file) for cell in row]


def test_classification_results_defuse_image_names_and_labels_and_resume_exactly(tmp_path):
    labels = ["=cmd|' /C calc'!A0", "No Finding"]
    records = [{"image": "@evil.png", "probabilities": {labels[0]: 0.25, labels[1]: 0.75}, "prediction": labels[1]},
               {"image": "-rf.dcm", "error": "=not an image"}]
    output = tmp_path / "results.csv"
    results = ResultsFile(output, labels)
    results.write(records)
    results.finish({})
    cells = _spreadsheet_cells(output)
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    resumed = ResultsFile(output, labels, resume=True)
    assert resumed.records == records[:1]  # errors run again on --resume
    assert resumed.done == {"@evil.png"}


def test_prepared_tables_defuse_report_text_and_read_back_through_the_table_reader(tmp_path):
    rows = [{"image": "=a.jpg", "report": "-Pneumonia. No effusion.", "label": "-1"},
            {"image": "b.jpg", "report": "+ small opacity", "label": "1"}]
    write_tables(tmp_path, {"table.csv": (rows, ["image", "report", "label"])})
    path = tmp_path / "table.csv"
    assert "-1" in _spreadsheet_cells(path)  # MIMIC's uncertain label stays a number
    assert not [cell for cell in _spreadsheet_cells(path) if cell[:1] in ("=", "+", "@") or cell.startswith("-P")]
    read = [row.cells for row in read_rows(path, ["image", "report", "label"], "a table")]
    assert read == rows
