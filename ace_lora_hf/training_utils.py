"""Pieces shared by the Accelerate training scripts: resumable progress, atomic checkpoints and model folders."""

import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator


CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")
RUN_OUTPUTS = ("checkpoints", "final", "best", "adapters")


class TrainingProgress:
    """Where training stands; registered for checkpointing so that a resumed run continues exactly."""

    def __init__(self):
        self.epoch = 0
        self.step_in_epoch = 0
        self.completed_steps = 0
        self.epoch_loss_sum = 0.0
        self.best_score = math.inf  # lower is better (a loss, or a negated metric)
        self.history: list[dict] = []

    def record_step(self, accelerator: Accelerator, loss, bar) -> None:
        """Count a finished step and add its loss (averaged over processes) to the epoch's."""
        self.step_in_epoch += 1
        self.completed_steps += 1
        self.epoch_loss_sum += accelerator.reduce(loss.detach(), reduction="mean").item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", epoch=self.epoch)

    def epoch_batches(self, accelerator: Accelerator, loader):
        """The loader for the current epoch, past the batches a resumed run already trained on."""
        loader.set_epoch(self.epoch)
        return accelerator.skip_first_batches(loader, self.step_in_epoch) if self.step_in_epoch else loader

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; an interrupted save (`*.tmp`) never counts."""
    steps = [(int(m.group(1)), p) for p in checkpoint_dir(output_dir).glob("step_*")
             if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to train over an earlier run unless resuming it or told to replace it."""
    if resuming or overwrite or not output_dir.exists():
        return
    earlier = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if earlier:
        raise SystemExit(
            f"{output_dir} holds an earlier run ({', '.join(earlier)}): pass --resume_from_checkpoint latest "
            "to continue it, --overwrite_output_dir to replace it, or another --output_dir."
        )


@contextmanager
def atomic_directory(accelerator: Accelerator, target: Path):
    """Yield a temporary folder that becomes `target` only once everything was written into it."""
    staging = target.with_name(target.name + ".tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    yield staging
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """The full training state (model, optimizer, scheduler, RNGs, progress), keeping the `keep` newest."""
    with atomic_directory(accelerator, checkpoint_dir(output_dir) / f"step_{step}") as staging:
        accelerator.save_state(str(staging))
    accelerator.print(f"saved checkpoint step_{step}")
    if accelerator.is_main_process:
        steps = sorted(int(m.group(1)) for p in checkpoint_dir(output_dir).iterdir()
                       if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))
        for old in steps[:-keep]:
            shutil.rmtree(checkpoint_dir(output_dir) / f"step_{old}")


def save_model(accelerator: Accelerator, model, processor, target: Path) -> None:
    """`save_pretrained` (and the processor) into `target`, atomically."""
    with atomic_directory(accelerator, target) as staging:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(staging, save_function=accelerator.save)
            if processor is not None:
                processor.save_pretrained(staging)


def resume(accelerator: Accelerator, output_dir: Path, checkpoint: str | None, logger) -> None:
    """Load `checkpoint` (a folder, or 'latest' in `output_dir`) into the registered training state."""
    if not checkpoint:
        return
    path = latest_checkpoint(output_dir) if checkpoint == "latest" else Path(checkpoint)
    if path is None:
        logger.info("No checkpoint in %s yet: starting from scratch.", checkpoint_dir(output_dir))
        return
    accelerator.load_state(str(path))
    logger.info("Resumed from %s", path)


__all__ = ["TrainingProgress", "atomic_directory", "check_output_dir", "latest_checkpoint", "resume",
           "save_checkpoint", "save_model"]
