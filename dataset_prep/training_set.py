#!/usr/bin/env python
"""Any image-report table -> a prepared training set for `examples/pretrain.py --dataset_name FOLDER`.

    ace-lora-prepare training-set --input mimic/mimic_cxr.csv --split train --patient-column subject_id \\
        --validation-fraction 0.05 --output mimic_prepared/ --num-proc 8

Each image is decoded, resized and center-cropped once by the model's image processor (--model; default
BiomedCLIP's, 224 x 224) and stored losslessly as an 8-bit PNG (one channel for grayscale), with its report and
labels, in a Hugging Face `datasets` folder (`save_to_disk`: Arrow shards per split, loadable with
`datasets.load_from_disk`, streamable, and uploadable with --push-to-hub). Training from it gives the same
`pixel_values` as training from the files, without decoding a full-resolution image per sample per epoch.

With --patient-column, --validation-fraction holds out that share of the patients, never splitting one patient's
images. An interrupted run continues where it stopped when run again with the same options.
"""

import os
from collections.abc import Sequence
from pathlib import Path

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.cli.options import add_option, command_parser, positive_int
from ace_lora_hf.data.image_tables import CHEXPERT_LABELS, ImageTextColumns, load_image_text_dataset
from ace_lora_hf.data.tables import file_sha256
from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.outputs.safe_outputs import check_output_folder, folder_lock


def parse_args(argv: Sequence[str] | None, prog: str | None):
    parser = command_parser(prog, __doc__)
    add_option(parser, "--input", "--table", type=Path, required=True,
               help="CSV or JSON Lines table of image-report pairs.")
    add_option(parser, "--image-root", type=Path, help="Folder the image paths are relative to (default: the table's).")
    add_option(parser, "--image-column", default="image", help="Column of image paths (default: %(default)s).")
    add_option(parser, "--text-column", default="report", help="Column of report texts (default: %(default)s).")
    add_option(parser, "--label-columns", nargs="+", default=list(CHEXPERT_LABELS),
               help="Label columns (1, 0, -1 or empty; default: the 14 CheXpert).")
    add_option(parser, "--no-labels", action="store_true", help="Keep no label columns.")
    add_option(parser, "--split-column", default="split", help="Column naming each row's split (default: %(default)s).")
    add_option(parser, "--split", help="Prepare only rows whose split column has this value (e.g. train).")
    add_option(parser, "--patient-column", help="Column of patient ids: keeps each patient's images in one split.")
    add_option(parser, "--validation-fraction", type=float, default=0.0,
               help="Share of the patients (of the rows, without --patient-column) held out as the validation split.")
    add_option(parser, "--seed", type=int, default=0, help="Seed of the validation split (default: %(default)s).")
    add_option(parser, "--model", help="Model folder or Hub id whose image processor sizes the images (default: "
                                       "BiomedCLIP's, 224 x 224).")
    add_option(parser, "--num-proc", type=positive_int, default=1, help="Processes preparing images (default: 1).")
    add_option(parser, "--output", type=Path, required=True, help="Folder for the prepared set.")
    add_option(parser, "--overwrite", action="store_true", help="Replace an existing --output (never an input).")
    add_option(parser, "--push-to-hub", metavar="REPO_ID", help="Also upload the set to this Hub dataset repository.")
    add_option(parser, "--public", action="store_true",
               help="Make the --push-to-hub repository public (it is private otherwise).")
    args = parser.parse_args(argv)
    if not 0 <= args.validation_fraction < 1:
        raise InvalidArgumentError(f"--validation-fraction {args.validation_fraction}: give a number from 0 to below "
                                   "1 (e.g. 0.05).")
    return args


def image_processor_of(model: str | None):
    """The image processor of `model`, or BiomedCLIP's."""
    from ace_lora_hf import AceLoraImageProcessor

    return AceLoraImageProcessor.from_pretrained(model) if model else AceLoraImageProcessor()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    from ace_lora_hf.data.prepared import check_column_names, prepare_training_set, push_prepared_set

    args = parse_args(argv, prog)
    columns = ImageTextColumns(image=args.image_column, text=args.text_column, split=args.split_column,
                               labels=() if args.no_labels else tuple(args.label_columns),
                               patient=args.patient_column)
    check_column_names(columns)
    table = load_image_text_dataset(args.input, columns, args.image_root, args.split, option="--input")
    image_processor = image_processor_of(args.model)
    with folder_lock(args.output.resolve()):
        check_output_folder(args.output, [args.input], args.overwrite)
        source = {"table": os.path.basename(args.input), "sha256": file_sha256(args.input), "split": args.split,
                  "image_column": args.image_column, "text_column": args.text_column,
                  "patient_column": args.patient_column}
        info = prepare_training_set(table, image_processor, args.output, columns, source, args.num_proc,
                                    args.validation_fraction, args.seed)
    counts = ", ".join(f"{name} {split['rows']} rows" + (f" ({split['patients']} patients)" if "patients" in split
                                                         else "") for name, split in info["splits"].items())
    print(f"wrote {args.output}: {counts}")
    if args.push_to_hub:
        push_prepared_set(args.output, args.push_to_hub, private=not args.public)
        print(f"pushed to the Hub dataset {args.push_to_hub} ({'public' if args.public else 'private'})")


if __name__ == "__main__":
    run_cli(main)
