"""The benchmark scripts run as the README shows and report every figure (timings are not asserted here)."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def run_benchmark(script: str, tmp_path, *args) -> tuple[dict, str]:
    results = tmp_path / "results.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / script), *map(str, args), "--json", str(results)]
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads(results.read_text()), finished.stdout


def test_inference_benchmark_measures_bf16_fidelity_on_the_reference_case(converted_dir, tmp_path):
    results, printed = run_benchmark("bench_inference.py", tmp_path, "--model", converted_dir, "--batch-sizes", 1,
                                     "--bf16-batch", 1, "--rounds", 1, "--gemm-size", 512)
    bf16 = results["bf16_towers"]
    assert bf16["argmax_identical"] and bf16["max_abs_probability_difference"] <= 1e-2  # issue #7's bound
    assert bf16["batch"] == 1 and bf16["bf16_gemm_over_fp32_gemm"] > 0
    (encoding,) = results["image_encoding"]
    assert encoding["batch"] == 1 and 0 < encoding["vit_fraction_of_gemm_peak"] and encoding["ace_over_plain"] > 0
    assert encoding["plain_plus_ace_only_over_plain"] > 1
    assert results["class_embedding_cache"]["uncached_over_cached"] > 1
    assert "Image encoding, float32, LoRA merged" in printed and "bfloat16 model" in printed


def test_training_benchmark_times_and_measures_every_configuration(tiny_hub_folder, tmp_path):
    results, printed = run_benchmark("bench_training.py", tmp_path, "--model", tiny_hub_folder, "--batch-size", 2,
                                     "--rounds", 1, "--gemm-size", 512)
    steps = results["steps"]
    assert list(steps) == ["float32", "float32 + checkpointing", "bf16 autocast", "bf16 autocast + checkpointing"]
    for step in steps.values():
        assert step["step_s"] > 0 and step["peak_gb"] >= step["after_loading_gb"] > 0 and step["speedup_over_float32"] > 0
    assert "Training step, batch 2" in printed


def test_data_benchmark_compares_the_prepared_set_with_the_files(tiny_hub_folder, tmp_path):
    results, printed = run_benchmark("bench_data.py", tmp_path, "--model", tiny_hub_folder, "--count", 4, "--height",
                                     300, "--width", 250, "--batch-size", 2, "--rounds", 1, "--cache", tmp_path)
    assert results["max_abs_pixel_difference"] == 0 and results["images"] == 4
    for route in results["routes"].values():
        assert route["load_s_per_sample"] > 0 and route["cores_per_1000_images_per_s"] > 0
        assert route["train_images_per_s"] > 0
    assert results["prepared_speedup_per_sample"] > 0 and "Data loading, 4 JPEGs of 250 x 300" in printed


def test_gpu_check_runs_tiny_on_the_cpu_and_refuses_cleanly_without_cuda(tiny_hub_folder, tmp_path):
    results, printed = run_benchmark("gpu_check.py", tmp_path, "--device", "cpu", "--quick", "--model",
                                     tiny_hub_folder, "--cache", tmp_path)
    assert results["probabilities"] == {"fp32_max_abs_difference": 0.0, "bf16_same_argmax": True}
    assert results["inference"]["images_per_s"] > 0 and results["training"]["peak_gb"] > 0
    assert list(results["loader_images_per_s"]) == ["1", "2"] and printed.startswith("**CPU**")
    assert "| inference, batch 4, bfloat16, sdpa |" in printed
    finished = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                              text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert finished.returncode == 1 and finished.stderr.strip().splitlines() == [
        "gpu_check.py: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or "
        "with --device cpu --quick to check the script."]
