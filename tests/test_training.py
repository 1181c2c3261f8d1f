"""Training: the data layer, the gathering loss on two real processes, the shared training layer and
examples/pretrain.py end to end, with the inputs a user (or an attacker) might give it."""

import csv
import errno
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from ace_lora_hf import AceLoraModel, AceLoraProcessor
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.data.image_tables import ImageTextCollator, ImageTextColumns, load_image_text_dataset
from ace_lora_hf.errors import DataFormatError, ImageLoadError, InvalidArgumentError, TrainingDivergedError
from ace_lora_hf.models.ace_lora.batch_inference import default_num_workers
from ace_lora_hf.models.ace_lora.loss_ace_lora import LabelGuidedInfoNCELoss, label_guided_infonce
from ace_lora_hf.models.ace_lora.modeling_ace_lora import AceLoraOutput
from ace_lora_hf.outputs.safe_outputs import folder_lock, write_json_atomic
from ace_lora_hf.outputs.launched_processes import MET_ALIKE
from ace_lora_hf.inference.fast_dropout import AceLoraDropout
from ace_lora_hf.sources import checkpoints
from ace_lora_hf.sources.checkpoints import BaseModel, latest_checkpoint, load_trained_model, materialize_checkpoint
from ace_lora_hf.training import options
from ace_lora_hf.training.accelerator import build_accelerator, data_loader
from ace_lora_hf.training.loop import TrainingRun
from ace_lora_hf.training.selection import Selection
from ace_lora_hf.training.state import ACCUMULATED_GRADIENTS

from conftest import REPO_ROOT, AceLoraModelTester, perturb_lora


PRETRAIN = REPO_ROOT / "examples" / "pretrain.py"
LABELS = ["No Finding", "Pneumonia"]
COLUMNS = ImageTextColumns(labels=LABELS)


def _load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = _load_script(PRETRAIN)


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


def read_rows(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# ----------------------------------------------------------------------------------------------------- data


def test_dataset_reads_labels_and_splits(synthetic_data):
    dataset = load_image_text_dataset(synthetic_data / "train.csv", COLUMNS, split="train")
    assert len(dataset) == 20 and dataset[0]["line"] == 2
    assert dataset[0]["image"] == str(synthetic_data / "images" / "000.png")
    assert dataset[0]["labels"] == [1.0, -1.0] and np.isnan(dataset[1]["labels"][0])


def test_json_lines_table_reads_like_the_csv(synthetic_data, tmp_path):
    rows = read_rows(synthetic_data / "train.csv")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({**row, "No Finding": row["No Finding"] or None})
                                                    for row in rows))
    from_json = load_image_text_dataset(tmp_path / "train.jsonl", COLUMNS, image_root=synthetic_data)
    from_csv = load_image_text_dataset(synthetic_data / "train.csv", COLUMNS)
    assert from_json["text"] == from_csv["text"] and from_json["image"] == from_csv["image"]
    np.testing.assert_array_equal(np.array(from_json["labels"]), np.array(from_csv["labels"]))


def test_missing_image_names_row_and_file_or_is_skipped(synthetic_data, tmp_path):
    rows = read_rows(synthetic_data / "train.csv")
    rows[2]["image"] = "images/gone.png"
    rows[5]["report"] = " "
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataFormatError, match=r"bad.csv, line 4: file .*gone.png \(column 'image'\) not found"):
        load_image_text_dataset(tmp_path / "bad.csv", COLUMNS, image_root=synthetic_data)
    dataset = load_image_text_dataset(tmp_path / "bad.csv", COLUMNS, image_root=synthetic_data, skip_bad_rows=True)
    assert len(dataset) == 22 and 4 not in dataset["line"] and 7 not in dataset["line"]


def _bad_tables():
    """(name, how the table is broken, what the one-line error must say), as users break them."""
    header = "image,report,No Finding,Pneumonia\n"
    good = "images/000.png,no finding,1,\n"
    return [
        ("missing_column", "image,report,No Finding\n" + "images/000.png,normal,1\n",
         r"missing column\(s\) 'Pneumonia'; found \['image', 'report', 'No Finding'\]"),
        ("empty", "", "empty.csv is empty: expected the --train_file table"),
        ("latin1", (header + "images/000.png,épanchement,1,\n").encode("latin-1"), "not UTF-8 text"),
        ("extra_field", header + good + "images/001.png,no finding,1,,surplus\n",
         "line 3: 5 cells but the header names 4 columns"),
        ("label_yes", header + good + "images/001.png,pneumonia,,yes\n",
         r"line 3: column 'Pneumonia' is 'yes'; expected one of 1, 0, -1 or empty"),
        ("empty_report", header + "images/000.png,,1,\n", "line 2: empty report in column 'report'"),
        ("header_only", header, "no rows"),
    ]


