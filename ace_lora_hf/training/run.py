"""What pretraining and the downstream fine-tunes share: their options (any of which a `--config FILE.yaml` can give),
the Accelerator, the output folder held for the run, checkpoints that hold only what trains, the selection of the
best epoch, the training history and the guards against non-finite losses and weights. A script adds its options,
its data and the loss of one batch (`TrainingRun.train`).

Outputs of a run in `--output_dir`:
- `checkpoints/step_N/`: a resumable checkpoint (`--resume_from_checkpoint latest`): the trainable weights, the
  optimizer, scheduler, RNG and progress state, and a reference to the frozen base they apply to;
- `best/`: the trainable weights of the best epoch and the same reference (`load_trained_model` and every script's
  `--model` read it; `--save_full_best` or `materialize_checkpoint` make it a complete model folder);
- `final/`: the model after the last step as a complete `save_pretrained` folder (model and processor), written
  once, at the end;
- `training_history.json`: one record per epoch (valid JSON: an undefined metric is `null`).

Every file of a checkpoint is safetensors or JSON and is read by this module alone: nothing is unpickled, so a
checkpoint folder from elsewhere cannot run code (Accelerate's `load_state` unpickles registered objects with
`weights_only=False`, which is why it is not used).
"""

import argparse
import copy
import difflib
import hashlib
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, ProjectConfiguration, gather_object, is_tensorboard_available,
                              is_wandb_available, set_seed)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging

from ..errors import CheckpointError, InvalidArgumentError, OutputPathError, TrainingDivergedError
from ..sources.checkpoints import (CHECKPOINT_PATTERN, CHECKPOINT_RECORD, BaseModel, is_checkpoint, latest_checkpoint,
                                   load_trained_weights, non_finite_parameters, read_checkpoint_record, read_json,
                                   read_tensors, save_tensors, trainable_parameters, write_trained_weights)
from ..sources.convert import save_model_folder
from ..outputs.safe_outputs import atomic_folder, ensure_folder, folder_lock, json_safe, write_json_atomic


logger = logging.get_logger(__name__)

OPTIMIZER_STATE = "optimizer.safetensors"
RANDOM_STATES = "random_states.safetensors"
TRAINING_STATE = "training_state.json"  # progress, scheduler, the optimizer's other values, the run's settings
RUN_OUTPUTS = ("checkpoints", "best", "final", "adapters", "training_history.json", "test_results.json")
TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


# ----------------------------------------------------------------------------------------------------- options


