"""Fine-tuning of the downstream heads on the frozen ACE-LoRA encoder (SIIM segmentation, RSNA detection): the tasks,
their data, their evaluation and the run (`examples/finetune_*.py` parse the options and call `run_finetuning`).

The protocol of medical vision-language pre-training papers (GLoRIA, MGCA): the image encoder is frozen and only the
task head trains, on 1%, 10% or 100% of the training split (`--fraction`, seeded); the epoch with the best validation
metric is kept (segmentation: Dice over the pneumothorax-positive images; detection: the RSNA mAP) and reported on the
test split. Images and masks are resized and cropped as the image processor does (masks with nearest neighbours) and
evaluated in that frame; boxes are mapped into it with the processor's own resize and crop.
"""

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import Dataset
from transformers.image_transforms import center_to_corners_format, corners_to_center_format
from transformers.image_utils import PILImageResampling
from transformers.utils import logging

from ..data.image_tables import missing_file, numbered_rows, read_table
from ..data.tables import file_sha256
from ..errors import DataFormatError, ImageLoadError, InvalidArgumentError
from ..evaluation.metrics import detection_map, dice_metrics
from ..models.ace_lora.image_loading import load_image
from ..models.ace_lora.modeling_ace_lora_heads import AceLoraForObjectDetection, AceLoraForSegmentation, box_area
from ..outputs.safe_outputs import json_safe, write_json_atomic
from ..outputs.launched_processes import checks_alike_in_every_process, work_of_this_process
from ..sources.checkpoints import BaseModel, load_trained_model
from .accelerator import build_accelerator, data_loader
from .loop import TrainingRun
from .options import TrainingArgumentParser, add_training_options
from .run_folder import prepare_output_dir
from .selection import Selection


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Task:
    """A downstream task: its head, its prepared table and how its best epoch is chosen."""

    name: str
    model_class: type
    table: str  # the file name dataset_prep gives the table
    columns: tuple[str, ...]
    selection: Selection
    dataset: str  # the benchmark's name, as results and model cards report it
    config_overrides: dict = field(default_factory=dict)


SEGMENTATION = Task("segmentation", AceLoraForSegmentation, "siim_segmentation.csv", ("Path", "Mask"),
                    Selection("valid_dice_positive", higher_is_better=True), "SIIM-ACR Pneumothorax")
DETECTION = Task("detection", AceLoraForObjectDetection, "rsna_detection.csv", ("Path", "boxes"),
                 Selection("valid_map", higher_is_better=True), "RSNA Pneumonia", {"num_labels": 1})


def finetuning_parser(task: Task, description: str | None) -> TrainingArgumentParser:
    """The options of a fine-tuning script: model and data, then those of every training script."""
    parser = TrainingArgumentParser(description)
    data = parser.add_argument_group("model and data")
    add = parser.add_option
    add("model", data, required=True,
        help="ACE-LoRA folder or Hub id (the encoder), or a head saved by an earlier run (final/, best/).")
    add("data_root", data, type=Path, required=True, help="The dataset's image root (dataset_prep's --input).")
    add("table", data, type=Path, help=f"The prepared table (default: DATA_ROOT/{task.table}).")
    if task is SEGMENTATION:
        add("mask_root", data, type=Path, help="Folder the Mask paths are relative to (default: the table's folder).")
    add("fraction", data, type=float, default=1.0, help="Share of the training split: 0.01, 0.1 or 1.0.")
    add("evaluate_only", data, action="store_true", help="Only report the test metrics of --model.")
    add_training_options(parser, num_epochs=50, batch_size=16, learning_rate=5e-4, weight_decay=1e-6,
                         warmup_epochs=0.0, seed=42)
    return parser


# ------------------------------------------------------------------------------------------------------- data


def read_split(task: Task, args: argparse.Namespace, split: str, fraction: float = 1.0) -> list[dict]:
    """Rows of `split` in the task's prepared table, every file and value checked, subsampled to `fraction`
    (seeded) for training."""
    table = args.table or args.data_root / task.table
    frame = read_table(table, task.columns, "--table", split=split)
    rows = []
    for line, record in numbered_rows(frame):
        problem = missing_file(args.data_root, record["Path"], "Path")
        if problem is None and task is SEGMENTATION:
            problem = missing_file(args.mask_root or table.parent, record["Mask"], "Mask")
        if problem:
            raise DataFormatError(f"{table}, line {line}: {problem}.")
        if task is DETECTION:
            record["boxes"] = _parse_boxes(record["boxes"], table, line)
        rows.append(record)
    if fraction < 1.0:
        rows = random.Random(args.seed).sample(rows, max(1, round(fraction * len(rows))))
    return rows


