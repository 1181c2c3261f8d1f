"""Training, in modules of one job each: `options` (the scripts' options and `--config`), `accelerator` (the
Accelerator and data loaders), `run_folder` (the `--output_dir` held for a run), `state` (progress, optimizer and
random state of a checkpoint), `selection` (which point becomes `best/`), `loop` (`TrainingRun`) and `finetuning`
(the downstream heads). The checkpoint format itself is `ace_lora_hf.sources.checkpoints`."""

from ..sources.checkpoints import load_trained_model, materialize_checkpoint

__all__ = ["load_trained_model", "materialize_checkpoint"]
