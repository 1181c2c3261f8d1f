"""Training: options, the checkpoint format, the run loop and the fine-tuning of downstream heads."""

from ..sources.checkpoints import load_trained_model, materialize_checkpoint

__all__ = ["load_trained_model", "materialize_checkpoint"]