@pytest.mark.parametrize(("name", "content", "message"), _bad_tables(), ids=[t[0] for t in _bad_tables()])
def test_bad_table_is_one_line_before_the_model_loads(name, content, message, synthetic_data, tmp_path, capsys):
    table = tmp_path / f"{name}.csv"
    table.write_bytes(content if isinstance(content, bytes) else content.encode())
    # --model names nothing loadable: the table is refused first.
    code, err = run_cli_in_process(pretrain.main, ["--model", str(tmp_path / "no_model"), "--train_file", str(table),
                                                   "--image_root", str(synthetic_data), "--output_dir",
                                                   str(tmp_path / "run"), "--label_columns", *LABELS], capsys)
    assert code == EXIT_USER_ERROR
    assert str(table) in err
    assert re.search(message, err), err


def test_validation_table_with_a_non_numeric_target_is_named(tiny_hub_folder, synthetic_data, tmp_path, capsys):
    rows = read_rows(synthetic_data / "validation.csv")
    rows[4]["Target"] = "abc"
    write_csv(tmp_path / "validation.csv", rows)
    code, err = run_cli_in_process(pretrain.main, pretrain_command(
        tiny_hub_folder, synthetic_data, tmp_path / "run", "--validation_file", tmp_path / "validation.csv",
        "--validation_image_root", synthetic_data), capsys)
    assert code == EXIT_USER_ERROR
    assert "validation.csv, line 6: column 'Target' is 'abc'; expected one of 0, 1." in err


