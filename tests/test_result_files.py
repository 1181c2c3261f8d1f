"""--resume continues only results of the same run: provenance beside the results, one row per input of this run."""

import csv

import pytest

from ace_lora_hf.errors import OutputPathError
from ace_lora_hf.outputs.result_files import ResultsFile, partial_path, provenance_path


LABELS = ["No Finding", "pneumonia"]
RUN = {"model": "sha256:aaaa", "templates": ["a chest X-ray image of {}."], "inputs": "sha256:1111"}


def _record(image: str, p: float = 0.25) -> dict:
    return {"image": image, "probabilities": {LABELS[0]: p, LABELS[1]: 1 - p}, "prediction": LABELS[1]}


def _interrupted_run(path, records, provenance=RUN):
    """A run stopped after writing `records`: its .partial and provenance stay, as after Ctrl-C."""
    results = ResultsFile(path, LABELS, provenance=provenance)
    results.write(records)
    results._file.close()


@pytest.mark.parametrize("changed", [{"templates": ["Findings suggesting {}."]}, {"model": "sha256:bbbb"},
                                     {"inputs": "sha256:2222"}])
def test_resuming_the_results_of_another_run_is_refused_naming_what_differs(tmp_path, changed):
    output = tmp_path / "results.csv"
    _interrupted_run(output, [_record("a.png")])
    before = partial_path(output).read_bytes()
    (key,) = changed
    with pytest.raises(OutputPathError, match=f"produced with another {key} than this run"):
        ResultsFile(output, LABELS, resume=True, provenance={**RUN, **changed})
    assert partial_path(output).read_bytes() == before


@pytest.mark.parametrize("name", ["results.csv", "results.jsonl"])
def test_other_labels_are_another_run_too(tmp_path, name):
    output = tmp_path / name
    _interrupted_run(output, [_record("a.png")])
    with pytest.raises(OutputPathError, match="has other columns|not a result of these labels"):
        ResultsFile(output, ["normal", "pneumonia"], resume=True, provenance=RUN)


def test_results_without_provenance_are_not_resumed(tmp_path):
    output = tmp_path / "results.csv"
    _interrupted_run(output, [_record("a.png")])
    provenance_path(output).unlink()
    with pytest.raises(OutputPathError, match="has no results.csv.meta.json saying what produced it"):
        ResultsFile(output, LABELS, resume=True, provenance=RUN)


def test_resume_keeps_one_row_per_image_of_this_run(tmp_path):
    output = tmp_path / "results.csv"
    _interrupted_run(output, [_record("a.png", 0.1), _record("a.png", 0.9), _record("elsewhere.png")])
    resumed = ResultsFile(output, LABELS, resume=True, provenance=RUN, inputs=["a.png", "b.png"])
    assert resumed.records == [_record("a.png", 0.1)] and resumed.done == {"a.png"}
    resumed.write([_record("b.png")])
    resumed.finish({})
    with output.open(newline="") as file:
        assert [row["image"] for row in csv.DictReader(file)] == ["a.png", "b.png"]


@pytest.mark.parametrize("name", ["results.csv", "results.jsonl"])
@pytest.mark.parametrize("image", ["two\nlines.png", "carriage\rreturn.png", "line\u2028separator.png",
                                   "both\r\n.png"])
def test_file_names_with_line_breaks_resume_exactly(tmp_path, name, image):
    output = tmp_path / name
    _interrupted_run(output, [_record(image), _record("plain.png")])
    resumed = ResultsFile(output, LABELS, resume=True, provenance=RUN, inputs=[image, "plain.png", "c.png"])
    assert resumed.records == [_record(image), _record("plain.png")]
