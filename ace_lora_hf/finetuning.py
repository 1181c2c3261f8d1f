"""Fine-tuning of the downstream heads on the frozen ACE-LoRA encoder (SIIM segmentation, RSNA detection).

The protocol of medical vision-language pre-training papers (GLoRIA, MGCA): the image encoder is frozen and only
the task head trains, on 1%, 10% or 100% of the training split (`--fraction`, seeded); the model of the best
validation epoch is kept and reported on the test split. Images and masks are resized to the encoder's 224 px
(masks with nearest neighbours) and evaluated there; boxes are mapped into the 224 px frame and back with the same
resize and crop, which leaves IoU, and so mAP, unchanged for the square RSNA images.
"""

import argparse
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import AutoProcessor, get_cosine_schedule_with_warmup
from transformers.image_utils import PILImageResampling

from .image_loading import load_image
from .metrics import detection_map, dice_metrics
from .modeling_ace_lora_heads import AceLoraForObjectDetection, AceLoraForSegmentation
from .training_utils import TrainingProgress, check_output_dir, resume, save_checkpoint, save_model


logger = get_logger(__name__)


def read_split(table: Path, split: str, columns: list[str], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Rows of `split` in a dataset_prep table, subsampled to `fraction` (seeded) for training."""
    if not table.is_file():
        raise SystemExit(f"{table} not found: run the dataset's dataset_prep script first.")
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    missing = [c for c in ["split", *columns] if c not in frame.columns]
    if missing:
        raise SystemExit(f"{table}: missing column(s) {missing}; found {list(frame.columns)}.")
    rows = frame[frame["split"] == split].to_dict("records")
    if not rows:
        raise SystemExit(f"{table}: no rows in split {split!r}.")
    if fraction < 1.0:
        rows = random.Random(seed).sample(rows, max(1, round(fraction * len(rows))))
    return rows


def _crop_geometry(height: int, width: int, size: int) -> tuple[float, int, int]:
    """Scale and (top, left) offset of the processor's shorter-side resize and center crop (torchvision's)."""
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    return size / min(height, width), int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))


class SegmentationSet(Dataset):
    """SIIM rows (`Path`, `Mask`) as normalised pixels and 0/1 masks at the processor's crop size."""

    def __init__(self, rows: list[dict], image_root: Path, mask_root: Path, image_processor):
        self.rows, self.image_root, self.mask_root, self.image_processor = rows, image_root, mask_root, image_processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        pixels = self.image_processor(load_image(self.image_root / row["Path"]), return_tensors="pt")["pixel_values"]
        mask = load_image(self.mask_root / row["Mask"])
        mask = self.image_processor(mask, do_rescale=False, do_normalize=False, resample=PILImageResampling.NEAREST,
                                    return_tensors="np")["pixel_values"][0, 0]
        return pixels[0], torch.from_numpy(mask > 127).long()


class DetectionSet(Dataset):
    """RSNA rows (`Path`, `boxes` JSON in pixels) as pixels and DETR-style targets in the crop's frame."""

    def __init__(self, rows: list[dict], image_root: Path, image_processor):
        self.rows, self.image_root, self.image_processor = rows, image_root, image_processor
        self.size = image_processor.crop_size["height"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        image = load_image(self.image_root / row["Path"])
        pixels = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        scale, top, left = _crop_geometry(image.height, image.width, self.size)
        boxes = torch.tensor(json.loads(row["boxes"]), dtype=torch.float32).reshape(-1, 4) * scale
        boxes = (boxes - torch.tensor([left, top, left, top])).clamp(0, self.size)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        centre_size = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], -1) / self.size
        return pixels, {"class_labels": torch.zeros(len(boxes), dtype=torch.long), "boxes": centre_size,
                        "boxes_xyxy": boxes}


def collate_detection(items):
    return torch.stack([pixels for pixels, _ in items]), [target for _, target in items]


@dataclass(frozen=True)
class Task:
    name: str
    model_class: type
    table: str
    columns: tuple[str, ...]
    metric: str  # the validation metric that selects the best epoch (higher is better)
    config_overrides: dict = field(default_factory=dict)


TASKS = {
    "segmentation": Task("segmentation", AceLoraForSegmentation, "siim_segmentation.csv", ("Path", "Mask"),
                         "dice_per_image"),
    "detection": Task("detection", AceLoraForObjectDetection, "rsna_detection.csv", ("Path", "boxes"), "map",
                      {"num_labels": 1}),
}


def build_dataset(task: Task, args, split: str, image_processor, fraction: float = 1.0) -> Dataset:
    table = args.table or args.data_root / task.table
    rows = read_split(table, split, list(task.columns), fraction, args.seed)
    if task.name == "segmentation":
        return SegmentationSet(rows, args.data_root, args.mask_root or table.parent, image_processor)
    return DetectionSet(rows, args.data_root, image_processor)


def _loader(task: Task, dataset: Dataset, args, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.num_workers,
                      collate_fn=collate_detection if task.name == "detection" else None,
                      generator=torch.Generator().manual_seed(args.seed))


@torch.no_grad()
def evaluate(task: Task, accelerator: Accelerator, model, loader) -> dict[str, float]:
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    predictions, truths = [], []
    for pixels, targets in loader:
        outputs = model(pixel_values=pixels)
        if task.name == "segmentation":
            masks, targets = accelerator.gather_for_metrics(((outputs.logits[:, 0] > 0), targets))
            predictions.append(masks.cpu().numpy())
            truths.append(targets.cpu().numpy())
        else:
            size = pixels.shape[-1]
            detections = unwrapped.post_process_object_detection(outputs, target_sizes=[(size, size)] * len(pixels))
            batch = [({"boxes": d["boxes"].cpu().tolist(), "scores": d["scores"].cpu().tolist()},
                      t["boxes_xyxy"].tolist()) for d, t in zip(detections, targets)]
            predictions_and_truths = accelerator.gather_for_metrics(batch, use_gather_object=True)
            predictions += [p for p, _ in predictions_and_truths]
            truths += [t for _, t in predictions_and_truths]
    model.train()
    if task.name == "segmentation":
        return dice_metrics(np.concatenate(predictions), np.concatenate(truths))
    return detection_map(predictions, truths)