def test_collator_names_an_unreadable_image_or_skips_it(synthetic_data, tiny_hub_folder, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    items = [{"image": str(synthetic_data / "images" / "000.png"), "text": "normal", "line": 2, "labels": [1.0, 0.0]},
             {"image": str(tmp_path / "broken.png"), "text": "normal", "line": 3, "labels": [1.0, 0.0]}]
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    with pytest.raises(ImageLoadError, match="line 3: .*broken.png"):
        ImageTextCollator(processor)(items)
    batch = ImageTextCollator(processor, skip_bad_images=True)(items)
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["input_ids"].shape == (1, 256)
    assert int(batch["num_skipped"]) == 1 and batch["labels"].tolist() == [[1.0, 0.0]]
    assert ImageTextCollator(processor, skip_bad_images=True)(items[1:]) == {"num_skipped": torch.tensor(1)}


def test_an_unreadable_image_in_a_loader_worker_is_one_line(synthetic_data, tiny_hub_folder, tmp_path, capsys):
    """A worker process's error reaches the main process as torch's wrapper around its traceback text: the user sees
    the same one line as without workers."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    (data / "images" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    command = pretrain_command(tiny_hub_folder, data, tmp_path / "run", "--num_epochs", "1")
    command[command.index("--num_workers") + 1] = "1"
    code, err = run_cli_in_process(pretrain.main, command, capsys)
    assert code == EXIT_USER_ERROR
    assert err.endswith(f"error: line 3: {data / 'images' / '001.png'}: not an image file Pillow can read (PNG, JPEG, "
                        "TIFF, ...) nor a DICOM")


def test_the_processor_owns_the_context_length(synthetic_data, tiny_hub_folder, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_hub_folder)
    AceLoraProcessor(processor.image_processor, processor.tokenizer, context_length=64).save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.context_length == 64 and processor.context_length == 256  # a folder without it: BiomedCLIP's
    item = {"image": str(synthetic_data / "images" / "000.png"), "text": "normal " * 100, "line": 2}
    assert ImageTextCollator(reloaded)([item])["input_ids"].shape == (1, 64)
    assert reloaded(text=["no finding"], return_tensors="pt")["input_ids"].shape == (1, 64)


# --------------------------------------------------------------------------------------------------------- loss


SHARDS = (slice(0, 4), slice(4, 6))  # unequal local batches, as after a skipped unreadable image


def _outputs(images, texts, scale):
    return AceLoraOutput(image_embeds=images, text_embeds=texts, logits_per_image=scale * images @ texts.t())


def _two_process_loss(rank, world_size, init_file, images, texts, labels, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    shard = SHARDS[rank]
    local_images = images[shard].clone().requires_grad_(True)
    local_texts = texts[shard].clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = LabelGuidedInfoNCELoss(global_negatives=True)(_outputs(local_images, local_texts, scale), scale,
                                                         labels[shard])
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


def test_local_negatives_are_the_loss_of_the_models_own_logits():
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    outputs = AceLoraOutput(image_embeds=images, text_embeds=texts, logits_per_image=torch.randn(4, 4))
    loss = LabelGuidedInfoNCELoss(global_negatives=True)(outputs, torch.tensor(5.0))  # one process: nothing to gather
    torch.testing.assert_close(loss, label_guided_infonce(outputs.logits_per_image))


def test_a_batch_without_negatives_is_counted_and_warned_about(caplog):
    images = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    loss_function = LabelGuidedInfoNCELoss()
    same = torch.tensor([[1.0, 0.0], [1.0, float("nan")], [1.0, -1.0]])  # all [1, 0] once binarised
    with caplog.at_level("WARNING"):
        loss = loss_function(_outputs(images, images, torch.tensor(5.0)), torch.tensor(5.0), same)
    assert loss.item() == 0.0 and loss_function.batches_without_negatives == 1 and "no negatives" in caplog.text
    loss_function(_outputs(images, images, torch.tensor(5.0)), torch.tensor(5.0), torch.eye(3))
    assert loss_function.batches_without_negatives == 1


# ---------------------------------------------------------------------------------------------- options


def test_config_file_supplies_every_option_and_the_command_line_wins(tmp_path):
    (tmp_path / "run.yaml").write_text("model: base/\ntrain-file: t.csv\noutput_dir: out/\nbatch_size: 8\n"
                                       "label_columns: [Edema, Pneumonia]\nglobal_negatives: true\n")
    args = pretrain.parse_args(["--config", str(tmp_path / "run.yaml"), "--batch_size", "2"])
    assert (args.model, str(args.train_file), str(args.output_dir)) == ("base/", "t.csv", "out")
    assert args.batch_size == 2 and args.label_columns == ["Edema", "Pneumonia"] and args.global_negatives


@pytest.mark.parametrize(("text", "message"), [
    ("model: m\nlearnig_rate: 0.1\n", r"unknown option 'learnig_rate' \(did you mean 'learning_rate'\?\)"),
    ("- model\n- m\n", "expected a mapping of option names to values, got a list"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_config_file_mistakes_are_refused(text, message, tmp_path):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        pretrain.parse_args(["--config", str(tmp_path / "run.yaml"), "--train_file", "t.csv", "--output_dir", "o"])


def test_config_values_are_checked_like_the_command_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("mixed_precision: fp8\n")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--config", str(tmp_path / "run.yaml"), "--model", "m", "--train_file", "t.csv",
                             "--output_dir", "o"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_help_lists_every_flag_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--model MODEL, --model MODEL" not in help_text and ", --output-dir" not in help_text
    assert help_text.count("--output_dir OUTPUT_DIR") == 2  # the usage line and the option's own
    assert re.findall(r"--\w+-[\w-]+", help_text) == ["--output-dir"]  # the epilog's example of the dash spelling
    for flag in ("--resume_from_checkpoint", "--report_to", "--mixed_precision", "--gradient_accumulation_steps",
                 "--gradient_checkpointing", "--global_negatives", "--checkpointing_steps", "--validation_file",
                 "--config", "--force_resume", "--max_non_finite_steps", "--save_full_best"):
        assert flag in help_text


def test_a_tracker_that_is_not_installed_fails_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(options.TRACKERS, "tensorboard", lambda: False)
    code, err = run_cli_in_process(pretrain.main, ["--model", "m", "--train_file", str(tmp_path / "t.csv"),
                                                   "--output_dir", str(tmp_path), "--report_to", "tensorboard"], capsys)
    assert code == EXIT_USER_ERROR and "pip install 'ace-lora-hf[tensorboard]'" in err


def test_num_workers_defaults_to_the_batch_loaders_choice_for_the_run_device(tmp_path):
    required = ["--model", "m", "--train_file", "t.csv", "--output_dir", str(tmp_path), "--cpu"]
    args = pretrain.parse_args(required)
    assert args.num_workers is None
    accelerator = build_accelerator(args)
    assert args.num_workers == default_num_workers(accelerator.device) == 0  # the model on the CPU uses every core
    AcceleratorState._reset_state(True)
    args = pretrain.parse_args([*required, "--num_workers", "3"])
    build_accelerator(args)
    assert args.num_workers == 3


def test_options_take_the_dash_spelling_too():
    underscores = pretrain.parse_args(["--model", "m", "--train_file", "t.csv", "--output_dir", "o",
                                       "--max_train_steps", "5", "--label_columns", "A", "B", "--save_full_best"])
    dashes = pretrain.parse_args(["--model", "m", "--train-file", "t.csv", "--output-dir", "o",
                                  "--max-train-steps", "5", "--label-columns", "A", "B", "--save-full-best"])
    assert vars(dashes) == vars(underscores)
    assert (dashes.max_train_steps, dashes.label_columns, dashes.save_full_best) == (5, ["A", "B"], True)


# ---------------------------------------------------------------------------------------------- pretrain.py


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process runs each start from a fresh Accelerate state, as separate processes would."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def pretrain_command(model, data, output, *extra):
    return [
        "--model", str(model), "--train_file", str(data / "train.csv"), "--output_dir", str(output),
        "--label_columns", *LABELS, "--batch_size", "4", "--learning_rate", "1e-2", "--warmup_epochs", "0.5",
        "--num_workers", "0", "--seed", "3", *map(str, extra),
    ]


def run_pretrain(argv):
    """examples/pretrain.py in this process, as `python examples/pretrain.py ARGV` runs it."""
    try:
        pretrain.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def run_cli_in_process(main, argv, capsys):
    """`main` through `run_cli`: the exit code and the error line (stderr must hold exactly one, and no traceback;
    progress bars may precede it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        try:
            run_cli(main, [str(a) for a in argv])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) <= 1, err
    return exit_info.value.code, errors[0] if errors else ""


def trainable_weights(folder):
    weights = load_file(folder / "model.safetensors")
    return {k: v for k, v in weights.items() if ".lora_" in k or "hypergraph" in k or k == "logit_scale"}


@torch.no_grad()
def training_set_loss(model, batch) -> float:
    inputs = {key: batch[key] for key in ("input_ids", "pixel_values", "labels")}
    return model.eval()(**inputs).loss.item()


def test_one_process_run_lowers_the_loss_and_reloads(tiny_hub_folder, synthetic_data, tmp_path, capsys):
    output = tmp_path / "run"
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, output, "--num_epochs", 6, "--batch_size", 8,
                                  "--learning_rate", "2e-2", "--validation_file", synthetic_data / "validation.csv",
                                  "--checkpointing_steps", 3, "--report_to", "tensorboard"))
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved checkpoint")]
    assert saved == [f"saved checkpoint step_{step}" for step in range(3, 19, 3)]  # epoch ends: once each
    history = json.loads((output / "training_history.json").read_text())
    losses = [epoch["loss"] for epoch in history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0.0 <= history[-1]["validation_accuracy"] <= 1.0
    model = AutoModel.from_pretrained(output / "final")
    start = AutoModel.from_pretrained(tiny_hub_folder)
    # The objective on the whole training set, without dropout: 0.55-0.91 of the start's across seeds 1-8. (How
    # far 18 steps get varies with the seed: some runs leave the tiny model's plateau and some do not.)
    dataset = load_image_text_dataset(synthetic_data / "train.csv", COLUMNS, split="train")
    batch = ImageTextCollator(AutoProcessor.from_pretrained(tiny_hub_folder))(list(dataset))
    assert training_set_loss(model, batch) < 0.95 * training_set_loss(start, batch)
    assert not torch.equal(model.logit_scale, start.logit_scale)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in start.parameters() if p.requires_grad)
    assert torch.equal(load_file(output / "adapters" / "ace_lora_extras.safetensors")["logit_scale"],
                       model.logit_scale.detach())
    best_epoch = min(range(6), key=lambda epoch: losses[epoch])
    assert json.loads((output / "best" / "ace_lora_checkpoint.json").read_text())["epoch"] == best_epoch
    assert tensorboard_scalars(output / "logs", "epoch/loss") == pytest.approx(losses)


