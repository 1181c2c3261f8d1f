"""The options every command shares, spelled the same everywhere, and what turns them into a device and a model.

Every option is spelled with dashes (`--batch-size`); the underscore spelling (`--batch_size`) and older names
(`--ace-checkpoint` for `--adapters`) are accepted as aliases that `--help` does not list. This module imports
neither torch nor transformers at its top, so that `--help` answers at once: what needs them is imported inside the
functions that run after parsing.
"""

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from ..outputs.launched_processes import before_a_usage_error


if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from ..sources.load import LoadedModel

RELEASED = "released"  # as ace_lora_hf.sources.released_adapters.RELEASED, which imports torch
BIOMEDCLIP_REPO_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
HIDDEN_ALIASES = "hidden_aliases"  # the attribute of an argparse action holding the aliases --help leaves out


class CommandHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option under its canonical spelling only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, HIDDEN_ALIASES, ())
        if not hidden:
            return super()._format_action_invocation(action)
        shown = argparse.Action([name for name in action.option_strings if name not in hidden], action.dest,
                                nargs=action.nargs, metavar=action.metavar)
        return super()._format_action_invocation(shown)


class CommandParser(argparse.ArgumentParser):
    """Usage errors name each option by its canonical spelling only, as --help does, and are printed once by a job of
    several processes."""

    def error(self, message: str):
        before_a_usage_error()
        for action in self._actions:
            if getattr(action, HIDDEN_ALIASES, ()):
                message = message.replace("/".join(action.option_strings), action.option_strings[0])
        super().error(message)


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    return CommandParser(prog=prog, description=description, formatter_class=CommandHelpFormatter, allow_abbrev=False)


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *aliases: str,
               **kwargs: Any) -> argparse.Action:
    """`name` (dash style) with its underscore spelling and `aliases` accepted but left out of --help."""
    underscored = "--" + name[2:].replace("-", "_")
    hidden = tuple(dict.fromkeys(alias for alias in (underscored, *aliases) if alias != name))
    action = parser.add_argument(name, *hidden, **kwargs)
    setattr(action, HIDDEN_ALIASES, hidden)
    return action


# ----------------------------------------------------------------------------------------------------- options


def add_model_options(parser: argparse.ArgumentParser, *, tokenizer: bool = False) -> None:
    """--model (default: the released model), --revision, and what builds the released model."""
    group = parser.add_argument_group("model")
    add_option(group, "--model", default=RELEASED,
               help="'released' (the default: BiomedCLIP with the authors' adapters), a model folder or Hub "
                    "repository in ACE-LoRA's format, a training run's folder (its best/, else final/, else newest "
                    "checkpoint) or one of its checkpoints (best/, checkpoints/step_N/).")
    add_option(group, "--revision", help="Branch, tag or commit of a Hub repository.")
    add_option(group, "--biomedclip",
               help=f"BiomedCLIP folder or Hub repository the released model is built from (default: "
                    f"{BIOMEDCLIP_REPO_ID}).")
    add_option(group, "--adapters", "--ace-checkpoint", "--ace_checkpoint",
               help="Adapters of the released model: 'released' (shipped with the package; the default) or an "
                    "ACE_LoRA.pt.")
    if tokenizer:
        add_option(group, "--tokenizer", help="Tokenizer folder or Hub repository of the released model (default: "
                                              "BiomedCLIP's).")