def default_num_workers() -> int:
    """DataLoader workers: one per core the training process leaves free, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{value} is not a number >= 0")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Lists each option once, by its underscore spelling."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1:
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


class TrainingArgumentParser(argparse.ArgumentParser):
    """`argparse` for the training scripts: every option is `--name_with_underscores` (also accepted as
    `--name-with-dashes`), and `--config FILE.yaml` can give any of them, required ones included. The command line
    overrides the file; a key of the file that names no option is refused."""

    def __init__(self, description: str | None):
        super().__init__(description=description, formatter_class=_HelpFormatter, allow_abbrev=False,
                         epilog="Every option is also accepted with dashes (--output-dir for --output_dir).")
        self.option_names: list[str] = []
        self.add_option("config", type=Path, metavar="FILE.yaml",
                        help="YAML mapping of option names to values (the command line overrides them).")

    def add_option(self, name: str, group: argparse._ArgumentGroup | None = None, **kwargs) -> None:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        (group or self).add_argument(*flags, dest=name, **kwargs)
        self.option_names.append(name)

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse `argv` (default: `sys.argv`) after the options of its `--config` file, so that argparse checks the
        file's values as it checks the command line's (types, choices, required options)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        finder.add_argument("--config", type=Path)
        config = finder.parse_known_args(argv)[0].config
        return self.parse_args([*(config_arguments(config, self.option_names) if config else []), *argv])


def config_arguments(path: Path, option_names: Sequence[str]) -> list[str]:
    """The options of a YAML file as command-line arguments."""
    values = _read_config(path)
    arguments = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in option_names or name == "config":
            close = difflib.get_close_matches(name, option_names, n=1)
            raise InvalidArgumentError(f"--config {path}: unknown option {key!r}"
                                       + (f" (did you mean {close[0]!r}?)" if close else "")
                                       + "; the options are those listed by --help.")
        if isinstance(value, dict):
            raise InvalidArgumentError(f"--config {path}: option {key!r} has a mapping as its value; give a value "
                                       "or a list.")
        if isinstance(value, bool):
            arguments += [f"--{name}"] if value else []
        elif isinstance(value, list):
            arguments += [f"--{name}", *map(str, value)]
        elif value is not None:
            arguments.append(f"--{name}={value}")
    return arguments


def _read_config(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InvalidArgumentError(f"--config {path}: cannot read it ({error.strerror}).") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"--config {path}: not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as error:
        raise InvalidArgumentError(f"--config {path}: not valid YAML ({' '.join(str(error).split())}).") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidArgumentError(f"--config {path}: expected a mapping of option names to values, got a "
                                   f"{type(values).__name__}.")
    return values


def add_training_options(parser: TrainingArgumentParser, *, num_epochs: int, batch_size: int, learning_rate: float,
                         weight_decay: float, warmup_epochs: float, seed: int) -> None:
    """The options every training script has; the arguments are the task's defaults."""
    training = parser.add_argument_group("training")
    add = parser.add_option
    add("output_dir", training, type=Path, required=True, help="Where checkpoints, the history and the models go.")
    add("num_epochs", training, type=positive_int, default=num_epochs, help="(default: %(default)s)")
    add("batch_size", training, type=positive_int, default=batch_size, help="Per device (default: %(default)s).")
    add("learning_rate", training, type=positive_float, default=learning_rate, help="AdamW's (default: %(default)s).")
    add("weight_decay", training, type=non_negative_float, default=weight_decay,
        help="AdamW's (default: %(default)s).")
    add("warmup_epochs", training, type=non_negative_float, default=warmup_epochs,
        help="Linear warm-up before the cosine schedule, in epochs (default: %(default)s).")
    add("seed", training, type=int, default=seed, help="(default: %(default)s)")
    add("gradient_accumulation_steps", training, type=positive_int, default=1, help="(default: %(default)s)")
    add("max_train_steps", training, type=positive_int, help="Stop after this many steps (for short runs).")
    add("max_non_finite_steps", training, type=non_negative_int, default=0,
        help="Skip up to this many steps whose loss is NaN or infinite before stopping (default: stop at the first).")
    add("log_every_steps", training, type=positive_int, default=10, help="(default: %(default)s)")

    hardware = parser.add_argument_group("hardware")
    add("mixed_precision", hardware, choices=["no", "fp16", "bf16"], default="no", help="(default: %(default)s)")
    add("cpu", hardware, action="store_true",
        help="Train on the CPU (several processes over gloo with accelerate launch --multi_gpu --num_processes N).")
    add("num_workers", hardware, type=non_negative_int, default=default_num_workers(),
        help="DataLoader workers decoding images (default: one per free core, at most 4: %(default)s here).")

    outputs = parser.add_argument_group("checkpoints and outputs")
    add("checkpointing_steps", outputs, type=non_negative_int, default=0,
        help="Also save a resumable checkpoint every N steps (default: at the end of every epoch only).")
    add("keep_checkpoints", outputs, type=positive_int, default=3, help="How many recent checkpoints to keep.")
    add("resume_from_checkpoint", outputs, metavar="FOLDER|latest",
        help="Continue from a checkpoint folder, or the newest in OUTPUT_DIR/checkpoints.")
    add("force_resume", outputs, action="store_true",
        help="Resume although the batch size, data or schedule differ from the checkpoint's run.")
    add("overwrite_output_dir", outputs, action="store_true", help="Replace an earlier run in --output_dir.")
    add("save_full_best", outputs, action="store_true",
        help="At the end, make best/ a complete model folder (it holds only the trained weights otherwise).")
    add("report_to", outputs, choices=["none", *TRACKERS], default="none",
        help="Experiment tracker: tensorboard or wandb (pip install 'ace-lora-hf[tensorboard]' or '[wandb]').")