def tensorboard_scalars(logs, tag):
    """The values `tag` took in the TensorBoard event files under `logs`, in step order."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    events = EventMultiplexer().AddRunsFromDirectory(str(logs))
    events.Reload()
    runs = [run for run, tags in events.Runs().items() if tag in tags["scalars"]]
    assert len(runs) == 1, events.Runs()
    return [event.value for event in events.Scalars(runs[0], tag)]


STRAIGHT = ("--num_epochs", 3, "--checkpointing_steps", 2)


@pytest.fixture(scope="module")
def straight_run(tiny_hub_folder, synthetic_data, tmp_path_factory):
    """Three epochs of six steps, a checkpoint every two steps: the run the other tests resume, inspect or attack."""
    output = tmp_path_factory.mktemp("straight") / "run"
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, output, *STRAIGHT))
    return output


def test_checkpoints_and_best_hold_only_the_trained_weights(straight_run, tiny_hub_folder, tmp_path):
    model = AutoModel.from_pretrained(tiny_hub_folder)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trainable_bytes = sum(p.numel() * 4 for p in trainable.values())
    assert sorted(path.name for path in (straight_run / "checkpoints").iterdir()) == ["step_14", "step_16", "step_18"]
    for folder in (straight_run / "best", straight_run / "checkpoints" / "step_18"):
        weights = load_file(folder / "trainable.safetensors")
        assert weights.keys() == trainable.keys()
        assert trainable_bytes <= (folder / "trainable.safetensors").stat().st_size < trainable_bytes + 40_000
        assert not (folder / "model.safetensors").exists()
    # The light best/ loads as the model it is, through every script's --model, and materialises to a full folder.
    loaded, _ = load_trained_model(straight_run / "best", AceLoraModel)
    best = load_file(straight_run / "best" / "trainable.safetensors")
    assert all(torch.equal(param, best[name]) for name, param in loaded.named_parameters() if param.requires_grad)
    assert BaseModel.of(loaded, straight_run / "best").source == str(tiny_hub_folder.resolve())
    materialize_checkpoint(straight_run / "best", tmp_path / "full")
    full = AutoModel.from_pretrained(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), loaded.state_dict().values()))


def test_killed_run_resumes_to_the_same_weights(straight_run, tiny_hub_folder, synthetic_data, tmp_path):
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(PRETRAIN), *pretrain_command(tiny_hub_folder, synthetic_data, interrupted,
                                                                *STRAIGHT)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("saved checkpoint step_4"):
            process.send_signal(signal.SIGKILL)  # in the first of three epochs, wherever the process is now
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (interrupted / "final").exists()

    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, interrupted, *STRAIGHT,
                                  "--resume_from_checkpoint", "latest"))
    expected, actual = trainable_weights(straight_run / "final"), trainable_weights(interrupted / "final")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)  # bit for bit
    straight = json.loads((straight_run / "training_history.json").read_text())
    history = json.loads((interrupted / "training_history.json").read_text())
    assert [e["step"] for e in history] == [e["step"] for e in straight] == [6, 12, 18]
    assert [e["loss"] for e in history] == [e["loss"] for e in straight]


def test_a_run_stopped_inside_an_epoch_records_and_evaluates_the_stop(tiny_hub_folder, synthetic_data, tmp_path,
                                                                      capsys):
    output = tmp_path / "run"
    # Epochs of six steps: one whole, then a stop two steps into the second, evaluated although --eval_every_epochs
    # would skip that epoch.
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, output, "--num_epochs", 3, "--max_train_steps", 8,
                                  "--validation_file", synthetic_data / "validation.csv", "--eval_every_epochs", 3))
    out = capsys.readouterr().out
    history = json.loads((output / "training_history.json").read_text())
    assert [(r["epoch"], r["step"], r.get("stopped_by")) for r in history] == [(0, 6, None), (1, 8, "max_train_steps")]
    assert "validation_auc" not in history[0] and 0.0 <= history[1]["validation_accuracy"] <= 1.0
    best = min(history, key=lambda record: record["loss"])
    saved = json.loads((output / "best" / "ace_lora_checkpoint.json").read_text())
    assert (saved["epoch"], saved["step"], saved["loss"]) == (best["epoch"], best["step"], best["loss"])
    assert history[-1]["best"] == {"epoch": best["epoch"], "step": best["step"]}
    said = [line for line in out.splitlines() if line.startswith("best/ holds")]
    assert len(said) == 1 and f"epoch {best['epoch']}" in said[0] and f"step {best['step']}" in said[0]
    assert ("--max_train_steps stopped the run" in said[0]) == (best["step"] == 8)
    # final/ is the model at the stop, a complete folder; the stop's checkpoint resumes it.
    final = dict(AutoModel.from_pretrained(output / "final").named_parameters())
    at_stop = load_file(output / "checkpoints" / "step_8" / "trainable.safetensors")
    assert at_stop and all(torch.equal(final[name], tensor) for name, tensor in at_stop.items())
    assert isinstance(load_trained_model(output / "best", AceLoraModel)[0], AceLoraModel)


def test_a_run_stopped_inside_an_epoch_resumes_as_if_it_had_not_stopped(straight_run, tiny_hub_folder, synthetic_data,
                                                                        tmp_path):
    stopped = tmp_path / "stopped"
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, stopped, *STRAIGHT, "--max_train_steps", 9))
    assert [record["step"] for record in json.loads((stopped / "training_history.json").read_text())] == [6, 9]
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, stopped, *STRAIGHT, "--resume_from_checkpoint",
                                  "latest"))
    expected, actual = trainable_weights(straight_run / "final"), trainable_weights(stopped / "final")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    # The stop's record was a report of the stopped run, not part of its state: the history and best/ are the
    # uninterrupted run's.
    for name in ("training_history.json", "best/ace_lora_checkpoint.json"):
        assert json.loads((stopped / name).read_text()) == json.loads((straight_run / name).read_text())


def test_a_checkpoint_inside_an_accumulation_window_resumes_exactly(tiny_hub_folder, synthetic_data, tmp_path):
    """With --gradient_accumulation_steps 2 a checkpoint after every micro-step: resumed from each, the run ends with
    the uninterrupted run's weights, bit for bit (those inside a window carry the gradients summed so far)."""
    options = ["--num_epochs", 1, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 1,
               "--keep_checkpoints", 10]
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "straight", *options))
    checkpoints = tmp_path / "straight" / "checkpoints"
    inside = [step for step in range(1, 6) if (checkpoints / f"step_{step}" / ACCUMULATED_GRADIENTS).exists()]
    assert inside == [1, 3, 5]
    expected = trainable_weights(tmp_path / "straight" / "final")
    for step in range(1, 6):
        resumed = tmp_path / f"resumed_{step}"
        run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, resumed, *options,
                                      "--resume_from_checkpoint", checkpoints / f"step_{step}"))
        actual = trainable_weights(resumed / "final")
        assert all(torch.equal(actual[key], expected[key]) for key in expected), f"resumed at step {step}"


