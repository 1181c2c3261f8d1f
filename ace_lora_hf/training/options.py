"""The options every training script shares: a parser whose options are `--name_with_underscores` (also accepted as
`--name-with-dashes`, listed once in `--help`), any of which a `--config FILE.yaml` can give, and the options of a
training run (schedule, hardware, checkpoints and outputs)."""

import argparse
import copy
import difflib
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from accelerate.utils import is_tensorboard_available, is_wandb_available

from ..errors import InvalidArgumentError
from ..outputs.launched_processes import before_a_usage_error, checks_alike_in_every_process


TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


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

    def error(self, message: str):
        before_a_usage_error()
        super().error(message)

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
        with checks_alike_in_every_process():
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
    add("max_train_steps", training, type=positive_int,
        help="Stop after this many steps (for short runs); the stop is evaluated, recorded and a candidate for best/.")
    add("max_non_finite_steps", training, type=non_negative_int, default=0,
        help="Skip up to this many steps whose loss is NaN or infinite before stopping (default: stop at the first).")
    add("log_every_steps", training, type=positive_int, default=10, help="(default: %(default)s)")

    hardware = parser.add_argument_group("hardware")
    add("mixed_precision", hardware, choices=["no", "fp16", "bf16"], default="no", help="(default: %(default)s)")
    add("cpu", hardware, action="store_true",
        help="Train on the CPU (several processes over gloo with accelerate launch --multi_gpu --num_processes N).")
    add("num_workers", hardware, type=non_negative_int,
        help="DataLoader workers decoding images (default: none beside a model on the CPU, whose matrix products "
             "use every core; beside a GPU, one per core left free, at most 8).")

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


__all__ = ["TRACKERS", "TrainingArgumentParser", "add_training_options", "config_arguments", "non_negative_float",
           "non_negative_int", "positive_float", "positive_int", "require_tracker"]
