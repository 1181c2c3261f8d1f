"""Training: the data layer, the gathering loss on two real processes, and examples/pretrain.py end to end."""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from ace_lora_hf.data import ImageTextCollator, ImageTextColumns, load_image_text_dataset
from ace_lora_hf.errors import DataFormatError, ImageLoadError
from ace_lora_hf.loss_ace_lora import LabelGuidedInfoNCELoss, label_guided_infonce
from ace_lora_hf.training_utils import latest_checkpoint

from conftest import REPO_ROOT


PRETRAIN = REPO_ROOT / "examples" / "pretrain.py"
LABELS = ["No Finding", "Pneumonia"]
COLUMNS = ImageTextColumns(labels=LABELS)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """24 image-report pairs in two classes: bright-patch images with pneumonia reports, and normal ones."""
    root = tmp_path_factory.mktemp("synthetic")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(24):
        positive = index % 2
        pixels = rng.integers(0, 80, (40, 48), dtype=np.uint8)
        if positive:
            pixels[10:30, 5:20] += 150
        Image.fromarray(pixels).save(root / "images" / f"{index:03d}.png")
        rows.append({
            "image": f"images/{index:03d}.png",
            "report": "there is pneumonia in the right lung" if positive else "no finding normal chest",
            "No Finding": "" if positive else 1,
            "Pneumonia": 1 if positive else (-1 if index % 4 == 0 else ""),
            "split": "train" if index < 20 else "validate",
        })
    write_csv(root / "train.csv", rows)
    write_csv(root / "validation.csv", [{"Path": r["image"], "Target": int(r["Pneumonia"] == 1)} for r in rows])
    return root


def write_csv(path, rows):
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------- data


def test_dataset_reads_labels_and_splits(synthetic_data):
    dataset = load_image_text_dataset(synthetic_data / "train.csv", COLUMNS, split="train")
    assert len(dataset) == 20 and dataset[0]["row"] == 1
    assert dataset[0]["image"] == str(synthetic_data / "images" / "000.png")
    assert dataset[0]["labels"] == [1.0, -1.0] and np.isnan(dataset[1]["labels"][0])


def test_missing_column_is_named(synthetic_data):
    with pytest.raises(DataFormatError, match=r"train.csv: missing column\(s\) 'Edema'"):
        load_image_text_dataset(synthetic_data / "train.csv", ImageTextColumns(labels=["Edema"]))


def test_missing_image_names_row_and_file_or_is_skipped(synthetic_data, tmp_path):
    rows = list(csv.DictReader((synthetic_data / "train.csv").open()))
    rows[2]["image"] = "images/gone.png"
    rows[5]["report"] = " "
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataFormatError, match=r"bad.csv, row 3: image file .*gone.png not found"):
        load_image_text_dataset(tmp_path / "bad.csv", COLUMNS, image_root=synthetic_data)
    dataset = load_image_text_dataset(tmp_path / "bad.csv", COLUMNS, image_root=synthetic_data, skip_bad_rows=True)
    assert len(dataset) == 22 and 3 not in dataset["row"] and 6 not in dataset["row"]


def test_collator_names_an_unreadable_image_or_skips_it(synthetic_data, tiny_hub_folder, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    items = [{"image": str(synthetic_data / "images" / "000.png"), "text": "normal", "row": 1, "labels": [1.0, 0.0]},
             {"image": str(tmp_path / "broken.png"), "text": "normal", "row": 2, "labels": [1.0, 0.0]}]
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    with pytest.raises(ImageLoadError, match="row 2: .*broken.png"):
        ImageTextCollator(processor, 256)(items)
    batch = ImageTextCollator(processor, 256, skip_bad_images=True)(items)
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["input_ids"].shape == (1, 256)
    assert int(batch["num_skipped"]) == 1 and batch["labels"].tolist() == [[1.0, 0.0]]


# --------------------------------------------------------------------------------------------- global negatives


SHARDS = (slice(0, 4), slice(4, 6))  # unequal local batches, as after a skipped unreadable image


def _two_process_loss(rank, world_size, init_file, images, texts, labels, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    shard = SHARDS[rank]
    local_images = images[shard].clone().requires_grad_(True)
    local_texts = texts[shard].clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = LabelGuidedInfoNCELoss(global_negatives=True)(local_images, local_texts, scale, labels[shard])
    loss.backward()
    results[rank] = (loss.detach(), local_images.grad, local_texts.grad, scale.grad)
    torch.distributed.destroy_process_group()


def test_global_negatives_on_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, float("nan")]])
    results = mp.Manager().dict()
    mp.spawn(_two_process_loss, args=(2, tmp_path / "init", images, texts, labels, results), nprocs=2)

    full_images, full_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    expected = label_guided_infonce(scale * full_images @ full_texts.t(), labels)
    expected.backward()
    for rank in range(2):
        loss, image_grad, text_grad, scale_grad = results[rank]
        torch.testing.assert_close(loss, expected.detach())
        # Each process holds the gradient of the global loss w.r.t. its own embeddings, summed over the processes'
        # identical copies of that loss; data-parallel averaging divides it back.
        torch.testing.assert_close(image_grad / 2, full_images.grad[SHARDS[rank]])
        torch.testing.assert_close(text_grad / 2, full_texts.grad[SHARDS[rank]])
        torch.testing.assert_close(scale_grad, scale.grad)


