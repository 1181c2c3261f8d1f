#!/usr/bin/env python
"""Fine-tune ACE-LoRA on image-report pairs with Accelerate: one GPU, many GPUs, or the CPU.

    accelerate launch examples/pretrain.py --model ace-lora/ --train_file mimic_cxr_train.csv --output_dir runs/ace

The defaults are the released recipe (SPEC §7): AdamW lr 1e-3, weight decay 1e-2, cosine schedule with one
epoch of linear warm-up, 40 epochs, batch 64 per device, seed 1, label-guided InfoNCE on the 14 CheXpert labels,
each device using its own batch as negatives (`--global_negatives` gathers every device's batch instead).

Outputs in --output_dir: `checkpoints/step_N/` (full training state, written atomically; resume with
`--resume_from_checkpoint latest`), `best/` (lowest epoch loss), `final/` (model + processor, safetensors) and
`adapters/` (LoRA + hypergraph + logit scale only). Every option can also come from `--config FILE.yaml`.
"""

import argparse
import csv
import json
import logging
import math
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor, get_cosine_schedule_with_warmup

import ace_lora_hf  # noqa: F401  (registers the Auto classes)
from ace_lora_hf.adapters import save_adapters
from ace_lora_hf.data import CHEXPERT_LABELS, ImageTextCollator, ImageTextColumns, load_image_text_dataset
from ace_lora_hf.image_loading import load_image
from ace_lora_hf.loss_ace_lora import LabelGuidedInfoNCELoss
from ace_lora_hf.metrics import classification_metrics
from ace_lora_hf.training_utils import (TrainingProgress, check_output_dir, resume, save_checkpoint, save_model)
from ace_lora_hf.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier


logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kwargs):  # accept --name_with_underscores and --name-with-dashes
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **kwargs)

    add("config", type=Path, help="YAML file of option values (command-line options override it).")
    add("model", required=True, help="Converted ACE-LoRA folder or Hub id (python -m ace_lora_hf.convert).")
    add("train_file", type=Path, required=True, help="CSV or JSON-lines table of image-report pairs.")
    add("output_dir", type=Path, required=True, help="Where checkpoints and the trained model go.")
    add("image_root", type=Path, help="Folder the image paths are relative to (default: the table's).")
    add("image_column", default="image", help="Column of image paths (default: %(default)s).")
    add("text_column", default="report", help="Column of report texts (default: %(default)s).")
    add("label_columns", nargs="+", default=list(CHEXPERT_LABELS), help="Label columns (default: the 14 CheXpert).")
    add("no_labels", action="store_true", help="Train with plain InfoNCE, without labels.")
    add("split_column", default="split", help="Column naming each row's split (default: %(default)s).")
    add("train_split", help="Use only rows whose split column has this value (e.g. train).")
    add("skip_bad_rows", action="store_true", help="Drop rows with missing/unreadable images and count them.")
    add("num_epochs", type=int, default=40)
    add("batch_size", type=int, default=64, help="Per device (default: %(default)s).")
    add("learning_rate", type=float, default=1e-3)
    add("weight_decay", type=float, default=1e-2)
    add("warmup_epochs", type=float, default=1.0)
    add("seed", type=int, default=1)
    add("gradient_accumulation_steps", type=int, default=1)
    add("mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    add("gradient_checkpointing", action="store_true", help="Recompute tower activations in backward.")
    add("global_negatives", action="store_true", help="Gather every device's batch as negatives.")
    add("cpu", action="store_true",
        help="Train on the CPU, with several processes over gloo when launched with --multi_gpu --num_processes N.")
    add("num_workers", type=int, default=4, help="DataLoader workers decoding images (default: %(default)s).")
    add("checkpointing_steps", type=int, default=0, help="Save the training state every N steps (0: epochs only).")
    add("keep_checkpoints", type=int, default=3, help="How many recent checkpoints to keep (default: %(default)s).")
    add("overwrite_output_dir", action="store_true", help="Train over an earlier run in --output_dir.")
    add("resume_from_checkpoint", help="A checkpoint folder, or 'latest' (in --output_dir/checkpoints).")
    add("max_train_steps", type=int, help="Stop after this many steps (for short runs).")
    add("report_to", choices=["none", "tensorboard", "wandb"], default="none")
    add("validation_file", type=Path, help="RSNA-style CSV (Path, Target) for periodic zero-shot evaluation.")
    add("validation_image_root", type=Path, help="Folder --validation_file paths are relative to.")
    add("validation_labels", nargs=2, default=["No Finding", "pneumonia"], help="Negative and positive class.")
    add("eval_every_epochs", type=int, default=1)
    add("log_every_steps", type=int, default=10)

    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**yaml.safe_load(known.config.read_text()) or {})
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------- evaluate


class ValidationSet(torch.utils.data.Dataset):
    """RSNA-style rows (`Path`, `Target`) as preprocessed pixels and targets."""

    def __init__(self, csv_path: Path, image_root: Path | None, image_processor):
        with csv_path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows or not {"Path", "Target"} <= set(rows[0]):
            raise SystemExit(f"{csv_path}: needs columns Path and Target.")
        root = image_root or csv_path.parent
        self.items = [(root / row["Path"], int(row["Target"])) for row in rows]
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, target = self.items[index]
        pixels = self.image_processor(load_image(path), return_tensors="pt")["pixel_values"][0]
        return pixels, target


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, processor, loader, labels: list[str]) -> dict[str, float]:
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    classes = ZeroShotClassifier(unwrapped, processor, CHEST_XRAY_TEMPLATES).class_embeddings(labels)
    probabilities, targets = [], []
    for pixel_values, target in loader:
        logits = unwrapped.logit_scale * unwrapped.get_image_features(pixel_values).pooler_output @ classes.t()
        probability, target = accelerator.gather_for_metrics((logits.softmax(dim=-1), target))
        probabilities.append(probability.float().cpu())
        targets.append(target.cpu())
    model.train()
    return classification_metrics(torch.cat(probabilities), torch.cat(targets))


