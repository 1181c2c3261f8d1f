"""Stage an ACE-LoRA model as a complete Hub repository (weights, code, processor, model card) and optionally upload it.

    ace-lora-publish --model runs/ace/final --repo-id me/ace-lora-mimic --staging hub_repo/ \\
        --results runs/ace/rsna_zero_shot.json [--push]
    ace-lora-publish --model released --repo-id aydnarda/ACE-LoRA --staging hub_repo/

--model is a model folder or Hub id (a run's final/), a training run's folder or one of its checkpoints (best/: its
base with its trained weights), or `released`: the authors' weights, built from BiomedCLIP, the only model whose card
shows the paper's results. --results adds evaluations of the model published (a fine-tune's test_results.json, the
--output of ace-lora-evaluate) to its card. A zero-shot model's card links the demo (--space, a Space running this
package's app.py) and shows the model's explanation of --example-image (an X-ray from examples/images by default),
which needs the [plot] extra; --calibration adds a calibration file to the repository, and a report with subgroups
adds their rows to the card's table. Without --push the staging folder is only written, to be inspected; with it, it is
uploaded (needs `hf auth login`).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .common import run_cli
from .options import BIOMEDCLIP_REPO_ID, add_model_options, add_option, command_parser, released_options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser("ace-lora-publish", __doc__)
    add_model_options(parser, tokenizer=True)
    add_option(parser, "--repo-id", required=True, help="Hub repository, e.g. me/ace-lora-mimic.")
    add_option(parser, "--staging", type=Path, required=True, help="Folder to assemble the repository in.")
    add_option(parser, "--results", type=Path, nargs="+", default=[],
               help="Evaluation JSONs of this model for its card (test_results.json, ace-lora-evaluate --output).")
    add_option(parser, "--base-model", default=BIOMEDCLIP_REPO_ID, help="Base model named in the card's metadata.")
    add_option(parser, "--space", help="Hub Space running the demo (app.py) to link from the card, e.g. "
                                       "me/ace-lora-demo.")
    add_option(parser, "--example-image", type=Path,
               help="Image whose explanation the card shows (default: an NIH X-ray in examples/images).")
    add_option(parser, "--calibration", type=Path, help="Calibration file (ace-lora-evaluate --calibration-output) "
                                                         "to carry in the repository as calibration.json.")
    add_option(parser, "--overwrite", action="store_true", help="Replace a non-empty --staging folder.")
    add_option(parser, "--push", action="store_true", help="Upload the staged folder to the Hub.")
    add_option(parser, "--private", action="store_true", help="Create the repository as private.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from .options import check_model_source
    from ..publishing.publish import stage_repository, upload

    check_model_source(args)
    staging = stage_repository(args.model, args.repo_id, args.staging, args.results, args.base_model, args.overwrite,
                               args.space, args.example_image, args.calibration, revision=args.revision,
                               **released_options(args))
    print(f"staged {args.repo_id} in {staging}: {', '.join(sorted(path.name for path in staging.iterdir()))}")
    if args.push:
        print(f"uploaded: {upload(staging, args.repo_id, args.private)}")


def cli() -> None:
    """The `ace-lora-publish` console script."""
    run_cli(main)


__all__ = ["cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