def _parse_boxes(text: str, table: Path, line: int) -> list[list[float]]:
    try:
        boxes = json.loads(text or "[]")
        valid = isinstance(boxes, list) and all(
            isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            and box[2] > box[0] and box[3] > box[1] for box in boxes)
    except json.JSONDecodeError:
        valid = False
    if not valid:
        raise DataFormatError(f"{table}, line {line}: column 'boxes' is {text[:60]!r}; expected a JSON list of "
                              "[x1, y1, x2, y2] pixel boxes with x2 > x1 and y2 > y1 (e.g. [] or [[10, 20, 110, 90]]).")
    return boxes


def boxes_in_crop(boxes: list[list[float]], image_processor, height: int, width: int) -> torch.Tensor:
    """Pixel boxes (x1, y1, x2, y2) of an image of `height` x `width` as normalised (cx, cy, w, h) boxes of the
    processor's crop; parts outside the crop are cut off and boxes left empty are dropped."""
    window = image_processor.crop_window(height, width)
    scale = torch.tensor([window.resized_width / width, window.resized_height / height] * 2)
    crop = torch.tensor([window.right - window.left, window.bottom - window.top] * 2, dtype=torch.float32)
    corners = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    corners = torch.minimum((corners - torch.tensor([window.left, window.top] * 2)).clamp(min=0), crop)
    return corners_to_center_format(corners[box_area(corners) > 0] / crop)


class SegmentationSet(Dataset):
    """SIIM rows (`Path`, `Mask`) as `{"pixel_values", "labels"}` with 0/1 masks in the processor's crop."""

    def __init__(self, rows: list[dict], image_root: Path, mask_root: Path, image_processor):
        self.rows, self.image_root, self.mask_root, self.image_processor = rows, image_root, mask_root, image_processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = load_image(self.image_root / row["Path"])
        pixels = self.image_processor(image, return_tensors="pt")["pixel_values"]
        mask = load_image(self.mask_root / row["Mask"])
        if mask.size != image.size:  # resized and cropped alike, they would be scored against the wrong pixels
            raise ImageLoadError(str(self.mask_root / row["Mask"]),
                                 f"the mask is {mask.size[0]}x{mask.size[1]} pixels but its image {row['Path']} is "
                                 f"{image.size[0]}x{image.size[1]}: write the mask at the image's size")
        mask = self.image_processor(mask, do_rescale=False, do_normalize=False, resample=PILImageResampling.NEAREST,
                                    return_tensors="np")["pixel_values"][0, 0]
        return {"pixel_values": pixels[0], "labels": torch.from_numpy(mask > 127).long()}


class DetectionSet(Dataset):
    """RSNA rows (`Path`, `boxes` in pixels) as `{"pixel_values", "labels"}`, the labels DETR-style targets of the
    processor's crop."""

    def __init__(self, rows: list[dict], image_root: Path, image_processor):
        self.rows, self.image_root, self.image_processor = rows, image_root, image_processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = load_image(self.image_root / row["Path"])
        pixels = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        boxes = boxes_in_crop(row["boxes"], self.image_processor, image.height, image.width)
        return {"pixel_values": pixels,
                "labels": {"class_labels": torch.zeros(len(boxes), dtype=torch.long), "boxes": boxes}}


def collate_detection(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "labels": [item["labels"] for item in items]}


def build_dataset(task: Task, args: argparse.Namespace, rows: list[dict], image_processor) -> Dataset:
    if task is SEGMENTATION:
        table = args.table or args.data_root / task.table
        return SegmentationSet(rows, args.data_root, args.mask_root or table.parent, image_processor)
    return DetectionSet(rows, args.data_root, image_processor)


# ------------------------------------------------------------------------------------------------------ steps


def head_loss(model, batch: dict) -> torch.Tensor:
    """The loss of a batch: the head's own (Dice + BCE for segmentation, focal + GIoU + centerness for detection)."""
    return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss


