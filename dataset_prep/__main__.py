"""`ace-lora-prepare DATASET --input … --output …` (or `python -m dataset_prep DATASET …`): prepare any dataset;
`ace-lora-prepare training-set --input TABLE --output …` makes a prepared training set of any image-report table.

`ace-lora-prepare DATASET --help` lists that dataset's expected layout and options.
"""

import argparse
import importlib
from collections.abc import Sequence

from ace_lora_hf.cli.common import run_cli


PROGRAM = "ace-lora-prepare"
DATASETS = ("chestxray14", "chexpert_5x200", "lc25000", "mhist", "mimic_cxr", "rsna", "siim", "training-set")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS,
                        help="The dataset to prepare, or training-set: any image-report table as a prepared training "
                             "set (Hugging Face datasets, images resized once).")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="The dataset's own options (--input, --output, ...).")
    args = parser.parse_args(argv)
    importlib.import_module(f"dataset_prep.{args.dataset.replace('-', '_')}").main(args.options, prog=f"{PROGRAM} {args.dataset}")


def cli() -> None:
    """The `ace-lora-prepare` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
