"""Image-report retrieval: hand-checked ranks and metrics, the table reader's errors, and an end-to-end run whose
embeddings are cached, reused and recomputed when the table changes."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from ace_lora_hf import AceLoraTextModel, AceLoraVisionModel
from ace_lora_hf.cli import retrieval as retrieval_cli
from ace_lora_hf.evaluation import retrieval
from ace_lora_hf.cli.common import EXIT_INPUTS_SKIPPED
from ace_lora_hf.errors import DataFormatError, OutputPathError
from ace_lora_hf.models.ace_lora.image_loading import load_image
from ace_lora_hf.evaluation.retrieval import (TableColumns, TableEmbeddings, evaluate, rank_metrics, read_pairs, retrieval_metrics,
                                  retrieval_ranks, table_embeddings)

from conftest import SAMPLES


# Query i's own candidate is i; pairs 0 and 2 share their report text.
SIMILARITY = torch.tensor([[0.90, 0.1, 0.3, 0.2],
                           [0.80, 0.7, 0.1, 0.0],
                           [0.95, 0.6, 0.5, 0.9],
                           [0.10, 0.4, 0.3, 0.4]])
PAIRS = torch.arange(4)
SAME_REPORT = torch.tensor([0, 1, 0, 2])


def test_ranks_by_hand():
    # q0: nothing beats 0.9. q1: 0.8 beats 0.7. q2: 0.95, 0.6 and 0.9 beat 0.5. q3: 0.4 ties with 0.4 (counts against).
    assert retrieval_ranks(SIMILARITY, PAIRS, PAIRS).tolist() == [1, 2, 4, 2]
    # q2's best correct candidate is now c0 (0.95, the same report as c2); q0 has two correct ones, the best first.
    assert retrieval_ranks(SIMILARITY, SAME_REPORT, SAME_REPORT).tolist() == [1, 2, 1, 2]
    # Reports as queries (the transpose): r0's 0.9 is beaten by 0.95, r3's 0.4 by 0.9.
    assert retrieval_ranks(SIMILARITY.t(), PAIRS, PAIRS).tolist() == [2, 1, 1, 2]


def test_recall_and_median_rank_by_hand():
    assert rank_metrics(torch.tensor([1, 2, 4, 2]), recall_at=(1, 2, 3)) == {
        "recall@1": 0.25, "recall@2": 0.75, "recall@3": 0.75, "median_rank": 2.0}
    assert rank_metrics(torch.tensor([1, 2, 1, 2])) == {
        "recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "median_rank": 1.5}
    assert rank_metrics(torch.tensor([12, 1, 7]))["median_rank"] == 7.0


def test_both_directions_from_embeddings_in_chunks(monkeypatch):
    monkeypatch.setattr(retrieval, "QUERY_CHUNK", 3)  # 4 queries: a chunk of 3 and one of 1
    # Image i is the i-th unit vector and report j's row is column j of SIMILARITY: images @ reports.T == SIMILARITY.
    metrics = retrieval_metrics(torch.eye(4), SIMILARITY.t(), PAIRS)
    assert metrics["image_to_report"] == rank_metrics(torch.tensor([1, 2, 4, 2]))
    assert metrics["report_to_image"] == rank_metrics(torch.tensor([2, 1, 1, 2]))


# ------------------------------------------------------------------------------------------------------ table


def test_csv_and_json_lines_give_the_same_pairs(tmp_path):
    rows = [{"image": "a.png", "report": " No acute\n process. ", "split": "test"},
            {"image": "b/c.dcm", "report": "Effusion.", "split": "train"},
            {"image": "/abs/d.png", "report": "Pneumothorax.", "split": "test"}]
    csv_table = tmp_path / "pairs.csv"
    csv_table.write_text('image,report,split\na.png," No acute\n process. ",test\nb/c.dcm,Effusion.,train\n'
                         "/abs/d.png,Pneumothorax.,test\n")
    jsonl_table = tmp_path / "pairs.jsonl.gz"
    jsonl_table.write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    for table, lines in ((csv_table, [2, 5]), (jsonl_table, [1, 3])):
        pairs = read_pairs(table, split="test")
        assert pairs.images == [str(tmp_path / "a.png"), "/abs/d.png"]
        assert pairs.reports == ["No acute process.", "Pneumothorax."] and pairs.lines == lines
    assert read_pairs(csv_table, image_root=tmp_path / "root").images[1] == str(tmp_path / "root" / "b/c.dcm")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("t.csv", b"image,text\na.png,x\n", r"t.csv: missing column\(s\) 'report'"),
    ("t.csv", b"image,report\na.png,  \n", r"t.csv, line 2, column 'report' is empty; expected the report text"),
    ("t.csv", b"image,report\n,x\n", r"t.csv, line 2, column 'image' is empty; expected an image path"),
    ("t.csv", b"image,report\na.png,caf\xe9\n", r"t.csv, line 2, column 'report' is 'caf.*': not UTF-8 text"),
    ("t.jsonl", b'{"image": "a.png", "report": "x"}\n{"image": "b.png"}\n',
     r"t.jsonl, line 2: no 'report' field; found \['image'\]. Name yours with --image-column"),
    ("t.jsonl", b'{"image": "a.png", "report": ["x"]}\n', r"t.jsonl, line 1, column 'report' is \['x'\]; expected text"),
    ("t.jsonl", b'{"image": "a.png", "report": "x"\n', r"t.jsonl, line 1: not JSON"),
    ("t.jsonl", b'{"image": "a.png", "report": "x"}\n\xff\n', r"t.jsonl, line 2: not UTF-8 text"),
    ("t.jsonl", b'["a.png", "x"]\n', r"t.jsonl, line 1 is \['a.png', 'x'\]; write one JSON object per line"),
    ("t.txt", b"image,report\n", r"expected a .csv or .jsonl table"),
])
def test_bad_tables_are_refused_naming_line_column_and_fix(tmp_path, name, content, message):
    table = tmp_path / name
    table.write_bytes(content)
    with pytest.raises(DataFormatError, match=message):
        read_pairs(table)


def test_a_split_without_rows_is_refused_naming_the_splits_found(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("image,report,part\na.png,x,train\nb.png,y,validate\n")
    with pytest.raises(DataFormatError, match=r"no image-report pairs with part = 'test' \(found \['train', 'validate'\]\)"):
        read_pairs(table, columns=TableColumns(split="part"), split="test")


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def forward_calls(monkeypatch) -> list[str]:
    """Every tower forward that computes embeddings, by tower."""
    calls = []
    for tower in (AceLoraVisionModel, AceLoraTextModel):
        def counted(self, *args, _original=tower.get_token_features, _name=tower.__name__, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(tower, "get_token_features", counted)
    return calls


def write_table(path, reports: list[str]) -> None:
    images = ["nih_00000001_000.png", "fake_monochrome1.dcm", "missing.png", "nih_00027426_000.png",
              "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]
    path.write_text("\n".join(json.dumps({"image": image, "report": report}) for image, report in zip(images, reports)))


REPORTS = ["Cardiomegaly.", "No acute process.", "Left effusion.", "No acute process.", "Right pneumothorax."]


def run_retrieval(tiny_hub_folder, tmp_path, table, *extra) -> tuple[int, dict]:
    output = tmp_path / "results.json"
    code = retrieval_cli.main(["--table", str(table), "--image-root", str(SAMPLES), "--model", str(tiny_hub_folder),
                           "--cache-dir", str(tmp_path / "cache"), "--output", str(output), "--overwrite",
                           "--num-workers", "0", "--batch-size", "2", *extra])
    return code, json.loads(output.read_text())


def test_end_to_end_with_cached_embeddings(tiny_hub_folder, tmp_path, forward_calls):
    table = tmp_path / "pairs.jsonl"
    write_table(table, REPORTS)
    code, first = run_retrieval(tiny_hub_folder, tmp_path, table)
    assert code == EXIT_INPUTS_SKIPPED
    assert first["skipped"] == [{"line": 3, "image": str(SAMPLES / "missing.png"), "error": "file not found"}]
    assert (first["pairs"], first["distinct_reports"], first["embeddings"]["reused"]) == (4, 3, False)
    assert set(first["metrics"]) == {"ace", "plain"}
    assert set(first["metrics"]["ace"]) == {"image_to_report", "report_to_image"}
    # One forward per batch of images (3 batches of 2) and of distinct reports (4 texts, 2 batches).
    assert forward_calls == ["AceLoraVisionModel"] * 3 + ["AceLoraTextModel"] * 2

    forward_calls.clear()
    code, second = run_retrieval(tiny_hub_folder, tmp_path, table)
    assert forward_calls == [] and second["embeddings"] == {**first["embeddings"], "reused": True}
    assert (code, second["metrics"], second["skipped"]) == (EXIT_INPUTS_SKIPPED, first["metrics"], first["skipped"])

    write_table(table, REPORTS[:-1] + ["Small right pneumothorax."])
    _, changed = run_retrieval(tiny_hub_folder, tmp_path, table)
    assert not changed["embeddings"]["reused"] and changed["embeddings"]["file"] != first["embeddings"]["file"]
    assert forward_calls.count("AceLoraTextModel") == 2


def test_one_forward_gives_the_models_ace_and_plain_embeddings(tiny_hub_folder, tmp_path):
    model, processor = AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)
    images = [str(SAMPLES / name) for name in ("nih_00000001_000.png", "missing.png", "fake_monochrome1.dcm")]
    reports = ["Cardiomegaly.", "No acute process.", "Left effusion."]
    embeddings, _, reused = table_embeddings(model, processor, images, reports, tmp_path, batch_size=2, num_workers=0,
                                             device=torch.device("cpu"))
    assert not reused and embeddings.image_index.tolist() == [0, 2]
    assert embeddings.failures == [(1, "file not found")]
    pixels = processor(images=[load_image(images[0]), load_image(images[2])], return_tensors="pt")["pixel_values"]
    tokens = processor(text=reports, return_tensors="pt")
    with torch.no_grad():
        for which, use_hgnn in enumerate((True, False)):  # ACE, then plain
            expected_images = model.get_image_features(pixels, use_hgnn=use_hgnn).pooler_output
            expected_reports = model.get_text_features(**tokens, use_hgnn=use_hgnn).pooler_output
            torch.testing.assert_close(embeddings.images[:, which], expected_images, rtol=0, atol=1e-5)
            torch.testing.assert_close(embeddings.reports[:, which], expected_reports, rtol=0, atol=1e-5)


def test_evaluation_by_report_text_and_by_pair():
    # Pairs 0 and 1 share report 0; pair 3's image failed. Image i is the i-th unit vector, report 0 is image 0's,
    # report 1 image 2's: image 0 scores [1, 1, 0] against the pairs' reports, image 1 [0, 0, 0], image 2 [0, 0, 1].
    unit = torch.eye(3)
    embeddings = TableEmbeddings(image_index=torch.tensor([0, 1, 2]), images=torch.stack([unit, -unit], dim=1),
                                 reports=torch.stack([unit[[0, 2]], -unit[[0, 2]]], dim=1), failures=[(3, "broken")])
    report_ids = torch.tensor([0, 0, 1, 1])
    by_text, by_pair = evaluate(embeddings, report_ids, "report-text"), evaluate(embeddings, report_ids, "pair")
    assert set(by_text) == {"ace", "plain"}
    # By text: image 1's best correct report (0) ties with pair 2's (0): rank 2. By pair, image 0's own report ties
    # with its copy (pair 1): rank 2, and image 1's ties with both others: rank 3.
    assert by_text["ace"]["image_to_report"] == rank_metrics(torch.tensor([1, 2, 1]))
    assert by_pair["ace"]["image_to_report"] == rank_metrics(torch.tensor([2, 3, 1]))
    assert by_text["plain"] == by_text["ace"]  # the negated embeddings give the same similarities


def test_output_is_checked_before_any_work(tiny_hub_folder, tmp_path, forward_calls):
    table = tmp_path / "pairs.jsonl"
    write_table(table, REPORTS)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(OutputPathError, match="exists; pass --overwrite"):
        retrieval_cli.main(["--table", str(table), "--model", str(tiny_hub_folder), "--output",
                        str(tmp_path / "results.json")])
    with pytest.raises(OutputPathError, match="also an input"):
        retrieval_cli.main(["--table", str(table), "--model", str(tiny_hub_folder), "--output", str(table), "--overwrite"])
    image = tmp_path / "images" / "nih_00000001_000.png"  # an image of the table, named as the output
    image.parent.mkdir()
    shutil.copy(SAMPLES / image.name, image)
    with pytest.raises(OutputPathError, match="also an input"):
        retrieval_cli.main(["--table", str(table), "--image-root", str(image.parent), "--model",
                            str(tiny_hub_folder), "--output", str(image), "--overwrite"])
    assert image.read_bytes() == (SAMPLES / image.name).read_bytes()
    (tmp_path / "cache_file").write_text("not a folder")
    with pytest.raises(OutputPathError, match="--cache-dir: .*cache_file is a file, not a folder"):
        retrieval_cli.main(["--table", str(table), "--model", str(tiny_hub_folder), "--cache-dir",
                        str(tmp_path / "cache_file")])
    assert forward_calls == []


def test_a_cache_entry_holding_another_tables_embeddings_is_never_used(tiny_hub_folder, tmp_path, forward_calls):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_table(small, REPORTS[:2])
    write_table(large, REPORTS)
    run_retrieval(tiny_hub_folder, tmp_path, small)
    _, first = run_retrieval(tiny_hub_folder, tmp_path, large)
    small_entry, large_entry = (Path(result["embeddings"]["file"]) for result in
                                (run_retrieval(tiny_hub_folder, tmp_path, small)[1], first))
    shutil.copy(small_entry, large_entry)  # the large table's entry now holds the small table's tensors
    forward_calls.clear()
    _, again = run_retrieval(tiny_hub_folder, tmp_path, large)
    assert not again["embeddings"]["reused"] and forward_calls  # computed again, not the 2 pairs for a table of 4
    assert again["metrics"] == first["metrics"] and again["pairs"] == first["pairs"] == 4