def parse_args(task: Task, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"Fine-tune the ACE-LoRA {task.name} head (frozen encoder).")

    def add(name: str, **kwargs):
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **kwargs)

    add("model", required=True, help="ACE-LoRA folder or Hub id (the encoder), or a saved head to continue.")
    add("data_root", type=Path, required=True, help="The dataset's image root (dataset_prep's --input).")
    add("table", type=Path, help=f"The prepared table (default: DATA_ROOT/{task.table}).")
    if task.name == "segmentation":
        add("mask_root", type=Path, help="Folder the Mask paths are relative to (default: the table's folder).")
    add("output_dir", type=Path, required=True)
    add("fraction", type=float, default=1.0, help="Share of the training split: 0.01, 0.1 or 1.0.")
    add("num_epochs", type=int, default=50)
    add("batch_size", type=int, default=16)
    add("learning_rate", type=float, default=5e-4)
    add("weight_decay", type=float, default=1e-6)
    add("seed", type=int, default=42)
    add("mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    add("num_workers", type=int, default=4)
    add("cpu", action="store_true", help="Train on the CPU (several processes with --multi_gpu launches).")
    add("checkpointing_steps", type=int, default=0, help="Also save the training state every N steps.")
    add("keep_checkpoints", type=int, default=3)
    add("resume_from_checkpoint", help="A checkpoint folder, or 'latest'.")
    add("overwrite_output_dir", action="store_true")
    add("report_to", choices=["none", "tensorboard", "wandb"], default="none")
    add("evaluate_only", action="store_true", help="Only report the test metrics of --model.")
    return parser.parse_args(argv)


def run(task_name: str, argv=None) -> dict:
    """The whole fine-tuning: train with model selection on validation, then report on test."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    task = TASKS[task_name]
    args = parse_args(task, argv)
    if not 0 < args.fraction <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}.")
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    check_output_dir(args.output_dir, bool(args.resume_from_checkpoint) or args.evaluate_only,
                     args.overwrite_output_dir)
    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    model = task.model_class.from_pretrained(args.model, **task.config_overrides)
    processor = AutoProcessor.from_pretrained(args.model)
    image_processor = processor.image_processor
    test_loader = _loader(task, build_dataset(task, args, "test", image_processor), args, shuffle=False)
    if not args.evaluate_only:
        train(task, args, accelerator, model, processor, image_processor)
        model = task.model_class.from_pretrained(args.output_dir / "best")
    model, test_loader = accelerator.prepare(model, test_loader)
    metrics = evaluate(task, accelerator, model, test_loader)
    results = {"task": task.name, "fraction": args.fraction, "test": metrics}
    accelerator.print(json.dumps(results, indent=2))
    if accelerator.is_main_process:
        (args.output_dir / "test_results.json").write_text(json.dumps(results, indent=2))
    accelerator.end_training()
    return results


def train(task: Task, args, accelerator: Accelerator, model, processor, image_processor) -> None:
    train_loader = _loader(task, build_dataset(task, args, "train", image_processor, args.fraction), args, True)
    valid_loader = _loader(task, build_dataset(task, args, "valid", image_processor), args, shuffle=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, len(train_loader) * args.num_epochs)
    model, optimizer, train_loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, scheduler)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    resume(accelerator, args.output_dir, args.resume_from_checkpoint, logger)
    if args.report_to != "none":
        accelerator.init_trackers(f"ace_lora_{task.name}", config={k: str(v) for k, v in vars(args).items()})
    bar = tqdm(total=len(train_loader) * args.num_epochs, initial=progress.completed_steps, unit="step",
               disable=not accelerator.is_local_main_process, desc=task.name)
    for epoch in range(progress.epoch, args.num_epochs):
        model.train()
        for pixels, targets in progress.epoch_batches(accelerator, train_loader):
            loss = model(pixel_values=pixels, labels=targets).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.record_step(accelerator, loss, bar)
            if args.checkpointing_steps and progress.completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, progress.completed_steps, args.keep_checkpoints)
        validation = evaluate(task, accelerator, model, valid_loader)
        record = {"epoch": epoch, "loss": progress.epoch_loss_sum / progress.step_in_epoch,
                  **{f"valid_{k}": v for k, v in validation.items()}}
        accelerator.print(json.dumps(record))
        accelerator.log(record, step=progress.completed_steps)
        progress.history.append(record)
        score = -validation[task.metric] if not math.isnan(validation[task.metric]) else math.inf
        is_best = score < progress.best_score or not (args.output_dir / "best").exists()
        progress.best_score = min(progress.best_score, score)
        progress.epoch, progress.step_in_epoch, progress.epoch_loss_sum = epoch + 1, 0, 0.0
        if is_best:
            save_model(accelerator, model, processor, args.output_dir / "best")
        save_checkpoint(accelerator, args.output_dir, progress.completed_steps, args.keep_checkpoints)
        if accelerator.is_main_process:
            (args.output_dir / "training_history.json").write_text(json.dumps(progress.history, indent=2))
    bar.close()


__all__ = ["TASKS", "DetectionSet", "SegmentationSet", "run"]
