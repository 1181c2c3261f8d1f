"""The training loop a script runs (`TrainingRun`): the optimizer and schedule, the guards against non-finite losses
and weights, checkpoints that hold only what trains, the choice of `best/`, the history and the final model.

Outputs of a run in `--output_dir`:
- `checkpoints/step_N/`: a resumable checkpoint (`--resume_from_checkpoint latest`): the trainable weights, the
  optimizer, scheduler, RNG and progress state (`state`), and a reference to the frozen base they apply to;
- `best/`: the trainable weights of the best point, an epoch's end or the step where `--max_train_steps` stopped the
  run, and the same reference (`load_trained_model` and every script's `--model` read it; `--save_full_best` or
  `materialize_checkpoint` make it a complete model folder); the run's last line says which point it holds;
- `final/`: the model after the last step as a complete `save_pretrained` folder (model and processor), written
  once, at the end, also when `--max_train_steps` stops the run;
- `training_history.json`: one record per epoch, and one for the step where `--max_train_steps` stopped the run inside
  an epoch (`"stopped_by": "max_train_steps"`); each says where `best/` stood once it was kept (`"best": {"epoch",
  "step"}`). Valid JSON: an undefined metric is `null`.

Every file of a checkpoint is safetensors or JSON: nothing is unpickled, so a checkpoint folder from elsewhere
cannot run code.
"""

import argparse
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging

from ..errors import CheckpointError, TrainingDivergedError
from ..inference.fast_dropout import use_fast_dropout
from ..outputs.safe_outputs import atomic_folder, ensure_folder, json_safe, write_json_atomic
from ..outputs.launched_processes import work_of_this_process
from ..sources.checkpoints import (CHECKPOINT_PATTERN, BaseModel, is_checkpoint, load_trained_weights,
                                   non_finite_parameters, read_checkpoint_record, trainable_parameters,
                                   write_trained_weights)
from ..sources.convert import save_model_folder
from .selection import Selection
from .state import (TRAINING_STATE, TrainingProgress, join_optimizer_state, random_state, read_accumulated_gradients,
                    read_training_state, set_random_state, write_accumulated_gradients, write_training_state)
from .streaming import StreamingLoader


logger = logging.get_logger(__name__)


