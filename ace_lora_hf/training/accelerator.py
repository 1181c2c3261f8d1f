"""The Accelerator of a training run and its data loaders."""

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset

from ..errors import InvalidArgumentError
from ..models.ace_lora.batch_inference import default_num_workers
from .options import require_tracker


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator of a run (precision, accumulation, tracker, the seed set); `--num_workers`, when not given,
    becomes the default for the run's device."""
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
    if args.num_workers is None:
        args.num_workers = default_num_workers(accelerator.device)
    set_seed(args.seed)
    return accelerator


def data_loader(dataset: Dataset, args: argparse.Namespace, shuffle: bool, collate_fn=None) -> DataLoader:
    """A loader of `dataset` with the run's batch size and workers (`build_accelerator` has set `args.num_workers`)."""
    # A generator of its own keeps the loader from drawing on the global RNG (dropout) when an epoch starts, so a
    # resumed run, whose global RNG state comes from the checkpoint, draws exactly what the uninterrupted run drew.
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available() and not args.cpu,
                      generator=torch.Generator().manual_seed(args.seed))


__all__ = ["build_accelerator", "data_loader"]
