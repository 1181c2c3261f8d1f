"""examples/pretrain.py on Hugging Face datasets: a prepared folder, Parquet files streamed, and a streamed run
that resumes mid-epoch to the uninterrupted run's weights; the stream's order as a count of rows."""

import json
import os
import signal
import subprocess
import sys

import datasets
import pytest
import torch

from ace_lora_hf.training.streaming import StreamingLoader
from dataset_prep.__main__ import main as prepare_main

from test_training import (LABELS, PRETRAIN, accelerate_launch, fresh_accelerate_state, pretrain, run_cli_in_process, run_pretrain,
                           synthetic_data, trainable_weights)


__all__ = ["fresh_accelerate_state", "synthetic_data"]  # fixtures these tests use


def numbers(rows):
    return {"number": torch.tensor([row["number"] for row in rows])}


def stream_of(count, shards):
    return datasets.Dataset.from_dict({"number": list(range(count))}).to_iterable_dataset(num_shards=shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_at_any_step_continues_the_same_order(workers):
    def loader():
        return StreamingLoader(stream_of(23, 3), numbers, batch_size=4, steps_per_epoch=5, seed=7, rank=0,
                               world_size=1, device=torch.device("cpu"), num_workers=workers)

    straight = loader()
    order = [batch["number"] for epoch in range(3) for batch in straight.epoch_batches(epoch)]
    seen = torch.cat(order)
    assert sorted(seen[:23].tolist()) == list(range(23)) and not torch.equal(seen[:23], seen[23:46])  # passes differ
    for epoch, step in ((0, 3), (1, 0), (1, 4), (2, 2)):  # step 6 and later lie in the second pass over the rows
        resumed = [batch["number"] for batch in loader().epoch_batches(epoch, step)]
        assert torch.equal(torch.cat(resumed), torch.cat(order[epoch * 5 + step:(epoch + 1) * 5]))


def test_processes_take_equal_steps_from_uneven_shards():
    batches = []
    for rank in range(2):  # 3 shards of 7, 7 and 6 rows on two processes: 13 and 7 rows
        loader = StreamingLoader(stream_of(20, 3), numbers, batch_size=3, steps_per_epoch=6, seed=0, rank=rank,
                                 world_size=2, device=torch.device("cpu"))
        batches.append([batch["number"] for batch in loader.epoch_batches(0)])
    assert [len(b) for b in batches] == [6, 6] and all(len(batch) == 3 for b in batches for batch in b)
    first, second = torch.cat(batches[0]), torch.cat(batches[1])
    assert sorted(first[:14].tolist()) == list(range(14)) and sorted(second[:6].tolist()) == list(range(14, 20))
    assert set(first.tolist()) == set(range(14)) and set(second.tolist()) == set(range(14, 20))  # every pass


# ---------------------------------------------------------------------------------------------- pretrain.py


@pytest.fixture(scope="module")
def prepared_set(synthetic_data, tiny_hub_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared") / "set"
    prepare_main(["training-set", "--input", str(synthetic_data / "train.csv"), "--split", "train",
                  "--label-columns", *LABELS, "--model", str(tiny_hub_folder), "--output", str(folder)])
    return folder


@pytest.fixture(scope="module")
def parquet_files(prepared_set, tmp_path_factory):
    """The prepared set as two Parquet files of 11 and 9 rows."""
    folder = tmp_path_factory.mktemp("parquet")
    train = datasets.load_from_disk(str(prepared_set))["train"]
    train.select(range(11)).to_parquet(str(folder / "part-0.parquet"))
    train.select(range(11, 20)).to_parquet(str(folder / "part-1.parquet"))
    return folder


def dataset_command(model, dataset, output, *extra):
    return ["--model", str(model), "--dataset_name", str(dataset), "--output_dir", str(output), "--label_columns",
            *LABELS, "--batch_size", "4", "--learning_rate", "1e-2", "--warmup_epochs", "0.5", "--num_workers", "0",
            "--seed", "3", *map(str, extra)]


def test_a_prepared_set_trains(prepared_set, tiny_hub_folder, tmp_path):
    output = tmp_path / "run"
    run_pretrain(dataset_command(tiny_hub_folder, prepared_set, output, "--max_train_steps", 2))
    history = json.loads((output / "training_history.json").read_text())
    assert [(record["step"], record["stopped_by"]) for record in history] == [(2, "max_train_steps")]
    assert history[0]["loss"] > 0 and (output / "final" / "model.safetensors").is_file()


def test_parquet_files_stream_and_train(parquet_files, tiny_hub_folder, tmp_path):
    output = tmp_path / "run"
    run_pretrain(dataset_command(tiny_hub_folder, parquet_files / "*.parquet", output, "--streaming",
                                 "--max_train_steps", 4, "--num_epochs", 2))
    history = json.loads((output / "training_history.json").read_text())
    assert [record["step"] for record in history] == [2, 4]  # two epochs of ceil(4 / 2) steps


def datasets_hub_cache(parquet_files, cache, repo_id: str) -> None:
    """`cache` laid out as `datasets` keeps a Hub dataset it has loaded once online (`owner___name/default/0.0.0/
    HASH`, Arrow files named after the dataset): what an offline `load_dataset(repo_id)` reads."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    builder = Parquet(cache_dir=str(cache), dataset_name=name, hash="0123456789abcdef",
                      data_files={"train": [str(path) for path in sorted(parquet_files.glob("*.parquet"))]})
    builder.download_and_prepare()
    (config,) = (cache / name).iterdir()  # "default-<hash of the data files>", as loaded from the Hub: "default"
    (cache / f"{owner}___{name}").mkdir()
    config.rename(cache / f"{owner}___{name}" / "default")


def test_a_hub_dataset_trains_offline_from_the_datasets_cache(parquet_files, tiny_hub_folder, tmp_path):
    cache = tmp_path / "datasets"
    datasets_hub_cache(parquet_files, cache, "hospital/chest-pairs")
    output = tmp_path / "run"
    command = [sys.executable, str(PRETRAIN), *dataset_command(tiny_hub_folder, "hospital/chest-pairs", output,
                                                                "--max_train_steps", 2)]
    finished = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)})
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "offline mode is enabled" in finished.stderr  # datasets read its cache, not the network
    history = json.loads((output / "training_history.json").read_text())
    assert [(record["step"], record["stopped_by"]) for record in history] == [(2, "max_train_steps")]


def test_two_processes_stream_uneven_shards_with_global_negatives(parquet_files, tiny_hub_folder, tmp_path):
    """Two processes over Parquet files of 11 and 9 rows, gathering every batch (--global_negatives): each takes the
    same number of steps, so no gather waits for a process whose shard ran out."""
    output = tmp_path / "ddp"
    command = [*accelerate_launch("--multi_gpu", "--num_processes", "2"), str(PRETRAIN),
               *dataset_command(tiny_hub_folder, parquet_files / "*.parquet", output, "--streaming",
                                "--max_train_steps", 6, "--num_epochs", 2, "--global_negatives", "--cpu")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    history = json.loads((output / "training_history.json").read_text())
    assert [record["step"] for record in history] == [3, 6]


def test_relative_image_paths_of_a_dataset_are_read_under_image_root(synthetic_data, tiny_hub_folder, tmp_path):
    table = tmp_path / "pairs.parquet"
    datasets.Dataset.from_csv(str(synthetic_data / "train.csv")).select_columns(["image", "report"]).to_parquet(
        str(table))
    output = tmp_path / "run"
    command = ["--model", str(tiny_hub_folder), "--dataset_name", str(table), "--image_root", str(synthetic_data),
               "--text_column", "report", "--no_labels", "--output_dir", str(output), "--batch_size", "4",
               "--num_workers", "0", "--max_train_steps", "2"]
    run_pretrain(command)
    assert [record["step"] for record in json.loads((output / "training_history.json").read_text())] == [2]


@pytest.mark.parametrize("argv, message", [
    (["--streaming", "--max_train_steps", "4"], "give --dataset_name and --max_train_steps"),
    (["--dataset_name", "x", "--streaming"], "give --dataset_name and --max_train_steps"),
    (["--dataset_name", "missing.parquet"], "--dataset_name missing.parquet: no such file"),
])
def test_data_options_are_checked_before_the_model_loads(argv, message, synthetic_data, tmp_path, capsys):
    base = ["--model", tmp_path / "no_model", "--output_dir", tmp_path / "out"]
    if "--dataset_name" not in argv:
        base += ["--train_file", synthetic_data / "train.csv"]
    code, err = run_cli_in_process(pretrain.main, [*base, *argv], capsys)
    assert code == 2 and message in err


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_same_weights(parquet_files, tiny_hub_folder, tmp_path):
    options = ("--streaming", "--max_train_steps", 8, "--num_epochs", 2, "--checkpointing_steps", 3)
    straight = tmp_path / "straight"
    run_pretrain(dataset_command(tiny_hub_folder, parquet_files / "*.parquet", straight, *options))
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(PRETRAIN), *dataset_command(tiny_hub_folder, parquet_files / "*.parquet",
                                                                interrupted, *options)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("saved checkpoint step_6"):  # step 2 of the second epoch, past the 20 rows' first pass
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (interrupted / "final").exists()
    run_pretrain(dataset_command(tiny_hub_folder, parquet_files / "*.parquet", interrupted, *options,
                                 "--resume_from_checkpoint", "latest"))
    expected, actual = trainable_weights(straight / "final"), trainable_weights(interrupted / "final")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert json.loads((interrupted / "training_history.json").read_text()) == json.loads(
        (straight / "training_history.json").read_text())


def test_a_streamed_run_resumed_with_another_epoch_length_is_refused(parquet_files, tiny_hub_folder, tmp_path,
                                                                      capsys):
    """A stream's position is a count of rows within epochs whose length --max_train_steps sets: resumed with another
    length, it would skip or repeat rows."""
    output = tmp_path / "run"
    options = ("--streaming", "--num_epochs", 2, "--checkpointing_steps", 2)
    run_pretrain(dataset_command(tiny_hub_folder, parquet_files / "*.parquet", output, *options,
                                 "--max_train_steps", 4))
    code, err = run_cli_in_process(pretrain.main, dataset_command(
        tiny_hub_folder, parquet_files / "*.parquet", output, *options, "--max_train_steps", 8,
        "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "steps_per_epoch: 2 then, 4 now" in err


def test_a_set_prepared_for_another_processor_is_refused(synthetic_data, tiny_hub_folder, tmp_path, capsys):
    prepare_main(["training-set", "--input", str(synthetic_data / "train.csv"), "--no-labels", "--output",
                  str(tmp_path / "set224")])  # BiomedCLIP's 224 x 224; the tiny model's processor crops 32 x 32
    code, err = run_cli_in_process(pretrain.main, [*dataset_command(tiny_hub_folder, tmp_path / "set224",
                                                                    tmp_path / "run"), "--no_labels"], capsys)
    assert code == 2 and "prepared with image processor settings" in err and "prepare it again with --model" in err


def test_a_prepared_folder_streams_and_train_split_selects_rows(prepared_set, tiny_hub_folder, tmp_path):
    """The prepared folder read as a stream; --train_split keeps only the rows of one value of a split column."""
    with_split = tmp_path / "with_split"
    train = datasets.load_from_disk(str(prepared_set))["train"]
    train.add_column("split", ["train"] * 12 + ["other"] * 8).save_to_disk(str(with_split))
    before = sorted(path.name for path in with_split.iterdir())
    output = tmp_path / "run"
    run_pretrain(dataset_command(tiny_hub_folder, with_split, output, "--train_split", "train", "--num_epochs", 1))
    assert json.loads((output / "training_history.json").read_text())[0]["step"] == 3  # 12 rows, batches of 4
    assert sorted(path.name for path in with_split.iterdir()) == before  # nothing written into the input
    run_pretrain(dataset_command(tiny_hub_folder, prepared_set, tmp_path / "streamed", "--streaming",
                                 "--max_train_steps", 2, "--num_epochs", 1))
    assert (tmp_path / "streamed" / "final" / "model.safetensors").is_file()