class TrainingRun:
    """One training job: the optimizer and schedule, the loop with its guards, checkpoints, the choice of `best/`, the
    history and the final model. The script supplies the loss of a batch and, optionally, the evaluation of a point
    (an epoch's end, or the step where `--max_train_steps` stopped the run).

    Args:
        accelerator: The run's `Accelerator` (see `build_accelerator`).
        args: The parsed options (see `add_training_options`).
        model: The model, not yet prepared, with `requires_grad` on exactly what trains.
        processor: Its processor, saved with the final model.
        train_loader: The training `DataLoader`, not yet prepared (see `data_loader`), or a `StreamingLoader` (which
            Accelerate leaves as it is: each process already reads its own part of the stream).
        base: The frozen base the trained weights apply to (`BaseModel.of(model, args.model)`).
        selection: The record entry that picks the best point.
        signature: What else must not change for a checkpoint to continue this run (e.g. the data's hash); the batch
            size, schedule, seed and number of processes are always part of it.
        resume_checkpoint: The checkpoint to continue from (see `prepare_output_dir`), or None.
    """

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, model, processor,
                 train_loader: DataLoader | StreamingLoader, base: BaseModel, selection: Selection,
                 signature: dict | None = None, resume_checkpoint: Path | None = None, project_name: str = "ace_lora"):
        self.accelerator, self.args, self.processor = accelerator, args, processor
        self.base, self.selection = base, selection
        self.output_dir: Path = args.output_dir
        self.signature = json_safe({
            "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": accelerator.num_processes, "num_epochs": args.num_epochs,
            "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs, "seed": args.seed, **(signature or {}),
            # a stream's epoch length comes from --max_train_steps; the position in the stream counts in it
            **({"steps_per_epoch": len(train_loader)} if isinstance(train_loader, StreamingLoader) else {}),
        })
        optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=args.learning_rate,
                                      weight_decay=args.weight_decay, betas=(0.9, 0.999))
        updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_epochs * updates_per_epoch),
                                                    updates_per_epoch * args.num_epochs)
        self.model, self.optimizer, self.train_loader, self.scheduler = accelerator.prepare(
            use_fast_dropout(model), optimizer, train_loader, scheduler)
        self.progress = TrainingProgress()
        if resume_checkpoint is not None:
            self._resume(resume_checkpoint)
        if args.report_to != "none":
            accelerator.init_trackers(project_name, config={key: str(value) for key, value in vars(args).items()})

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------ loop

    # Each process works on its own shard of the training and the validation set, so it may meet an error the others
    # do not (an unreadable image): each prints its own.
    @work_of_this_process()
    def train(self, compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor],
              evaluate: Callable[[int], dict] | None = None, log_values: Callable[[], dict] | None = None) -> None:
        """Train to the end (or `--max_train_steps`), then write `final/` and say which point `best/` holds.

        `compute_loss(model, batch)` is the loss of a batch; `evaluate(epoch)`, if given, returns the metrics of a
        record (prefixed, e.g. `valid_map`): at an epoch's end, and where `--max_train_steps` stops the run inside an
        epoch (`stopped` is then True); `log_values()` adds to what is logged every `--log_every_steps`.
        """
        args, progress = self.args, self.progress
        bar = tqdm(total=args.max_train_steps or len(self.train_loader) * args.num_epochs,
                   initial=progress.completed_steps, desc="training", unit="step",
                   disable=not self.accelerator.is_local_main_process)
        while progress.epoch < args.num_epochs and not self.stopped:
            if self._run_epoch(compute_loss, log_values, bar):
                self._end_epoch(evaluate)
            else:
                self._end_at_stop(evaluate)
        bar.close()
        self._save_final()
        self._say_best()

    def _run_epoch(self, compute_loss, log_values, bar: tqdm) -> bool:
        """Train on what is left of the current epoch; False if `--max_train_steps` ended it early."""
        self.model.train()
        for batch in self._epoch_batches():
            loss = self._train_step(batch, compute_loss)
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", epoch=self.progress.epoch)
            self._after_step(loss, log_values)
            if self.stopped and self.progress.step_in_epoch < len(self.train_loader):
                return False
        return True

    @property
    def stopped(self) -> bool:
        """Whether `--max_train_steps` steps are done."""
        return bool(self.args.max_train_steps) and self.progress.completed_steps >= self.args.max_train_steps

    def _epoch_batches(self):
        """The loader for the current epoch, past the batches a resumed run already trained on."""
        if isinstance(self.train_loader, StreamingLoader):
            return self.train_loader.epoch_batches(self.progress.epoch, self.progress.step_in_epoch)
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
        ends = progress.step_in_epoch == len(self.train_loader) or self.stopped  # their own checkpoint follows
        if args.checkpointing_steps and progress.completed_steps % args.checkpointing_steps == 0 and not ends:
            self.save_checkpoint()

    def _end_epoch(self, evaluate) -> None:
        """The epoch's record (and `best/` if it is the best point), then a checkpoint of the next epoch's start."""
        progress = self.progress
        record = self._record(evaluate)
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        progress.epoch_loss_sum, progress.epoch_loss_steps = 0.0, 0
        self._keep(record)
        self.save_checkpoint()

    def _end_at_stop(self, evaluate) -> None:
        """Where `--max_train_steps` stopped the run inside an epoch: a checkpoint, then a record of the stop (and
        `best/` if it is the best point). The checkpoint comes first and so leaves the stop's record out: a resumed
        run continues the epoch as if the run had never stopped."""
        self.save_checkpoint()
        self._keep(self._record(evaluate, stopped_by="max_train_steps"))

    def _record(self, evaluate, **details) -> dict:
        """The record of the current point: its epoch, step, mean loss since the epoch began, and metrics."""
        progress = self.progress
        loss = progress.epoch_loss_sum / progress.epoch_loss_steps if progress.epoch_loss_steps else None
        record = {"epoch": progress.epoch, "step": progress.completed_steps, "loss": loss, **details}
        if evaluate is not None:
            record.update(evaluate(progress.epoch))
        return json_safe(record)

    def _keep(self, record: dict) -> None:
        """Print, log and add `record` to the history, and make its point `best/` if it is the best so far."""
        is_best = self.selection.keep_if_best(record, self.progress)
        self.accelerator.print(json.dumps(record))
        self.accelerator.log({f"epoch/{key}": value for key, value in record.items()
                              if key not in ("epoch", "step") and isinstance(value, (int, float))},
                             step=record["step"])
        self.progress.history.append(record)
        if is_best:
            self._save_trained(self.output_dir / "best", **{key: record.get(key) for key in (
                "epoch", "step", self.selection.metric, *(("stopped_by",) if "stopped_by" in record else ()))})
        if self.accelerator.is_main_process:
            write_json_atomic(self.output_dir / "training_history.json", self.progress.history)

    def _say_best(self) -> None:
        best = self.output_dir / "best"
        if self.accelerator.is_main_process and is_checkpoint(best):
            print(self.selection.describe(read_checkpoint_record(best)))

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
        random_states = gather_object([random_state()])
        gradients = gather_object([self._accumulated_gradients()])
        step = self.progress.completed_steps
        folder = self.output_dir / "checkpoints" / f"step_{step}"
        if self.accelerator.is_main_process:
            ensure_folder(folder.parent)
            with atomic_folder(folder) as staging:
                write_trained_weights(self.unwrapped_model, staging, self.base, epoch=self.progress.epoch, step=step)
                write_training_state(staging, self._training_state(), self.optimizer.state_dict(), random_states)
                write_accumulated_gradients(staging, gradients)
            self._remove_old_checkpoints()
        self.accelerator.wait_for_everyone()
        self.accelerator.print(f"saved checkpoint step_{step}")

    def _accumulated_gradients(self) -> dict[str, torch.Tensor]:
        """This process's gradients summed so far in an unfinished accumulation window: without them a run resumed
        from a checkpoint inside a window would step on part of the window's batches."""
        return {name: parameter.grad.detach().cpu() for name, parameter in self.unwrapped_model.named_parameters()
                if parameter.requires_grad and parameter.grad is not None}

    def _training_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"progress": asdict(self.progress), "signature": self.signature,
                "scheduler": self.scheduler.state_dict(), "scaler": None if scaler is None else scaler.state_dict(),
                "accelerator_step": self.accelerator.step}

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
        """Put the weights of the best point (`best/`) back into the model; without one (the run ended before any
        record), the model keeps the last step's."""
        if not is_checkpoint(self.output_dir / "best"):
            logger.warning("The run wrote no best/ (it ended before any record): the model keeps the last step's "
                           "weights.")
            return
        load_trained_weights(self.unwrapped_model, self.output_dir / "best")

    def finish(self) -> None:
        """End the run: `best/` made a complete model folder with `--save_full_best` (the model then holds the best
        point's weights), the trackers closed, and what was skipped said."""
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
        values, optimizer_tensors, random_tensors = read_training_state(folder)
        gradients = read_accumulated_gradients(folder, self.accelerator.process_index)
        self._check_signature(folder, values.get("signature", {}))
        load_trained_weights(self.unwrapped_model, folder)
        try:
            self.optimizer.load_state_dict(join_optimizer_state(optimizer_tensors, values["optimizer"]))
            self.scheduler.load_state_dict(values["scheduler"])
            if self.accelerator.scaler is not None and values["scaler"] is not None:
                self.accelerator.scaler.load_state_dict(values["scaler"])
            self.accelerator.step = values["accelerator_step"]
            self.progress = TrainingProgress(**values["progress"])
            self._restore_gradients(gradients)
            own_state = set_random_state(random_tensors, values["random_states"], self.accelerator.process_index)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{folder / TRAINING_STATE}: does not fit this run ({type(error).__name__}: "
                                  f"{error}); resume another checkpoint or start again.") from None
        if not own_state:  # only with --force_resume on more processes than before
            logger.warning("%s holds no random state for process %d; it keeps its own.", folder,
                           self.accelerator.process_index)
        logger.info("Resumed from %s (step %d, epoch %d)", folder, self.progress.completed_steps, self.progress.epoch)

    def _restore_gradients(self, gradients: dict[str, torch.Tensor]) -> None:
        parameters = dict(self.unwrapped_model.named_parameters())
        for name, gradient in gradients.items():
            parameter = parameters[name]
            parameter.grad = gradient.to(device=parameter.device, dtype=parameter.dtype).view_as(parameter)

    def _check_signature(self, folder: Path, saved: dict) -> None:
        changed = [f"{key}: {saved.get(key)!r} then, {value!r} now" for key, value in self.signature.items()
                   if saved.get(key) != value]
        if changed and not self.args.force_resume:
            raise CheckpointError(f"--resume_from_checkpoint {folder}: this run differs from the one that wrote it "
                                  f"({'; '.join(changed)}), so resuming would not continue that run; pass "
                                  "--force_resume to resume anyway, or start a new --output_dir.")
        if changed:
            logger.warning("Resuming %s although the run differs (%s).", folder, "; ".join(changed))


__all__ = ["TrainingRun"]