def test_local_negatives_ignore_other_processes():
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss = LabelGuidedInfoNCELoss(global_negatives=False)(images, texts, torch.tensor(5.0))
    torch.testing.assert_close(loss, label_guided_infonce(5.0 * images @ texts.t()))


# ---------------------------------------------------------------------------------------------- pretrain.py


def pretrain_command(model, data, output, *extra):
    return [
        "--model", str(model), "--train_file", str(data / "train.csv"), "--output_dir", str(output),
        "--label_columns", *LABELS, "--batch_size", "4", "--learning_rate", "1e-2", "--warmup_epochs", "0.5",
        "--num_workers", "0", "--seed", "3", *map(str, extra),
    ]


def run_pretrain(args, launcher=(sys.executable,)):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([*launcher, str(PRETRAIN), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def trainable_weights(folder):
    weights = load_file(folder / "model.safetensors")
    return {k: v for k, v in weights.items() if ".lora_" in k or "hypergraph" in k or k == "logit_scale"}


@torch.no_grad()
def training_set_loss(model, batch) -> float:
    inputs = {key: batch[key] for key in ("input_ids", "pixel_values", "labels")}
    return model.eval()(**inputs).loss.item()


def test_one_process_run_lowers_the_loss_and_reloads(tiny_hub_folder, synthetic_data, tmp_path):
    output = tmp_path / "run"
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, output, "--num_epochs", 6, "--batch_size", 8,
                                  "--learning_rate", "2e-2", "--validation_file", synthetic_data / "validation.csv"))
    history = json.loads((output / "training_history.json").read_text())
    losses = [epoch["loss"] for epoch in history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0.0 <= history[-1]["validation_accuracy"] <= 1.0
    model = AutoModel.from_pretrained(output / "final")
    start = AutoModel.from_pretrained(tiny_hub_folder)
    # The objective on the whole training set, without dropout: 0.55-0.91 of the start's across seeds 1-8. (How
    # far 18 steps get varies with the seed: some runs leave the tiny model's plateau and some do not.)
    dataset = load_image_text_dataset(synthetic_data / "train.csv", COLUMNS, split="train")
    batch = ImageTextCollator(AutoProcessor.from_pretrained(tiny_hub_folder), 256)(list(dataset))
    assert training_set_loss(model, batch) < 0.95 * training_set_loss(start, batch)
    assert not torch.equal(model.logit_scale, start.logit_scale)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in start.parameters() if p.requires_grad)
    assert (output / "best" / "model.safetensors").is_file() and (output / "adapters").is_dir()
    assert torch.equal(load_file(output / "adapters" / "ace_lora_extras.safetensors")["logit_scale"],
                       model.logit_scale.detach())


def test_killed_run_resumes_to_the_same_weights(tiny_hub_folder, synthetic_data, tmp_path):
    args = ("--num_epochs", 3, "--checkpointing_steps", 2)
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "straight", *args))

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(PRETRAIN), *pretrain_command(tiny_hub_folder, synthetic_data, interrupted, *args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("saved checkpoint step_4"):
            process.send_signal(signal.SIGKILL)  # in the first of three epochs, wherever the process is now
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (interrupted / "final").exists()

    resumed = run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, interrupted, *args,
                                            "--resume_from_checkpoint", "latest"))
    assert "Resumed from" in resumed.stderr
    expected, actual = trainable_weights(tmp_path / "straight" / "final"), trainable_weights(interrupted / "final")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    straight = json.loads((tmp_path / "straight" / "training_history.json").read_text())
    history = json.loads((interrupted / "training_history.json").read_text())
    assert [e["step"] for e in history] == [e["step"] for e in straight] == [6, 12, 18]
    assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in straight], abs=1e-6)


def test_two_processes_with_accelerate_launch(tiny_hub_folder, synthetic_data, tmp_path):
    # accelerate's own --cpu flag runs a single process; torchrun-style processes with Accelerator(cpu=True) use gloo.
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    output = tmp_path / "ddp"
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, output, "--num_epochs", 1, "--global_negatives",
                                  "--cpu"), launcher)
    history = json.loads((output / "training_history.json").read_text())
    assert len(history) == 1 and history[0]["step"] == 3  # 24 rows / (2 processes x 4)
    assert AutoModel.from_pretrained(output / "final") is not None


def test_an_earlier_run_is_not_overwritten(tiny_hub_folder, synthetic_data, tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    result = subprocess.run([sys.executable, str(PRETRAIN), *pretrain_command(tiny_hub_folder, synthetic_data,
                                                                            tmp_path / "run", "--num_epochs", 1)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--overwrite_output_dir" in result.stderr


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(PRETRAIN), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--resume_from_checkpoint", "--report_to", "--mixed_precision", "--gradient_accumulation_steps",
                 "--gradient_checkpointing", "--global_negatives", "--checkpointing_steps", "--validation_file"):
        assert flag in result.stdout


def test_an_interrupted_save_is_never_the_latest_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_4", "step_12", "step_16.tmp"):
        (checkpoints / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == checkpoints / "step_12"
    assert latest_checkpoint(tmp_path / "empty") is None
