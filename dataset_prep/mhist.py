#!/usr/bin/env python
"""MHIST (colorectal polyps) -> the test table.

    python dataset_prep/mhist.py --input mhist/ --output mhist/

--input holds `annotations.csv` (Image Name, Majority Vote Label HP or SSA, Number of Annotators who Selected SSA
(Out of 7), Partition train/test) and `images/`. Writes `mhist_test.csv`: Path, label (HP or SSA), split (the
official partition); the evaluation uses the test partition.
"""

from collections.abc import Sequence
from pathlib import Path

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError
from dataset_prep._common import check_listed_once, locked_outputs, parser, read_rows, write_tables


LABELS = ("HP", "SSA")
PARTITIONS = ("train", "test")
ANNOTATIONS_FILE = "annotations.csv"
TABLE = "mhist_test.csv"


def labelled_images(input_dir: Path) -> list[dict]:
    annotations_path = input_dir / ANNOTATIONS_FILE
    rows, first_lines = [], {}
    for row in read_rows(annotations_path, ["Image Name", "Majority Vote Label", "Partition"], "MHIST's annotations"):
        name = row.file_name("Image Name")
        check_listed_once(first_lines, name, row, "Image Name")
        label, partition = row.one_of("Majority Vote Label", LABELS), row.one_of("Partition", PARTITIONS)
        image = input_dir / "images" / name
        if not image.is_file():
            raise DataFormatError(f"{annotations_path}, line {row.line}, column 'Image Name': image {image} not "
                                  "found; download the whole images/ folder.")
        rows.append({"Path": f"images/{name}", "label": label, "split": partition})
    return rows


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    with locked_outputs(output_dir, [input_dir / ANNOTATIONS_FILE], overwrite, [TABLE]):
        write_tables(output_dir, {TABLE: (labelled_images(input_dir), ["Path", "label", "split"])})


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    args = parser(__doc__, prog).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