# ---------------------------------------------------------------------------------------------------- training


def build_train_loader(args, model, processor) -> DataLoader:
    columns = ImageTextColumns(image=args.image_column, text=args.text_column, split=args.split_column,
                               labels=() if args.no_labels else tuple(args.label_columns))
    dataset = load_image_text_dataset(args.train_file, columns, args.image_root, args.train_split,
                                      args.skip_bad_rows)
    collator = ImageTextCollator(processor, model.config.text_config.context_length, skip_bad_images=args.skip_bad_rows)
    # A generator of its own keeps the loader from drawing on the global RNG (dropout) when an epoch starts, so a
    # resumed run, whose global RNG state comes from the checkpoint, draws exactly what the uninterrupted run drew.
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(args.seed))


def training_function(args: argparse.Namespace) -> TrainingProgress:
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    check_output_dir(args.output_dir, bool(args.resume_from_checkpoint), args.overwrite_output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    with accelerator.main_process_first():
        train_loader = build_train_loader(args, model, processor)

    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_epochs * updates_per_epoch),
                                                updates_per_epoch * args.num_epochs)
    validation_loader = None
    if args.validation_file:
        validation = ValidationSet(args.validation_file, args.validation_image_root, processor.image_processor)
        validation_loader = DataLoader(validation, batch_size=args.batch_size, num_workers=args.num_workers)
    model, optimizer, train_loader, scheduler, validation_loader = accelerator.prepare(
        model, optimizer, train_loader, scheduler, validation_loader
    )
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    loss_function = LabelGuidedInfoNCELoss(global_negatives=args.global_negatives)

    resume(accelerator, args.output_dir, args.resume_from_checkpoint, logger)
    if args.report_to != "none":
        accelerator.init_trackers("ace_lora", config={k: str(v) for k, v in vars(args).items()})

    total_steps = args.max_train_steps or len(train_loader) * args.num_epochs
    bar = tqdm(total=total_steps, initial=progress.completed_steps, disable=not accelerator.is_local_main_process,
               desc="training", unit="step")
    skipped_rows = 0
    for epoch in range(progress.epoch, args.num_epochs):
        model.train()
        for batch in progress.epoch_batches(accelerator, train_loader):
            skipped_rows += int(batch.pop("num_skipped"))
            labels = batch.pop("labels", None)
            with accelerator.accumulate(model):
                outputs = model(**batch)
                logit_scale = accelerator.unwrap_model(model).logit_scale
                loss = loss_function(outputs.image_embeds.float(), outputs.text_embeds.float(), logit_scale, labels)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.record_step(accelerator, loss, bar)
            if progress.completed_steps % args.log_every_steps == 0:
                accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                                 "train/logit_scale": logit_scale.item()}, step=progress.completed_steps)
            if args.checkpointing_steps and progress.completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, progress.completed_steps, args.keep_checkpoints)
            if args.max_train_steps and progress.completed_steps >= args.max_train_steps:
                break
        finished_epoch = progress.step_in_epoch == len(train_loader)
        if finished_epoch:
            end_epoch(accelerator, args, model, processor, progress, validation_loader, epoch)
        if args.max_train_steps and progress.completed_steps >= args.max_train_steps:
            break
    bar.close()
    if skipped_rows:
        logger.warning("Skipped %d unreadable image(s) during training.", skipped_rows)
    save_model(accelerator, model, processor, args.output_dir / "final")
    if accelerator.is_main_process:
        save_adapters(accelerator.unwrap_model(model), args.output_dir / "adapters", overwrite=True)
    accelerator.end_training()
    return progress


def end_epoch(accelerator, args, model, processor, progress: TrainingProgress, validation_loader, epoch: int) -> None:
    epoch_loss = progress.epoch_loss_sum / progress.step_in_epoch
    record = {"epoch": epoch, "step": progress.completed_steps, "loss": epoch_loss}
    if validation_loader is not None and (epoch + 1) % args.eval_every_epochs == 0:
        metrics = evaluate(accelerator, model, processor, validation_loader, args.validation_labels)
        record.update({f"validation_{name}": value for name, value in metrics.items()})
    accelerator.print(json.dumps(record))
    accelerator.log({f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")},
                    step=progress.completed_steps)
    progress.history.append(record)
    if accelerator.is_main_process:
        history = args.output_dir / "training_history.json"
        history.with_suffix(".tmp").write_text(json.dumps(progress.history, indent=2))
        history.with_suffix(".tmp").replace(history)
    is_best = epoch_loss < progress.best_score
    progress.best_score = min(progress.best_score, epoch_loss)
    progress.epoch, progress.step_in_epoch, progress.epoch_loss_sum = epoch + 1, 0, 0.0
    if is_best:
        save_model(accelerator, model, processor, args.output_dir / "best")
    save_checkpoint(accelerator, args.output_dir, progress.completed_steps, args.keep_checkpoints)


def main(argv=None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    training_function(parse_args(argv))


if __name__ == "__main__":
    main()
