#!/usr/bin/env python
"""LC25000 (lung and colon histopathology) -> one test table per organ.

    python dataset_prep/lc25000.py --input lung_colon_image_set/ --output lc25000/

--input holds `lung_image_sets/{lung_aca,lung_n,lung_scc}/*.jpeg` and `colon_image_sets/{colon_aca,colon_n}/*.jpeg`
as released. Writes `lc25000_lung.csv` and `lc25000_colon.csv`: Path (relative to --input) and label (the class
folder), every image of the release.
"""

from collections.abc import Sequence
from pathlib import Path

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError
from dataset_prep._common import locked_outputs, parser, require_dir, write_tables


ORGANS = {
    "lung": ("lung_image_sets", ("lung_aca", "lung_n", "lung_scc")),
    "colon": ("colon_image_sets", ("colon_aca", "colon_n")),
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def table_name(organ: str) -> str:
    return f"lc25000_{organ}.csv"


def organ_rows(input_dir: Path, organ: str) -> list[dict]:
    """Every image of the organ's class folders, labelled with its folder."""
    folder, classes = ORGANS[organ]
    rows = []
    for label in classes:
        class_dir = require_dir(input_dir / folder / label, f"LC25000's {organ} class folder {label}")
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataFormatError(f"{class_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images; download the release "
                                  "again.")
        rows += [{"Path": str(image.relative_to(input_dir)), "label": label} for image in images]
    return rows


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    inputs = [input_dir / folder for folder, _ in ORGANS.values()]
    with locked_outputs(output_dir, inputs, overwrite, [table_name(organ) for organ in ORGANS]):
        tables = {table_name(organ): (organ_rows(input_dir, organ), ["Path", "label"]) for organ in ORGANS}
        write_tables(output_dir, tables)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    args = parser(__doc__, prog).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