def add_device_options(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    group = parser.add_argument_group("device")
    add_option(group, "--device", default="auto", type=device_name, metavar="{auto,cpu,cuda,cuda:N,mps}",
               help="Where the model runs (auto: the GPU if there is one, or what accelerate launch gives). A device "
                    "this machine lacks is refused, never replaced by the CPU.")
    if dtype:
        add_option(group, "--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="auto: bfloat16 on GPUs that support it, float32 otherwise.")


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batches")
    add_option(group, "--batch-size", type=positive_int, default=16, help="Images a batch (default: %(default)s).")
    add_option(group, "--num-workers", type=non_negative_int,
               help="Processes decoding images beside the model (default: one per spare CPU, at most 8, beside a GPU; "
                    "none beside a model on the CPU, whose threads use every core).")


def add_output_options(parser: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    add_option(parser, "--output", type=Path, required=required, help=help)
    add_option(parser, "--overwrite", action="store_true", help="Replace an existing --output (never an input).")


def add_per_finding_options(parser: argparse.ArgumentParser, multi_label_help: str, negatives_with: str) -> None:
    """--multi-label (each label scored as a finding against its negative prompts) and --negative-templates."""
    add_option(parser, "--multi-label", action="store_true", help=multi_label_help)
    add_option(parser, "--negative-templates", "--negative-template", "--negative_template", nargs="+",
               help=f"With {negatives_with}: the negative prompts, each with one {{}} for the finding (default: each "
                    "template with 'no {}').")


def add_quiet_option(parser: argparse.ArgumentParser, help: str = "Print only the summary.") -> None:
    add_option(parser, "--quiet", action="store_true", help=help)


# ------------------------------------------------------------------------------------------------------- types


def device_name(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


def positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    if not text.strip().lstrip("+").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 0")
    return int(text)


# ---------------------------------------------------------------------------------------------- after parsing


def resolve_device(name: str) -> "torch.device":
    """The device `--device name` asks for; one that this machine lacks is an error, never the CPU instead."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise InvalidArgumentError(f"--device {name}: this machine has no CUDA GPU that torch can use; pass "
                                       "--device cpu (or auto), or install a CUDA build of torch.")
        if device.index is not None and device.index >= count:
            raise InvalidArgumentError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                       f"cuda:{count - 1}; pass one of them.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError(f"--device {name}: Apple's MPS is not available on this machine; pass --device "
                                   "cpu (or auto).")
    return device


def make_accelerator(name: str) -> "Accelerator":
    """An `Accelerator` on the device `--device name` asks for (checked first; under `accelerate launch`, auto is the
    process's own device)."""
    import torch
    from accelerate import Accelerator

    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    return Accelerator(cpu=device.type == "cpu")


def model_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """`--dtype name` on `device`: auto is bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def released_options(args: argparse.Namespace) -> dict[str, str]:
    """The released model's sources given on the command line; refused beside another --model, which they
    would not change."""
    given = {name: getattr(args, name) for name in ("biomedclip", "adapters", "tokenizer")
             if getattr(args, name, None) is not None}
    if given and str(args.model) != RELEASED:
        option = f"--{next(iter(given))}"
        raise InvalidArgumentError(f"{option} builds the released model, but --model {args.model} is another one; "
                                   f"leave {option} out, or leave --model out to build the released model with it.")
    return given


def model_summary(args: argparse.Namespace) -> str:
    """The model as a results file names it."""
    if str(args.model) != RELEASED:
        return str(args.model)
    return (f"released ({args.biomedclip or BIOMEDCLIP_REPO_ID} + {args.adapters or RELEASED}"
            f"{f', tokenizer {args.tokenizer}' if getattr(args, 'tokenizer', None) else ''})")


def check_model_source(args: argparse.Namespace) -> None:
    """What --model names is checked before any other work (a file is refused, a run folder found)."""
    from ..sources.load import resolve_source

    released_options(args)
    resolve_source(args.model, "--model")


def load_model(args: argparse.Namespace, device: "torch.device | str", dtype: "torch.dtype | None" = None,
               **kwargs: Any) -> "LoadedModel":
    """`ace_lora_hf.load` of the command line's model options."""
    from ..sources import load as loading

    return loading.load(args.model, revision=args.revision, device=device, dtype=dtype, option="--model",
                        **kwargs, **released_options(args))


def check_paths_exist(paths: Sequence[Path | None], option: str, kind: str = "file or folder") -> None:
    """One line naming the first of `paths` that is not there (a typo), before any model loads."""
    for path in paths:
        if path is not None and not Path(path).exists():
            raise InvalidArgumentError(f"{option} {path}: no such {kind}; check the path.")


__all__ = ["BIOMEDCLIP_REPO_ID", "RELEASED", "CommandHelpFormatter", "add_batch_options", "add_device_options",
           "add_model_options", "add_option", "add_output_options", "add_quiet_option", "check_model_source",
           "check_paths_exist", "command_parser", "load_model", "make_accelerator", "model_dtype", "model_summary",
           "resolve_device"]
