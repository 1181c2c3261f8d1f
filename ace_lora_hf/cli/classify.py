"""Zero-shot classification of chest X-rays and pathology images (PNG/JPEG/TIFF/DICOM) with ACE-LoRA.

    ace-lora-classify --images a.dcm b.png scans/ --labels "No Finding" pneumonia
    ace-lora-classify --csv rsna_test.csv --image-root rsna/ --output results.csv
    python hf_model_inference.py --images examples/images/*.png examples/images/*.dcm

Without --model, the released ACE-LoRA model is built once from BiomedCLIP (downloaded from the Hub) and the authors'
adapters shipped with the package, and kept in the Hugging Face cache. The defaults reproduce the paper's RSNA
pneumonia setting: labels "No Finding" / "pneumonia" and the templates "a chest X-ray image of {}." and "Findings
suggesting {}.". With --csv (columns Path, Target) it also reports accuracy and the AUC of the last label.
With --multi-label each label is a finding of its own (several can be present): its prompts against negative ones
("no {}" in the same templates, or --negative-templates), one probability column per finding.

Folders are searched recursively (image files and files without a suffix, or --pattern). An unreadable file is
reported and skipped (exit status 3 at the end; --strict stops at the first one). Results stream to a .csv or .jsonl
--output as each batch finishes, so an interrupted run keeps what it computed and --resume continues it. Rows of
DICOM inputs carry the file's StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and ViewPosition, to join them
back to a PACS worklist (--no-dicom-ids leaves them out).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .common import run_cli
from .options import (add_batch_options, add_device_options, add_model_options, add_option, add_output_options,
                      add_per_finding_options, add_quiet_option, command_parser)


DEFAULT_LABELS = ("No Finding", "pneumonia")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser("ace-lora-classify", __doc__)
    inputs = parser.add_mutually_exclusive_group(required=True)
    add_option(inputs, "--images", nargs="+", type=Path, help="Image files and folders (PNG, JPEG, TIFF, DICOM).")
    add_option(inputs, "--image-list", type=Path, help="A text file with one image path per line.")
    add_option(inputs, "--csv", type=Path, help="CSV with columns Path and Target (0/1 for the last label).")
    add_option(parser, "--image-root", type=Path, help="Folder that --csv/--image-list paths are relative to.")
    add_option(parser, "--pattern", action="append", help="Glob for files in --images folders (repeatable).")
    add_option(parser, "--labels", nargs="+", default=list(DEFAULT_LABELS), help="Class names (default: %(default)s).")
    add_option(parser, "--templates", nargs="+",
               help="Prompt templates, each with one {} for the label (default: the paper's two chest X-ray ones).")
    add_option(parser, "--calibration", type=Path,
               help="Calibration file from ace-lora-evaluate --calibration-output: calibrated probabilities, and a "
                    "decision column when it holds operating thresholds.")
    add_per_finding_options(parser, "Score each label as a finding on its own: its probability against its "
                                    "negative prompts.", "--multi-label")
    add_model_options(parser)
    add_device_options(parser)
    add_batch_options(parser)
    add_output_options(parser, "Results file: .csv or .jsonl (streamed), or .json.")
    add_option(parser, "--resume", action="store_true", help="Continue --output, skipping the images it has.")
    add_option(parser, "--strict", action="store_true", help="Stop at the first unreadable image.")
    add_option(parser, "--no-dicom-ids", action="store_true",
               help="Leave out the Study/Series/SOP Instance UIDs and ViewPosition that rows of DICOM inputs carry "
                    "(they identify a patient's examination).")
    add_option(parser, "--explain", type=Path, help="Write an explanation picture per image into this folder "
                                                    "(needs matplotlib: pip install 'ace-lora-hf[plot]').")
    add_quiet_option(parser, "Print only the summary, not a row per image.")
    args = parser.parse_args(argv)
    if args.negative_templates and not args.multi_label:
        parser.error("--negative-templates scores findings one by one: pass --multi-label too.")
    if args.multi_label and (args.csv or args.explain):
        parser.error(f"--multi-label: {'--csv' if args.csv else '--explain'} is for single-label classification; "
                     "evaluate a table of findings with ace-lora-evaluate --findings.")
    if args.csv and len(args.labels) != 2:
        parser.error("--csv evaluates a binary task: pass exactly two --labels (negative first).")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .classify_run import run  # torch and the model code, once the options are known

    return run(args)


def cli() -> None:
    """The `ace-lora-classify` console script."""
    run_cli(main)


__all__ = ["cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