@torch.no_grad()
@work_of_this_process()  # each process evaluates its shard: an unreadable image there is its own error
def evaluate_head(task: Task, accelerator: Accelerator, model, loader) -> dict:
    """The task's metrics over `loader` (every process's share gathered)."""
    model.eval()
    if task is SEGMENTATION:
        predicted, true = [], []
        for batch in loader:
            masks = model(pixel_values=batch["pixel_values"]).logits[:, 0] > 0
            masks, labels = accelerator.gather_for_metrics((masks, batch["labels"]))
            predicted.append(masks.cpu().numpy())
            true.append(labels.cpu().numpy())
        return dice_metrics(np.concatenate(predicted), np.concatenate(true))
    predictions, truths = [], []
    for batch in loader:
        height, width = batch["pixel_values"].shape[-2:]
        outputs = model(pixel_values=batch["pixel_values"])
        detections = accelerator.unwrap_model(model).post_process_object_detection(
            outputs, target_sizes=[(height, width)] * len(outputs.logits))
        frame = torch.tensor([width, height, width, height])
        pairs = [({"boxes": d["boxes"].cpu().tolist(), "scores": d["scores"].cpu().tolist()},
                  (center_to_corners_format(t["boxes"].cpu()) * frame).tolist())
                 for d, t in zip(detections, batch["labels"])]
        for prediction, truth in accelerator.gather_for_metrics(pairs, use_gather_object=True):
            predictions.append(prediction)
            truths.append(truth)
    return detection_map(predictions, truths)


# -------------------------------------------------------------------------------------------------------- run


@checks_alike_in_every_process()  # the training loop and the test evaluation mark their errors as their own
def run_finetuning(task: Task, args: argparse.Namespace) -> dict:
    """Train the head with model selection on the validation split, then report the best epoch on the test split
    (`test_results.json`); with `--evaluate_only`, only report `--model` on the test split."""
    if not 0 < args.fraction <= 1:
        raise InvalidArgumentError(f"--fraction must be in (0, 1], got {args.fraction}.")
    accelerator = build_accelerator(args)
    splits = ("test",) if args.evaluate_only else ("train", "valid", "test")
    rows = {split: read_split(task, args, split, args.fraction if split == "train" else 1.0) for split in splits}
    with prepare_output_dir(accelerator, args, reuse=args.evaluate_only) as resume_checkpoint:
        model, processor = load_trained_model(args.model, task.model_class, **task.config_overrides)
        loaders = {split: data_loader(build_dataset(task, args, split_rows, processor.image_processor), args,
                                      shuffle=split == "train",
                                      collate_fn=collate_detection if task is DETECTION else None)
                   for split, split_rows in rows.items()}
        if args.evaluate_only:
            model, test_loader = accelerator.prepare(model, loaders["test"])
            metrics = evaluate_head(task, accelerator, model, test_loader)
        else:
            metrics = _train_and_test(task, args, accelerator, model, processor, loaders, resume_checkpoint)
        results = {"task": task.name, "dataset": task.dataset, "split": "test", "fraction": args.fraction,
                   "model": str(args.model), "metrics": metrics}
        accelerator.print(json.dumps(json_safe(results), indent=2))
        if accelerator.is_main_process:
            write_json_atomic(args.output_dir / "test_results.json", results)
    return results


def _train_and_test(task: Task, args: argparse.Namespace, accelerator: Accelerator, model, processor,
                    loaders: dict, resume_checkpoint: Path | None) -> dict:
    """Train (selecting the best epoch on the validation split) and return the best epoch's test metrics."""
    valid_loader, test_loader = accelerator.prepare(loaders["valid"], loaders["test"])
    signature = {"table_sha256": file_sha256(args.table or args.data_root / task.table), "fraction": args.fraction,
                 "train_rows": len(loaders["train"].dataset)}
    run = TrainingRun(accelerator, args, model, processor, loaders["train"], base=BaseModel.of(model, args.model),
                      selection=task.selection, signature=signature, resume_checkpoint=resume_checkpoint,
                      project_name=f"ace_lora_{task.name}")

    def validate(epoch: int) -> dict:
        metrics = evaluate_head(task, accelerator, run.model, valid_loader)
        return {f"valid_{name}": value for name, value in metrics.items()}

    run.train(head_loss, validate)
    run.restore_best()
    metrics = evaluate_head(task, accelerator, run.model, test_loader)
    run.finish()
    return metrics


__all__ = ["DETECTION", "SEGMENTATION", "DetectionSet", "SegmentationSet", "Task", "boxes_in_crop", "evaluate_head",
           "finetuning_parser", "head_loss", "read_split", "run_finetuning"]
