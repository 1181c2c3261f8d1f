#!/usr/bin/env python
"""Fine-tune ACE-LoRA on image-report pairs with Accelerate: one GPU, many GPUs, or the CPU.

    accelerate launch examples/pretrain.py --model ace-lora/ --train_file mimic_cxr_train.csv --output_dir runs/ace
    accelerate launch examples/pretrain.py --model ace-lora/ --dataset_name mimic_prepared/ --output_dir runs/ace

The data is a table of image paths and reports (--train_file), or a Hugging Face dataset (--dataset_name): a folder
`ace-lora-prepare training-set` wrote (images already resized: the fastest), any `save_to_disk` folder, Parquet or
Arrow files, or a Hub dataset (read from the cache when offline). --streaming reads it as a stream, each process its
own part; a stream has no length, so the run is --max_train_steps long, in --num_epochs epochs of
ceil(max_train_steps / num_epochs) steps, and resumes exactly where it stopped.

The defaults are the released recipe (SPEC §7): AdamW lr 1e-3, weight decay 1e-2, cosine schedule with one
epoch of linear warm-up, 40 epochs, batch 64 per device, seed 1, label-guided InfoNCE on the 14 CheXpert labels,
each device using its own batch as negatives (`--global_negatives` gathers every device's batch instead); the epoch
of the lowest loss is kept as best/ (or the step where --max_train_steps stopped the run, if its loss is lower).

Outputs in --output_dir (see ace_lora_hf.training.loop): checkpoints/step_N/ and best/ hold the trained weights (LoRA,
hypergraphs, logit scale: a few MB) and a reference to the --model they apply to; final/ is the complete model
(save_pretrained), adapters/ the same adapters in PEFT's format. Resume with --resume_from_checkpoint latest. Every
option can also come from --config FILE.yaml. `python -m ace_lora_hf.training.launch` takes accelerate launch's
options and, unlike it, exits with the script's status (2 and one line for a user error).
"""

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from ace_lora_hf import AceLoraModel
from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.data.image_tables import (CHEXPERT_LABELS, ImageClassificationSet, ImageTextCollator,
                                          ImageTextColumns, load_image_text_dataset, read_image_labels)
from ace_lora_hf.data.pixels import PixelTable
from ace_lora_hf.data.prepared import check_processor_settings
from ace_lora_hf.data.tables import file_sha256
from ace_lora_hf.data.training_sets import TrainingSource, load_training_source
from ace_lora_hf.errors import ConfigError, InvalidArgumentError
from ace_lora_hf.evaluation.metrics import classification_metrics
from ace_lora_hf.models.ace_lora.loss_ace_lora import LabelGuidedInfoNCELoss
from ace_lora_hf.models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier
from ace_lora_hf.outputs.launched_processes import checks_alike_in_every_process
from ace_lora_hf.sources.adapters import save_adapters
from ace_lora_hf.sources.checkpoints import BaseModel, load_trained_model
from ace_lora_hf.training.accelerator import build_accelerator, data_loader
from ace_lora_hf.training.loop import TrainingRun
from ace_lora_hf.training.options import TrainingArgumentParser, add_training_options
from ace_lora_hf.training.run_folder import prepare_output_dir
from ace_lora_hf.training.selection import Selection
from ace_lora_hf.training.streaming import StreamingLoader, steps_per_epoch


def parse_args(argv=None):
    parser = TrainingArgumentParser(__doc__)
    data = parser.add_argument_group("model and data")
    add = parser.add_option
    add("model", data, required=True,
        help="ACE-LoRA folder or Hub id to start from (ace-lora-convert writes one), or a run's checkpoint folder.")
    add("train_file", data, type=Path, help="CSV or JSON-lines table of image-report pairs.")
    add("dataset_name", data, help="Instead of --train_file: a prepared set or other save_to_disk folder, Parquet or "
                                   "Arrow files (a glob pattern too), or a Hub dataset id.")
    add("dataset_config_name", data, help="The Hub dataset's configuration.")
    add("dataset_split", data, default="train", help="The dataset's split to train on (default: %(default)s).")
    add("streaming", data, action="store_true", help="Stream --dataset_name (needs --max_train_steps).")
    add("image_root", data, type=Path, help="Folder the image paths are relative to (default: the table's; with "
                                            "--dataset_name, the working folder).")
    add("image_column", data, default="image", help="Column of image paths (default: %(default)s).")
    add("text_column", data, default="report", help="Column of report texts (default: %(default)s).")
    add("label_columns", data, nargs="+", default=list(CHEXPERT_LABELS),
        help="Label columns (default: the 14 CheXpert).")
    add("no_labels", data, action="store_true", help="Train with plain InfoNCE, without labels.")
    add("split_column", data, default="split", help="Column naming each row's split (default: %(default)s).")
    add("train_split", data, help="Use only rows whose split column has this value (e.g. train).")
    add("skip_bad_rows", data, action="store_true",
        help="Drop rows with a missing or unreadable image or an empty report, and count them.")
    add("validation_file", data, type=Path, help="RSNA-style table (Path, Target) for zero-shot evaluation.")
    add("validation_image_root", data, type=Path, help="Folder --validation_file paths are relative to.")
    add("validation_labels", data, nargs=2, default=["No Finding", "pneumonia"], help="Negative and positive class.")
    add("eval_every_epochs", data, type=int, default=1, help="(default: %(default)s)")
    objective = parser.add_argument_group("objective")
    add("global_negatives", objective, action="store_true", help="Gather every device's batch as negatives.")
    add("gradient_checkpointing", objective, action="store_true", help="Recompute tower activations in backward.")
    add_training_options(parser, num_epochs=40, batch_size=64, learning_rate=1e-3, weight_decay=1e-2,
                         warmup_epochs=1.0, seed=1)
    return check_data_options(parser.parse(argv))


