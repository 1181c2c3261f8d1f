"""Export the ACE image and text embeddings of an ACE-LoRA model folder to ONNX.

    ace-lora-export-onnx --model MODEL --output OUT_DIR [--opset N] [--overwrite]
    ace-lora-export-onnx --output OUT_DIR --labels "No Finding" pneumonia [--templates T ...]
    ace-lora-export-onnx --output OUT_DIR --labels pneumonia effusion --multi-label [--negative-templates T ...]

MODEL is anything the other commands take: 'released' (the default), a model folder or Hub repository, a training
run's folder or one of its checkpoints.

Writes `vision.onnx`, `text.onnx` and `export_onnx.json` into OUT_DIR (their inputs and outputs are described in
`ace_lora_hf.publishing.export_onnx` and the README), with LoRA merged. Needs `pip install 'ace-lora-hf[onnx]'`.
With --labels it also writes `classes.safetensors`, the zero-shot class embeddings of those labels (in --templates,
default the paper's two chest X-ray ones; with --multi-label each finding's positive and negative prompts), so that
`ace_lora_hf.inference.onnx_zero_shot.OnnxZeroShotClassifier` gives the probabilities of the PyTorch model.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .common import run_cli
from .options import add_model_options, add_option, add_output_options, command_parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser("ace-lora-export-onnx", __doc__)
    add_model_options(parser, tokenizer=True)
    add_output_options(parser, "Folder to write the ONNX files into.", required=True)
    add_option(parser, "--opset", type=int, help="ONNX opset (default: the exporter's own).")
    classes = parser.add_argument_group("zero-shot classes")
    add_option(classes, "--labels", nargs="+", help="Export the class embeddings of these labels (or findings).")
    add_option(classes, "--templates", nargs="+",
               help="Their prompt templates, each with one {} (default: the paper's two chest X-ray ones).")
    add_option(classes, "--multi-label", action="store_true",
               help="Export each label as a finding: its prompts and its negative prompts.")
    add_option(classes, "--negative-templates", "--negative-template", "--negative_template", nargs="+",
               help="With --multi-label: the negative prompts, each with one {} (default: each template with "
                    "'no {}').")
    args = parser.parse_args(argv)
    for option in ("templates", "multi_label", "negative_templates"):
        if getattr(args, option) and not args.labels:
            parser.error(f"--{option.replace('_', '-')} describes the exported classes: give --labels too.")
    if args.negative_templates and not args.multi_label:
        parser.error("--negative-templates scores findings one by one: pass --multi-label too.")
    return args


def checked_classes(args: argparse.Namespace) -> None:
    """The labels and templates to export, checked before the model loads."""
    from ..models.ace_lora.zero_shot import checked_classes

    if args.labels:
        checked_classes(args.labels, args.multi_label, args.templates, args.negative_templates)


def exported_classes(args: argparse.Namespace, loaded):
    """The class embeddings --labels asks for, computed with the loaded model (None without --labels)."""
    from ..inference.onnx_zero_shot import ExportedClasses
    from ..models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, ZeroShotClassifier

    if not args.labels:
        return None
    classifier = ZeroShotClassifier(loaded.model, loaded.processor, args.templates or CHEST_XRAY_TEMPLATES,
                                    negative_templates=args.negative_templates)
    return ExportedClasses.compute(classifier, args.labels, args.multi_label)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from .options import check_model_source, load_model
    from ..outputs.safe_outputs import atomic_folder, check_output_folder, folder_lock
    from ..publishing.export_onnx import DESCRIPTION_FILE, check_opset, export_model, require_onnx_packages

    require_onnx_packages()
    check_opset(args.opset)
    checked_classes(args)
    check_model_source(args)
    with folder_lock(args.output.resolve()):
        check_output_folder(args.output, [Path(args.model)], args.overwrite)
        loaded = load_model(args, "cpu", torch.float32)  # float32, LoRA merged, eval mode
        classes = exported_classes(args, loaded)
        with atomic_folder(args.output, others="keep") as staging:  # the user's notes stay beside the files
            description = export_model(loaded.model, staging, args.opset, classes)
    for key in ("vision", "text"):
        entry = description[key]
        print(f"wrote {args.output / entry['file']} (opset {entry['opset']}; onnxruntime vs PyTorch: "
              f"max |diff| {entry['max_abs_difference']:.1e})")
    if "classes" in description:
        print(f"wrote {args.output / description['classes']['file']} (class embeddings of "
              f"{len(description['classes']['labels'])} label(s))")
    print(f"wrote {args.output / DESCRIPTION_FILE}")


def cli() -> None:
    """The `ace-lora-export-onnx` console script."""
    run_cli(main)


__all__ = ["checked_classes", "cli", "exported_classes", "main", "parse_args"]


if __name__ == "__main__":
    cli()