def require_tracker(report_to: str) -> None:
    """Fail now, not after the model loaded, when the tracker asked for is not installed."""
    if report_to in TRACKERS and not TRACKERS[report_to]():
        raise InvalidArgumentError(f"--report_to {report_to}: {report_to} is not installed; pip install "
                                   f"'ace-lora-hf[{report_to}]', or pass --report_to none.")


# ------------------------------------------------------------------------------------------ accelerator, data


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator of a run (precision, accumulation, tracker, the seed set)."""
    require_tracker(args.report_to)
    try:
        accelerator = Accelerator(
            cpu=args.cpu,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=str(args.output_dir),
                                                logging_dir=str(args.output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except ValueError as error:  # e.g. fp16 on a CPU
        raise InvalidArgumentError(f"--mixed_precision {args.mixed_precision} / --cpu: {error}") from None
    set_seed(args.seed)
    return accelerator


def data_loader(dataset: Dataset, args: argparse.Namespace, shuffle: bool, collate_fn=None) -> DataLoader:
    # A generator of its own keeps the loader from drawing on the global RNG (dropout) when an epoch starts, so a
    # resumed run, whose global RNG state comes from the checkpoint, draws exactly what the uninterrupted run drew.
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available() and not args.cpu,
                      generator=torch.Generator().manual_seed(args.seed))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ output folder


@contextmanager
def prepare_output_dir(accelerator: Accelerator, args: argparse.Namespace,
                       reuse: bool = False) -> Iterator[Path | None]:
    """Check `--output_dir` and hold it for this run (a second job on it is refused); yields the checkpoint to resume
    from, if any. An earlier run there is refused unless the run resumes it, replaces it (`--overwrite_output_dir`)
    or only adds to it (`reuse`, e.g. an evaluation)."""
    output_dir = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"--output_dir {output_dir} is a file, not a folder; choose a folder.")
    resume = getattr(args, "resume_from_checkpoint", None)
    if resume and args.overwrite_output_dir:
        raise InvalidArgumentError("--resume_from_checkpoint and --overwrite_output_dir contradict each other: "
                                   "resume the earlier run or replace it.")
    earlier = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if earlier and not (resume or args.overwrite_output_dir or reuse):
        raise OutputPathError(f"--output_dir {output_dir} holds an earlier run ({', '.join(earlier)}): pass "
                              "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
                              "or another --output_dir.")
    model = Path(str(args.model))
    if args.overwrite_output_dir and model.exists() and output_dir.resolve() in model.resolve().parents:
        raise OutputPathError(f"--output_dir {output_dir} holds --model {model}; --overwrite_output_dir would delete "
                              "it. Choose another --output_dir.")
    checkpoint = _resume_checkpoint(output_dir, resume)
    with ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(folder_lock(output_dir, "--output_dir"))
            ensure_folder(output_dir, "--output_dir")
            if args.overwrite_output_dir:
                _remove_run_outputs(output_dir)
        accelerator.wait_for_everyone()
        yield checkpoint


def _resume_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / CHECKPOINT_RECORD).is_file():
            raise CheckpointError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no {CHECKPOINT_RECORD})"
                                  "; pass a checkpoints/step_N folder of a run, or 'latest'.")
        return path
    path = latest_checkpoint(output_dir)
    if path is None:
        logger.info("No checkpoint in %s yet: starting from scratch.", output_dir / "checkpoints")
    return path


def _remove_run_outputs(output_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ---------------------------------------------------------------------------------------------- training state


@dataclass
class TrainingProgress:
    """Where training stands; saved with every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches of the current epoch already consumed
    completed_steps: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    best_score: float | None = None  # lower is better: a loss, or a metric with its sign flipped
    best_epoch: int | None = None
    non_finite_steps: int = 0
    skipped_batches: int = 0
    skipped_images: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        """A hand-edited or foreign training state is refused here rather than failing later, mid-run."""
        for name, value in asdict(self).items():
            if name == "history":
                valid = isinstance(value, list) and all(isinstance(record, dict) for record in value)
            elif name in ("epoch_loss_sum", "best_score"):
                valid = (value is None and name == "best_score") or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            else:
                valid = (value is None and name == "best_epoch") or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0)
            if not valid:
                raise ValueError(f"progress.{name} is {value!r}")


