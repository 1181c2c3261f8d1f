"""The pipeline benchmark runs in-process and reports every figure (timings are not asserted)."""

import importlib
import json
import sys

import pytest

from conftest import REPO_ROOT


@pytest.fixture
def bench_pipeline(monkeypatch):
    """The benchmark imported afresh with its own `_common` (test_dataset_prep imports dataset_prep's by that name)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    for name in ("_common", "bench_pipeline"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("bench_pipeline")


def test_every_section_reports_every_figure(bench_pipeline, tiny_hub_folder, tmp_path, capsys):
    written = tmp_path / "results.json"
    results = bench_pipeline.main(["--rounds", "1", "--images", "2", "--size", "256", "--json", str(written),
                                   "--model", str(tiny_hub_folder), "--e2e-images", "4", "--e2e-rounds", "1",
                                   "--batch-size", "2", "--num-workers", "1"])
    assert json.loads(written.read_text()) == results
    rows = results["decode_and_preprocess"]
    assert [row["input"] for row in rows] == ["256x256 16-bit DICOM, VOI window", "256x256 8-bit grayscale PNG"]
    for row in rows:
        assert row["old_images_per_s"] > 0 and row["new_images_per_s"] > 0 and row["speedup"] > 0
        assert row["max_abs_pixel_value_difference"] <= 1e-5
    for row in results["end_to_end"]:
        assert row["images"] == 4 and row["model_images_per_s"] > 0 and row["pipeline_over_model"] > 0
    assert [row["dtype"] for row in results["end_to_end"]] == ["float32", "bfloat16"]
    assert results["lora_merge"]["merged_speedup"] > 0 and results["allocator"]["tuned_speedup"] > 0
    printed = capsys.readouterr().out
    assert "Decode + preprocess per worker" in printed and "End to end" in printed and "allocator" in printed
