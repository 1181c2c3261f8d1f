#!/usr/bin/env python
"""MHIST (colorectal polyps) -> the test table.

    python dataset_prep/mhist.py --input mhist/ --output mhist/

--input holds `annotations.csv` (Image Name, Majority Vote Label HP or SSA, Number of Annotators who Selected SSA
(Out of 7), Partition train/test) and `images/`. Writes `mhist_test.csv`: Path, label (HP or SSA), split (the
official partition); the evaluation uses the test partition.
"""

from pathlib import Path

from dataset_prep._common import LayoutError, output_paths, parser, read_table, write_csv


LABELS = ("HP", "SSA")


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    (table_path,) = output_paths(output_dir, ["mhist_test.csv"], overwrite)
    annotations_path = input_dir / "annotations.csv"
    table = read_table(annotations_path, ["Image Name", "Majority Vote Label", "Partition"], "MHIST's annotations")
    rows = []
    for line, record in enumerate(table.to_dict("records"), start=2):
        label, partition = str(record["Majority Vote Label"]).strip(), str(record["Partition"]).strip()
        if label not in LABELS or partition not in ("train", "test"):
            raise LayoutError(f"{annotations_path}, line {line}: label {label!r} / partition {partition!r}.")
        image = input_dir / "images" / record["Image Name"]
        if not image.is_file():
            raise LayoutError(f"{annotations_path}, line {line}: image {image} not found.")
        rows.append({"Path": f"images/{record['Image Name']}", "label": label, "split": partition})
    write_csv(table_path, rows, ["Path", "label", "split"])


def main(argv=None) -> None:
    args = parser(__doc__).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    main()