@dataclass(frozen=True)
class Selection:
    """Which entry of an epoch's record picks the best epoch, and in which direction."""

    metric: str
    higher_is_better: bool

    def score(self, record: dict) -> float | None:
        """The record's score, lower is better; None when the metric is missing or not finite."""
        value = record.get(self.metric)
        if value is None or not math.isfinite(value):
            return None
        return -value if self.higher_is_better else value


def _random_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch's as tensors, Python's and NumPy's as JSON values."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda_{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return tensors, {"python": random.getstate(), "numpy": numpy_state}


def _set_random_state(tensors: dict[str, torch.Tensor], values: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{index}"] for index in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(values["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's `state_dict` as tensors (`"{parameter}.{name}"`) and JSON values."""
    tensors, values = {}, {}
    for parameter, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{parameter}.{name}"] = value
            else:
                values.setdefault(str(parameter), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        parameter, name = key.split(".", 1)
        state.setdefault(int(parameter), {})[name] = tensor
    for parameter, entries in saved["values"].items():
        state.setdefault(int(parameter), {}).update(entries)
    return {"state": state, "param_groups": saved["param_groups"]}


# --------------------------------------------------------------------------------------------------- the run


class TrainingRun:
    """One training job: the optimizer and schedule, the loop with its guards, checkpoints, best-epoch selection, the
    history and the final model. The script supplies the loss of a batch and, optionally, the evaluation of an epoch.

    Args:
        accelerator: The run's `Accelerator` (see `build_accelerator`).
        args: The parsed options (see `add_training_options`).
        model: The model, not yet prepared, with `requires_grad` on exactly what trains.
        processor: Its processor, saved with the final model.
        train_loader: The training `DataLoader`, not yet prepared (see `data_loader`).
        base: The frozen base the trained weights apply to (`BaseModel.of(model, args.model)`).
        selection: The record entry that picks the best epoch.
        signature: What else must not change for a checkpoint to continue this run (e.g. the data's hash); the batch
            size, schedule, seed and number of processes are always part of it.
        resume_checkpoint: The checkpoint to continue from (see `prepare_output_dir`), or None.
    """

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, model, processor, train_loader: DataLoader,
                 base: BaseModel, selection: Selection, signature: dict | None = None,
                 resume_checkpoint: Path | None = None, project_name: str = "ace_lora"):
        self.accelerator, self.args, self.processor = accelerator, args, processor
        self.base, self.selection = base, selection
        self.output_dir: Path = args.output_dir
        self.signature = json_safe({
            "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": accelerator.num_processes, "num_epochs": args.num_epochs,
            "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs, "seed": args.seed, **(signature or {}),
        })
        optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=args.learning_rate,
                                      weight_decay=args.weight_decay, betas=(0.9, 0.999))
        updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_epochs * updates_per_epoch),
                                                    updates_per_epoch * args.num_epochs)
        self.model, self.optimizer, self.train_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, scheduler)
        self.progress = TrainingProgress()
        if resume_checkpoint is not None:
            self._resume(resume_checkpoint)
        if args.report_to != "none":
            accelerator.init_trackers(project_name, config={key: str(value) for key, value in vars(args).items()})

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------ loop

    def train(self, compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor],
              evaluate: Callable[[int], dict] | None = None, log_values: Callable[[], dict] | None = None) -> None:
        """Train to the end (or `--max_train_steps`), then write `final/`.

        `compute_loss(model, batch)` is the loss of a batch; `evaluate(epoch)`, if given, returns the metrics of an
        epoch's record (prefixed, e.g. `valid_map`); `log_values()` adds to what is logged every `--log_every_steps`.
        """
        args, progress = self.args, self.progress
        bar = tqdm(total=args.max_train_steps or len(self.train_loader) * args.num_epochs,
                   initial=progress.completed_steps, desc="training", unit="step",
                   disable=not self.accelerator.is_local_main_process)
        while progress.epoch < args.num_epochs and not self._stop():
            if self._run_epoch(compute_loss, log_values, bar):
                self._end_epoch(evaluate)
        bar.close()
        self._save_final()

    def _run_epoch(self, compute_loss, log_values, bar: tqdm) -> bool:
        """Train on what is left of the current epoch; False if `--max_train_steps` ended it early."""
        self.model.train()
        for batch in self._epoch_batches():
            loss = self._train_step(batch, compute_loss)
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", epoch=self.progress.epoch)
            self._after_step(loss, log_values)
            if self._stop() and self.progress.step_in_epoch < len(self.train_loader):
                return False
        return True

    def _stop(self) -> bool:
        return bool(self.args.max_train_steps) and self.progress.completed_steps >= self.args.max_train_steps

    def _epoch_batches(self):
        """The loader for the current epoch, past the batches a resumed run already trained on."""
        self.train_loader.set_epoch(self.progress.epoch)
        if self.progress.step_in_epoch:
            return self.accelerator.skip_first_batches(self.train_loader, self.progress.step_in_epoch)
        return self.train_loader

    def _train_step(self, batch: dict, compute_loss) -> float | None:
        """One step; returns the loss (averaged over processes), or None when the step was skipped."""
        self.progress.skipped_images += int(batch.pop("num_skipped", 0))
        if not self._every_process_has_samples(batch):
            self.progress.skipped_batches += 1
            return None
        with self.accelerator.accumulate(self.model):
            loss = compute_loss(self.model, batch)
            value = self.accelerator.reduce(loss.detach().float(), reduction="mean").item()
            if not math.isfinite(value):
                self._non_finite_loss(value)
                return None
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return value

    def _every_process_has_samples(self, batch: dict) -> bool:
        """Whether no process's batch lost all its images: otherwise every process skips the step together (one
        process leaving out its forward and backward would stall the others)."""
        size = len(batch["pixel_values"]) if "pixel_values" in batch else 0
        return bool(self.accelerator.gather(torch.tensor([size], device=self.accelerator.device)).min() > 0)

    def _non_finite_loss(self, value: float) -> None:
        self.progress.non_finite_steps += 1
        step = self.progress.completed_steps + 1
        if self.progress.non_finite_steps > self.args.max_non_finite_steps:
            raise TrainingDivergedError(
                f"step {step}: the loss is {value}; training diverged, and nothing non-finite was saved. Lower "
                f"--learning_rate (now {self.args.learning_rate:g}) and train again, or resume an earlier checkpoint "
                "(--resume_from_checkpoint with --force_resume); --max_non_finite_steps N skips up to N such steps.")
        logger.warning("Step %d: the loss is %s; the step is skipped (%d of at most %d).", step, value,
                       self.progress.non_finite_steps, self.args.max_non_finite_steps)

    def _after_step(self, loss: float | None, log_values) -> None:
        progress, args = self.progress, self.args
        progress.step_in_epoch += 1
        progress.completed_steps += 1
        if loss is not None:
            progress.epoch_loss_sum += loss
            progress.epoch_loss_steps += 1
            if progress.completed_steps % args.log_every_steps == 0:
                values = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0]}
                self.accelerator.log({**values, **(log_values() if log_values else {})}, step=progress.completed_steps)
        ends_epoch = progress.step_in_epoch == len(self.train_loader)  # the epoch's own checkpoint follows
        if args.checkpointing_steps and progress.completed_steps % args.checkpointing_steps == 0 and not ends_epoch:
            self.save_checkpoint()

    def _end_epoch(self, evaluate) -> None:
        progress = self.progress
        epoch = progress.epoch
        loss = progress.epoch_loss_sum / progress.epoch_loss_steps if progress.epoch_loss_steps else None
        record = {"epoch": epoch, "step": progress.completed_steps, "loss": loss}
        if evaluate is not None:
            record.update(evaluate(epoch))
        record = json_safe(record)
        self.accelerator.print(json.dumps(record))
        self.accelerator.log({f"epoch/{key}": value for key, value in record.items()
                              if key not in ("epoch", "step") and isinstance(value, (int, float))},
                             step=progress.completed_steps)
        progress.history.append(record)
        score = self.selection.score(record)
        is_best = progress.best_epoch is None or (score is not None and (progress.best_score is None
                                                                         or score < progress.best_score))
        if is_best:
            progress.best_score, progress.best_epoch = score, epoch
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        progress.epoch_loss_sum, progress.epoch_loss_steps = 0.0, 0
        if is_best:
            self._save_trained(self.output_dir / "best", epoch=epoch, step=record["step"],
                               **{self.selection.metric: record.get(self.selection.metric)})
        if self.accelerator.is_main_process:
            write_json_atomic(self.output_dir / "training_history.json", progress.history)
        self.save_checkpoint()

    # ------------------------------------------------------------------------------------------ saving

    def _require_finite_weights(self) -> None:
        bad = non_finite_parameters(self.unwrapped_model)
        if bad:
            raise TrainingDivergedError(
                f"after step {self.progress.completed_steps} the weights {bad[0]}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                + f" are NaN or infinite; nothing was saved. Lower --learning_rate (now {self.args.learning_rate:g}) "
                "and train again, or resume an earlier checkpoint (--resume_from_checkpoint with --force_resume).")

    def _save_trained(self, folder: Path, **details) -> None:
        """The trained weights alone (with the reference to their base) into `folder`, replacing it atomically."""
        self._require_finite_weights()
        if self.accelerator.is_main_process:
            with atomic_folder(folder) as staging:
                write_trained_weights(self.unwrapped_model, staging, self.base, **details)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        """A resumable checkpoint `checkpoints/step_N/`, keeping the `--keep_checkpoints` newest."""
        self._require_finite_weights()
        random_states = gather_object([_random_state()])
        step = self.progress.completed_steps
        folder = self.output_dir / "checkpoints" / f"step_{step}"
        if self.accelerator.is_main_process:
            ensure_folder(folder.parent)
            with atomic_folder(folder) as staging:
                write_trained_weights(self.unwrapped_model, staging, self.base, epoch=self.progress.epoch, step=step)
                self._write_training_state(staging, random_states)
            self._remove_old_checkpoints()
        self.accelerator.wait_for_everyone()
        self.accelerator.print(f"saved checkpoint step_{step}")

    def _write_training_state(self, folder: Path, random_states: list) -> None:
        optimizer_tensors, optimizer_values = _split_optimizer_state(self.optimizer.state_dict())
        save_tensors(optimizer_tensors, folder / OPTIMIZER_STATE)
        save_tensors({f"process_{index}.{name}": tensor for index, (tensors, _) in enumerate(random_states)
                       for name, tensor in tensors.items()}, folder / RANDOM_STATES)
        scaler = self.accelerator.scaler
        write_json_atomic(folder / TRAINING_STATE, {
            "progress": asdict(self.progress),
            "signature": self.signature,
            "optimizer": optimizer_values,
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "accelerator_step": self.accelerator.step,
            "random_states": [values for _, values in random_states],
        })

    def _remove_old_checkpoints(self) -> None:
        folder = self.output_dir / "checkpoints"
        steps = sorted(int(match.group(1)) for path in folder.iterdir()
                       if (match := CHECKPOINT_PATTERN.fullmatch(path.name)))
        for step in steps[: -self.args.keep_checkpoints]:
            shutil.rmtree(folder / f"step_{step}")

    def _save_final(self) -> None:
        """`final/`: the model after the last step as a complete model folder, written once."""
        self._require_finite_weights()
        if self.accelerator.is_main_process:
            save_model_folder(self.unwrapped_model, self.processor, self.output_dir / "final")
        self.accelerator.wait_for_everyone()

    def restore_best(self) -> None:
        """Put the weights of the best epoch (`best/`) back into the model; without one (`--max_train_steps` ended the
        run before an epoch did), the model keeps the last step's."""
        if not is_checkpoint(self.output_dir / "best"):
            logger.warning("No epoch was completed, so there is no best epoch: the model keeps the last step's "
                           "weights.")
            return
        load_trained_weights(self.unwrapped_model, self.output_dir / "best")

    def finish(self) -> None:
        """End the run: `best/` made a complete model folder with `--save_full_best` (the model then holds the best
        epoch's weights), the trackers closed, and what was skipped said."""
        if self.args.save_full_best and is_checkpoint(self.output_dir / "best"):
            self.restore_best()
            if self.accelerator.is_main_process:
                save_model_folder(self.unwrapped_model, self.processor, self.output_dir / "best")
            self.accelerator.wait_for_everyone()
        progress = self.progress
        for count, what in ((progress.skipped_images, "unreadable image(s) left out of their batch"),
                            (progress.skipped_batches, "batch(es) skipped: no image of theirs could be read"),
                            (progress.non_finite_steps, "step(s) skipped for a non-finite loss")):
            if count:
                logger.warning("%d %s.", count, what)
        self.accelerator.end_training()

    # --------------------------------------------------------------------------------------------- resume

    def _resume(self, folder: Path) -> None:
        """Continue from `folder`: every file is read and checked before anything is changed."""
        record = read_checkpoint_record(folder)
        if record["base"].get("fingerprint") != self.base.fingerprint:
            raise CheckpointError(f"--resume_from_checkpoint {folder}: it was trained on another base "
                                  f"({record['base'].get('source')}) than --model {self.base.source} (the frozen "
                                  "weights differ); pass the --model the run started from.")
        state = read_json(folder / TRAINING_STATE)
        optimizer_tensors = read_tensors(folder / OPTIMIZER_STATE)
        random_tensors = read_tensors(folder / RANDOM_STATES)
        self._check_signature(folder, state.get("signature", {}))
        load_trained_weights(self.unwrapped_model, folder)
        try:
            self.optimizer.load_state_dict(_join_optimizer_state(optimizer_tensors, state["optimizer"]))
            self.scheduler.load_state_dict(state["scheduler"])
            if self.accelerator.scaler is not None and state["scaler"] is not None:
                self.accelerator.scaler.load_state_dict(state["scaler"])
            self.accelerator.step = state["accelerator_step"]
            self.progress = TrainingProgress(**state["progress"])
            self._restore_random_state(random_tensors, state["random_states"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{folder / TRAINING_STATE}: does not fit this run ({type(error).__name__}: "
                                  f"{error}); resume another checkpoint or start again.") from None
        logger.info("Resumed from %s (step %d, epoch %d)", folder, self.progress.completed_steps, self.progress.epoch)

    def _check_signature(self, folder: Path, saved: dict) -> None:
        changed = [f"{key}: {saved.get(key)!r} then, {value!r} now" for key, value in self.signature.items()
                   if saved.get(key) != value]
        if changed and not self.args.force_resume:
            raise CheckpointError(f"--resume_from_checkpoint {folder}: this run differs from the one that wrote it "
                                  f"({'; '.join(changed)}), so resuming would not continue that run; pass "
                                  "--force_resume to resume anyway, or start a new --output_dir.")
        if changed:
            logger.warning("Resuming %s although the run differs (%s).", folder, "; ".join(changed))

    def _restore_random_state(self, tensors: dict[str, torch.Tensor], values: list[dict]) -> None:
        index = self.accelerator.process_index
        if index >= len(values):  # only with --force_resume on more processes than before
            logger.warning("The checkpoint holds no random state for process %d; it keeps its own.", index)
            return
        prefix = f"process_{index}."
        _set_random_state({key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)},
                          values[index])


__all__ = ["Selection", "TrainingArgumentParser", "TrainingProgress", "TrainingRun", "add_training_options",
           "build_accelerator", "data_loader", "file_sha256", "prepare_output_dir", "require_tracker"]
