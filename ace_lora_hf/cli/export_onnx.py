"""Export the ACE image and text embeddings of an ACE-LoRA model folder to ONNX.

    ace-lora-export-onnx --model MODEL --output OUT_DIR [--opset N] [--overwrite]

MODEL is anything the other commands take: 'released' (the default), a model folder or Hub repository, a training
run's folder or one of its checkpoints.

Writes `vision.onnx`, `text.onnx` and `export_onnx.json` into OUT_DIR (their inputs and outputs are described in
`ace_lora_hf.publishing.export_onnx` and the README), with LoRA merged. Needs `pip install 'ace-lora-hf[onnx]'`.
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from .options import check_model_source, load_model
    from ..outputs.safe_outputs import atomic_folder, check_output_folder, folder_lock
    from ..publishing.export_onnx import DESCRIPTION_FILE, check_opset, export_model, require_onnx_packages

    require_onnx_packages()
    check_opset(args.opset)
    check_model_source(args)
    with folder_lock(args.output.resolve()):
        check_output_folder(args.output, [Path(args.model)], args.overwrite)
        model = load_model(args, "cpu", torch.float32).model  # float32, LoRA merged, eval mode
        with atomic_folder(args.output, others="keep") as staging:  # the user's notes stay beside the files
            description = export_model(model, staging, args.opset)
    for key in ("vision", "text"):
        entry = description[key]
        print(f"wrote {args.output / entry['file']} (opset {entry['opset']}; onnxruntime vs PyTorch: "
              f"max |diff| {entry['max_abs_difference']:.1e})")
    print(f"wrote {args.output / DESCRIPTION_FILE}")


def cli() -> None:
    """The `ace-lora-export-onnx` console script."""
    run_cli(main)


__all__ = ["cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
