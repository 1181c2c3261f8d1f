"""Convert BiomedCLIP (open_clip format: a folder or a Hub repository) and the authors' ACE-LoRA adapters into an
`AceLoraModel` folder (safetensors, config, processor and the model code).

    ace-lora-convert --biomedclip microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \\
        --adapters released --output ace-lora/
    ace-lora-convert --biomedclip DIR [--tokenizer DIR|ID] [--adapters ACE_LoRA.pt] --output DIR

`--adapters released` applies the authors' adapters shipped with this package; a path reads an `ACE_LoRA.pt`
(only tensors are read: `weights_only=True`). Without it the result is BiomedCLIP with fresh adapters: the starting
point for training. The tokenizer comes from `--tokenizer` if given, else from the BiomedCLIP folder when it has one,
else from the repository its `open_clip_config.json` names (`text_cfg.hf_tokenizer_name`).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .common import run_cli
from .options import BIOMEDCLIP_REPO_ID, add_option, add_output_options, command_parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser("ace-lora-convert", __doc__)
    add_option(parser, "--biomedclip", default=BIOMEDCLIP_REPO_ID,
               help="BiomedCLIP folder (open_clip format) or Hub repository (default: %(default)s).")
    add_option(parser, "--revision", help="Branch, tag or commit of a --biomedclip Hub repository.")
    add_option(parser, "--adapters", "--ace-checkpoint", "--ace_checkpoint",
               help="'released' (shipped with the package) or an ACE_LoRA.pt (default: none, fresh adapters).")
    add_option(parser, "--tokenizer", help="Tokenizer folder or Hub repository (default: see above).")
    add_output_options(parser, "Folder to write (save_pretrained layout).", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from ..outputs.safe_outputs import check_output_folder, folder_lock
    from ..sources.convert import convert_sources, resolve_sources, save_model_folder

    local_inputs = [Path(source) for source in (args.biomedclip, args.tokenizer, args.adapters)
                    if source is not None and Path(source).exists()]
    output = check_output_folder(args.output, inputs=local_inputs, overwrite=args.overwrite)
    with folder_lock(output):
        sources = resolve_sources(args.biomedclip, args.adapters, args.tokenizer, args.revision)
        model, processor = convert_sources(sources)
        save_model_folder(model, processor, output)
    adapters = "fresh adapters" if sources.adapters is None else f"adapters from {sources.adapters.path.name}"
    print(f"Wrote ACE-LoRA ({adapters}, tokenizer from {sources.tokenizer}) to {output}")


def cli() -> None:
    """The `ace-lora-convert` console script."""
    run_cli(main)


__all__ = ["cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
