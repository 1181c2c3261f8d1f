#!/usr/bin/env python
"""CheXpert 5x200 -> a checked, normalised test table.

    python dataset_prep/chexpert_5x200.py --input chexpert_5x200.csv --output chexpert5x200/ [--data-root DIR]

--input is the 5x200 CSV used by GLoRIA/MGCA/BiomedCLIP: a `Path` column and CheXpert's label columns, each row
positive (1) for exactly one of Atelectasis, Cardiomegaly, Consolidation, Edema and Pleural Effusion, 200 rows per
class. Writes `chexpert_5x200.csv`: Path and label (the class name). With --data-root, every image is checked to
exist under it.
"""

from collections.abc import Sequence
from pathlib import Path

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError
from dataset_prep._common import check_listed_once, locked_outputs, parser, read_rows, write_tables


CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_VALUES = (1, 0, -1)  # positive, negative, uncertain; empty is unmentioned
PER_CLASS = 200
TABLE = "chexpert_5x200.csv"


def labelled_images(csv_path: Path, data_root: Path | None) -> list[dict]:
    """One {Path, label} per row, every row positive for exactly one class."""
    rows, first_lines = [], {}
    for row in read_rows(csv_path, ["Path", *CLASSES], "the CheXpert 5x200 table"):
        path = row.relative_path("Path")
        check_listed_once(first_lines, path, row, "Path")
        positive = [name for name in CLASSES if row.label(name, CHEXPERT_VALUES, required=False) == 1]
        if len(positive) != 1:
            raise DataFormatError(f"{csv_path}, line {row.line}: positive for {positive or 'none'} of "
                                  f"{list(CLASSES)}; expected exactly one.")
        if data_root is not None and not (data_root / path).is_file():
            raise DataFormatError(f"{csv_path}, line {row.line}, column 'Path': image {data_root / path} not found; "
                                  "check --data-root.")
        rows.append({"Path": path, "label": positive[0]})
    return rows


def prepare(csv_path: Path, output_dir: Path, data_root: Path | None = None, overwrite: bool = False) -> None:
    with locked_outputs(output_dir, [csv_path], overwrite, [TABLE]):
        rows = labelled_images(csv_path, data_root)
        counts = {name: sum(row["label"] == name for row in rows) for name in CLASSES}
        if set(counts.values()) != {PER_CLASS}:
            raise DataFormatError(f"{csv_path}: expected {PER_CLASS} images per class, found {counts}; use the "
                                  "published 5x200 table.")
        write_tables(output_dir, {TABLE: (rows, ["Path", "label"])})


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    parse = parser(__doc__, prog)
    parse.add_argument("--data-root", type=Path, help="Folder the Path column is relative to (checked if given).")
    args = parse.parse_args(argv)
    prepare(args.input, args.output, args.data_root, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