def _copy_checkpoint(straight_run, tmp_path, step=14):
    copy = tmp_path / f"step_{step}"
    shutil.copytree(straight_run / "checkpoints" / f"step_{step}", copy)
    return copy


class Payload:
    """What an attacker plants: unpickling it (with `weights_only=False`) touches `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("planted", ["ace_lora_checkpoint.json", "trainable.safetensors", "optimizer.safetensors",
                                     "random_states.safetensors", "training_state.json"])
def test_a_planted_pickle_never_runs_and_the_file_is_named(planted, straight_run, tiny_hub_folder, synthetic_data,
                                                           tmp_path, capsys):
    checkpoint = _copy_checkpoint(straight_run, tmp_path)
    marker = tmp_path / "pwned"
    (checkpoint / planted).write_bytes(pickle.dumps(Payload(marker)))
    code, err = run_cli_in_process(pretrain.main, pretrain_command(
        tiny_hub_folder, synthetic_data, tmp_path / "run", *STRAIGHT, "--resume_from_checkpoint", checkpoint), capsys)
    assert not marker.exists()
    assert code == EXIT_USER_ERROR and str(checkpoint / planted) in err


def test_accelerate_pickles_in_a_checkpoint_are_never_read(straight_run, tiny_hub_folder, synthetic_data, tmp_path):
    checkpoint = _copy_checkpoint(straight_run, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin",
                 "pytorch_model.bin", "scaler.pt"):
        torch.save(Payload(marker), checkpoint / name)  # what accelerate's load_state would unpickle
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run", *STRAIGHT,
                                  "--resume_from_checkpoint", checkpoint))
    assert not marker.exists()
    expected, actual = trainable_weights(straight_run / "final"), trainable_weights(tmp_path / "run" / "final")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_resuming_a_changed_run_is_refused_unless_forced(straight_run, tiny_hub_folder, synthetic_data, tmp_path,
                                                         capsys):
    checkpoint = _copy_checkpoint(straight_run, tmp_path)
    command = pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run", *STRAIGHT, "--batch_size", 8,
                               "--resume_from_checkpoint", checkpoint)
    code, err = run_cli_in_process(pretrain.main, command, capsys)
    assert code == EXIT_USER_ERROR and "batch_size: 4 then, 8 now" in err and "--force_resume" in err
    run_pretrain([*command, "--force_resume"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_resuming_on_another_base_is_refused(straight_run, synthetic_data, tmp_path, capsys):
    torch.manual_seed(1)
    other = perturb_lora(AceLoraModel(AceLoraModelTester(image_size=32, patch_size=8,
                                                         text_context_length=256).get_config()))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(straight_run / "final" / "processor_config.json", tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(straight_run / "final" / name, tmp_path / "other")
    code, err = run_cli_in_process(pretrain.main, pretrain_command(
        tmp_path / "other", synthetic_data, tmp_path / "run", *STRAIGHT, "--resume_from_checkpoint",
        _copy_checkpoint(straight_run, tmp_path)), capsys)
    assert code == EXIT_USER_ERROR and "trained on another base" in err


def test_a_truncated_latest_checkpoint_is_named(straight_run, tiny_hub_folder, synthetic_data, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(straight_run, output)
    weights = output / "checkpoints" / "step_18" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, err = run_cli_in_process(pretrain.main, pretrain_command(
        tiny_hub_folder, synthetic_data, output, *STRAIGHT, "--resume_from_checkpoint", "latest"), capsys)
    assert code == EXIT_USER_ERROR and f"{weights}: not a readable safetensors file" in err


@pytest.mark.parametrize("value", ["abc", None, -5])
def test_a_hand_edited_training_state_is_named(value, straight_run, tiny_hub_folder, synthetic_data, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(straight_run, output)
    state_file = output / "checkpoints" / "step_18" / "training_state.json"
    state = json.loads(state_file.read_text())
    state["progress"]["completed_steps"] = value
    state_file.write_text(json.dumps(state))
    code, err = run_cli_in_process(pretrain.main, pretrain_command(
        tiny_hub_folder, synthetic_data, output, *STRAIGHT, "--resume_from_checkpoint", "latest"), capsys)
    assert code == EXIT_USER_ERROR and f"{state_file}: does not fit this run" in err
    assert f"progress.completed_steps is {value!r}" in err


@pytest.mark.parametrize(("option", "value"), [("--learning_rate", "nan"), ("--learning_rate", "-1"),
                                               ("--weight_decay", "-1"), ("--warmup_epochs", "inf")])
def test_optimizer_settings_out_of_range_are_refused_before_any_work(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--model", "m", "--train_file", "t.csv", "--output_dir", str(tmp_path / "run"),
                             option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}/" in err and "is not a" in err.splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_an_earlier_run_is_not_overwritten(tiny_hub_folder, synthetic_data, tmp_path, capsys):
    (tmp_path / "run" / "final").mkdir(parents=True)
    code, err = run_cli_in_process(pretrain.main, pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run"),
                                   capsys)
    assert code == EXIT_USER_ERROR and "--overwrite_output_dir" in err


def test_overwriting_a_run_never_deletes_the_model_it_starts_from(straight_run, synthetic_data, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(straight_run, output)
    code, err = run_cli_in_process(pretrain.main, pretrain_command(output / "best", synthetic_data, output,
                                                                   "--overwrite_output_dir"), capsys)
    assert code == EXIT_USER_ERROR and "--overwrite_output_dir would delete it" in err
    assert (output / "best" / "trainable.safetensors").is_file()


def test_output_dir_that_is_a_file_or_in_use_is_one_line(tiny_hub_folder, synthetic_data, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, err = run_cli_in_process(pretrain.main, pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "file"),
                                   capsys)
    assert code == EXIT_USER_ERROR and "is a file, not a folder" in err and (tmp_path / "file").read_text() == "mine"
    with folder_lock(tmp_path / "busy"):  # another job holds it
        code, err = run_cli_in_process(pretrain.main, pretrain_command(tiny_hub_folder, synthetic_data,
                                                                       tmp_path / "busy"), capsys)
    assert code == EXIT_USER_ERROR and "in use by another running job" in err


def test_disk_full_while_saving_is_one_line_and_leaves_no_half_checkpoint(tiny_hub_folder, synthetic_data, tmp_path,
                                                                          monkeypatch, capsys):
    def no_space(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "save_tensors", no_space)  # the trained weights, written first
    code, err = run_cli_in_process(pretrain.main, pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run",
                                                                   "--num_epochs", 1, "--max_train_steps", 2,
                                                                   "--checkpointing_steps", 2), capsys)
    assert code == EXIT_USER_ERROR and "no space left on the device while writing" in err
    assert not any((tmp_path / "run" / "checkpoints").iterdir())


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tiny_hub_folder, synthetic_data, tmp_path, capsys):
    command = pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run", "--num_epochs", 2,
                               "--learning_rate", "1e30", "--checkpointing_steps", 1)
    code, err = run_cli_in_process(pretrain.main, command, capsys)
    assert code == EXIT_USER_ERROR and re.search("the loss is (nan|inf); training diverged", err)
    assert "--learning_rate (now 1e+30)" in err
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "best").exists()
    for checkpoint in (tmp_path / "run" / "checkpoints").iterdir():  # written before the weights diverged
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "trainable.safetensors").values())


def test_non_finite_weights_are_never_saved(tiny_hub_folder, synthetic_data, tmp_path):
    args = pretrain.parse_args(pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run"))
    accelerator = build_accelerator(args)
    model, processor = load_trained_model(tiny_hub_folder, AceLoraModel)
    dataset = load_image_text_dataset(args.train_file, COLUMNS)
    loader = data_loader(dataset, args, shuffle=False, collate_fn=ImageTextCollator(processor))
    run = TrainingRun(accelerator, args, model, processor, loader, base=BaseModel.of(model, "m"),
                      selection=Selection("loss", higher_is_better=False))
    dropouts = [type(module) for module in run.unwrapped_model.modules() if isinstance(module, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {AceLoraDropout}  # the loop trains with the CPU's fast dropout
    with torch.no_grad():
        run.unwrapped_model.vision_model.hypergraph.node_adapter.up.bias[0] = float("inf")
    for save in (run.save_checkpoint, lambda: run._save_trained(tmp_path / "run" / "best"), run._save_final):
        with pytest.raises(TrainingDivergedError, match="node_adapter.up.bias are NaN or infinite; nothing was saved"):
            save()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))


def test_history_and_training_state_are_strict_json(straight_run, tmp_path):
    for path in (straight_run / "training_history.json", straight_run / "best" / "ace_lora_checkpoint.json",
                 straight_run / "checkpoints" / "step_18" / "training_state.json"):
        _strict_json(path)
    write_json_atomic(tmp_path / "h.json", [{"epoch": 0, "validation_auc": float("nan"), "loss": float("inf")}])
    assert _strict_json(tmp_path / "h.json") == [{"epoch": 0, "validation_auc": None, "loss": None}]


def test_batches_whose_images_all_fail_are_skipped_and_counted(tiny_hub_folder, synthetic_data, tmp_path, caplog):
    rows = read_rows(synthetic_data / "train.csv")
    for index in (1, 2, 7):
        (tmp_path / f"broken_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        rows[index]["image"] = str(tmp_path / f"broken_{index}.png")
    write_csv(tmp_path / "train.csv", rows)
    command = pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run", "--num_epochs", 1,
                               "--batch_size", 1, "--skip_bad_rows", "--image_root", synthetic_data)
    command[command.index("--train_file") + 1] = str(tmp_path / "train.csv")
    with caplog.at_level("WARNING"):
        run_pretrain(command)
    assert "3 batch(es) skipped: no image of theirs could be read" in caplog.text
    assert json.loads((tmp_path / "run" / "training_history.json").read_text())[0]["step"] == 24


def accelerate_launch(*options, launcher="accelerate.commands.launch"):
    """`accelerate launch OPTIONS` (or another `launcher` module taking its options), none left to warn about."""
    return (sys.executable, "-m", launcher, *options, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1")


def test_two_processes_with_accelerate_launch(tiny_hub_folder, synthetic_data, tmp_path):
    # accelerate's own --cpu flag runs a single process; torchrun-style processes with Accelerator(cpu=True) use gloo.
    launcher = accelerate_launch("--multi_gpu", "--num_processes", "2")
    output = tmp_path / "ddp"
    command = [*launcher, str(PRETRAIN), *pretrain_command(tiny_hub_folder, synthetic_data, output, "--num_epochs", 1,
                                                           "--global_negatives", "--cpu")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((output / "training_history.json").read_text())
    assert len(history) == 1 and history[0]["step"] == 3  # 24 rows / (2 processes x 4)
    assert AutoModel.from_pretrained(output / "final") is not None
    random_states = load_file(output / "checkpoints" / "step_3" / "random_states.safetensors")
    assert {key.split(".")[0] for key in random_states} == {"process_0", "process_1"}


LAUNCHER = accelerate_launch("--cpu", "--num_processes", "1", launcher="ace_lora_hf.training.launch")


def test_a_user_error_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    table = tmp_path / "missing.csv"
    result = subprocess.run([*LAUNCHER, str(PRETRAIN), "--model", "m", "--train_file", str(table), "--output_dir",
                             str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert errors == [f"pretrain.py: error: {table} not found: expected the --train_file table."]


def test_two_processes_print_a_user_error_once_and_exit_2(tiny_hub_folder, synthetic_data, tmp_path):
    """Both processes meet the missing table; the first prints it, and the launcher exits as the script did."""
    launcher = accelerate_launch("--multi_gpu", "--num_processes", "2", launcher="ace_lora_hf.training.launch")
    command = pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run", "--cpu")
    table = tmp_path / "missing.csv"
    command[command.index("--train_file") + 1] = str(table)
    result = subprocess.run([*launcher, str(PRETRAIN), *command], capture_output=True, text=True)
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert errors == [f"pretrain.py: error: {table} not found: expected the --train_file table."]


def test_an_error_inside_the_training_loop_is_marked_as_this_process_own(tiny_hub_folder, synthetic_data, tmp_path):
    """Each process trains on its own shard: an error there is printed by every process that meets it."""
    args = pretrain.parse_args(pretrain_command(tiny_hub_folder, synthetic_data, tmp_path / "run"))
    model, processor = load_trained_model(tiny_hub_folder, AceLoraModel)
    loader = data_loader(load_image_text_dataset(args.train_file, COLUMNS), args, shuffle=False,
                         collate_fn=ImageTextCollator(processor))
    run = TrainingRun(build_accelerator(args), args, model, processor, loader, base=BaseModel.of(model, "m"),
                      selection=Selection("loss", higher_is_better=False))

    def unreadable_batch(model, batch):
        raise ImageLoadError("broken.png", "not an image")

    with pytest.raises(ImageLoadError) as raised:
        run.train(unreadable_batch)
    assert getattr(raised.value, MET_ALIKE) is False


def test_the_test_evaluation_marks_its_errors_as_this_process_own():
    """The test split is sharded like the training set: an unreadable image there is one process's own error."""
    from ace_lora_hf.training.finetuning import SEGMENTATION, evaluate_head

    def unreadable_shard():
        raise ImageLoadError("test/broken.png", "not an image")
        yield

    with pytest.raises(ImageLoadError) as raised:
        evaluate_head(SEGMENTATION, None, torch.nn.Identity(), unreadable_shard())
    assert getattr(raised.value, MET_ALIKE) is False


def test_a_bug_under_the_launcher_keeps_its_traceback(tmp_path):
    (tmp_path / "buggy.py").write_text("raise RuntimeError('a bug, not the user')\n")
    result = subprocess.run([*LAUNCHER, str(tmp_path / "buggy.py")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("RuntimeError: a bug, not the user")


def test_an_interrupted_save_is_never_the_latest_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_4", "step_12", ".step_16.0123abcd.staging", "step_20.tmp"):
        (checkpoints / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == checkpoints / "step_12"
    assert latest_checkpoint(tmp_path / "empty") is None