def check_data_options(args):
    if bool(args.train_file) == bool(args.dataset_name):
        raise InvalidArgumentError("give the training data as either --train_file TABLE or --dataset_name DATASET.")
    if args.streaming and not (args.dataset_name and args.max_train_steps):
        raise InvalidArgumentError("--streaming reads --dataset_name as a stream, which has no length: give "
                                   "--dataset_name and --max_train_steps.")
    return args


def training_data(args, columns: ImageTextColumns) -> TrainingSource:
    """The training rows, checked before any model is loaded, and what identifies them in a checkpoint."""
    if args.dataset_name:
        return load_training_source(args.dataset_name, columns, args.dataset_config_name, args.dataset_split,
                                    args.train_split, args.streaming)
    dataset = load_image_text_dataset(args.train_file, columns, args.image_root, args.train_split, args.skip_bad_rows)
    return TrainingSource(dataset, None, {"train_file_sha256": file_sha256(args.train_file),
                                          "train_rows": len(dataset)})


def training_loader(accelerator: Accelerator, args, source: TrainingSource, processor, columns: ImageTextColumns):
    """The training batches: a loader of the rows or, with --streaming, of this process's part of the stream."""
    if source.prepared_info:
        check_processor_settings(source.prepared_info, processor.image_processor, f"--dataset_name {args.dataset_name}",
                                 f"--model {args.model}")
    collator = ImageTextCollator(processor, skip_bad_images=args.skip_bad_rows,
                                 columns=columns if args.dataset_name else None,
                                 uint8_pixels=source.prepared_info is not None,
                                 image_root=args.image_root if args.dataset_name else None)
    if args.streaming:
        return StreamingLoader(source.dataset, collator, args.batch_size,
                               steps_per_epoch(args.max_train_steps, args.num_epochs), args.seed,
                               accelerator.process_index, accelerator.num_processes, accelerator.device,
                               args.num_workers)
    return data_loader(source.dataset, args, shuffle=True, collate_fn=collator)


@torch.no_grad()
def zero_shot_metrics(accelerator: Accelerator, model, processor, loader, labels: list[str]) -> dict[str, float]:
    """Accuracy and AUC of zero-shot classification of the validation images into `labels`."""
    unwrapped = accelerator.unwrap_model(model).eval()
    classes = ZeroShotClassifier(unwrapped, processor, CHEST_XRAY_TEMPLATES).class_embeddings(labels)
    probabilities, targets = [], []
    for batch in loader:
        image_embeds = unwrapped.get_image_features(batch["pixel_values"]).pooler_output
        logits = unwrapped.logit_scale * image_embeds @ classes.t()
        probability, target = accelerator.gather_for_metrics((logits.softmax(dim=-1), batch["labels"]))
        probabilities.append(probability.float().cpu())
        targets.append(target.cpu())
    return classification_metrics(torch.cat(probabilities), torch.cat(targets))


@checks_alike_in_every_process()  # what the training loop runs on each process's shard is marked as its own
def main(argv=None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    columns = ImageTextColumns(image=args.image_column, text=args.text_column, split=args.split_column,
                               labels=() if args.no_labels else tuple(args.label_columns))
    source = training_data(args, columns)
    validation = args.validation_file and read_image_labels(args.validation_file, args.validation_image_root)
    with prepare_output_dir(accelerator, args) as resume_checkpoint:
        model, processor = load_trained_model(args.model, AceLoraModel)
        if processor.context_length != model.config.text_config.context_length:
            raise ConfigError(f"--model {args.model}: its processor pads texts to {processor.context_length} tokens, "
                              f"its model's context is {model.config.text_config.context_length}; set "
                              "context_length in processor_config.json to the model's.")
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
        validation_loader = validation and accelerator.prepare(
            data_loader(ImageClassificationSet(validation, processor.image_processor), args, shuffle=False))
        train_loader = training_loader(accelerator, args, source, processor, columns)
        signature = {**source.signature, "label_columns": list(columns.labels),
                     "global_negatives": args.global_negatives}
        run = TrainingRun(accelerator, args, model, processor, train_loader, base=BaseModel.of(model, args.model),
                          selection=Selection("loss", higher_is_better=False), signature=signature,
                          resume_checkpoint=resume_checkpoint)
        loss_function = LabelGuidedInfoNCELoss(global_negatives=args.global_negatives)
        pixel_table = PixelTable(processor.image_processor)

        def contrastive_loss(model, batch: dict) -> torch.Tensor:
            labels = batch.pop("labels", None)
            if batch["pixel_values"].dtype == torch.uint8:  # a prepared set's pixels, finished on the device
                batch["pixel_values"] = pixel_table(batch["pixel_values"])
            return loss_function(model(**batch), run.unwrapped_model.logit_scale, labels)

        def evaluate(epoch: int) -> dict:
            if not validation_loader or ((epoch + 1) % args.eval_every_epochs and not run.stopped):
                return {}
            metrics = zero_shot_metrics(accelerator, run.model, processor, validation_loader, args.validation_labels)
            return {f"validation_{name}": value for name, value in metrics.items()}

        run.train(contrastive_loss, evaluate,
                  log_values=lambda: {"train/logit_scale": run.unwrapped_model.logit_scale.item()})
        if accelerator.is_main_process:
            save_adapters(run.unwrapped_model, args.output_dir / "adapters", overwrite=True)
        if loss_function.batches_without_negatives:
            logging.getLogger(__name__).warning("%d batch(es) had no negatives (all their label vectors alike).",
                                                loss_function.batches_without_negatives)
        run.finish()


if __name__ == "__main__":
    run_cli(main)
