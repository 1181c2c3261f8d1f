#!/usr/bin/env python
"""CheXpert 5x200 -> a checked, normalised test table.

    python dataset_prep/chexpert_5x200.py --input chexpert_5x200.csv --output chexpert5x200/ [--data-root DIR]

--input is the 5x200 CSV used by GLoRIA/MGCA/BiomedCLIP: a `Path` column and CheXpert's label columns, each row
positive (1) for exactly one of Atelectasis, Cardiomegaly, Consolidation, Edema and Pleural Effusion, 200 rows per
class. Writes `chexpert_5x200.csv`: Path and label (the class name). With --data-root, every image is checked to
exist under it.
"""

from pathlib import Path

from dataset_prep._common import LayoutError, output_paths, parser, read_table, write_csv


CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PER_CLASS = 200


def prepare(csv_path: Path, output_dir: Path, data_root: Path | None = None, overwrite: bool = False) -> None:
    (table_path,) = output_paths(output_dir, ["chexpert_5x200.csv"], overwrite)
    table = read_table(csv_path, ["Path", *CLASSES], "the CheXpert 5x200 table")
    rows = []
    for line, record in enumerate(table.to_dict("records"), start=2):
        positive = [name for name in CLASSES if record[name] == 1]
        if len(positive) != 1:
            raise LayoutError(f"{csv_path}, line {line}: positive for {positive or 'none'} of {list(CLASSES)}; "
                              "expected exactly one.")
        if data_root is not None and not (data_root / record["Path"]).is_file():
            raise LayoutError(f"{csv_path}, line {line}: image {data_root / record['Path']} not found.")
        rows.append({"Path": record["Path"], "label": positive[0]})
    counts = {name: sum(row["label"] == name for row in rows) for name in CLASSES}
    if set(counts.values()) != {PER_CLASS}:
        raise LayoutError(f"{csv_path}: expected {PER_CLASS} images per class, found {counts}.")
    write_csv(table_path, rows, ["Path", "label"])


def main(argv=None) -> None:
    parse = parser(__doc__)
    parse.add_argument("--data-root", type=Path, help="Folder the Path column is relative to (checked if given).")
    args = parse.parse_args(argv)
    prepare(args.input, args.output, args.data_root, args.overwrite)


if __name__ == "__main__":
    main()
