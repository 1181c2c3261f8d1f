"""The output folder of a run, `--output_dir`, checked and held for the run (a second job on it is refused), and the
checkpoint a run resumes from."""

import argparse
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from accelerate import Accelerator
from transformers.utils import logging

from ..errors import CheckpointError, InvalidArgumentError, OutputPathError
from ..outputs.safe_outputs import ensure_folder, folder_lock
from ..sources.checkpoints import CHECKPOINT_RECORD, latest_checkpoint


logger = logging.get_logger(__name__)

RUN_OUTPUTS = ("checkpoints", "best", "final", "adapters", "training_history.json", "test_results.json")


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


__all__ = ["RUN_OUTPUTS", "prepare_output_dir"]
