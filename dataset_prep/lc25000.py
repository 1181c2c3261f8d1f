#!/usr/bin/env python
"""LC25000 (lung and colon histopathology) -> one test table per organ.

    python dataset_prep/lc25000.py --input lung_colon_image_set/ --output lc25000/

--input holds `lung_image_sets/{lung_aca,lung_n,lung_scc}/*.jpeg` and `colon_image_sets/{colon_aca,colon_n}/*.jpeg`
as released. Writes `lc25000_lung.csv` and `lc25000_colon.csv`: Path (relative to --input) and label (the class
folder), every image of the release.
"""

from pathlib import Path

from dataset_prep._common import LayoutError, output_paths, parser, require_dir, write_csv


ORGANS = {
    "lung": ("lung_image_sets", ("lung_aca", "lung_n", "lung_scc")),
    "colon": ("colon_image_sets", ("colon_aca", "colon_n")),
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def prepare(input_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    paths = output_paths(output_dir, [f"lc25000_{organ}.csv" for organ in ORGANS], overwrite)
    for path, (organ, (folder, classes)) in zip(paths, ORGANS.items()):
        rows = []
        for label in classes:
            class_dir = require_dir(input_dir / folder / label, f"LC25000's {organ} class folder {label}")
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise LayoutError(f"{class_dir} holds no images.")
            rows += [{"Path": str(image.relative_to(input_dir)), "label": label} for image in images]
        write_csv(path, rows, ["Path", "label"])


def main(argv=None) -> None:
    args = parser(__doc__).parse_args(argv)
    prepare(args.input, args.output, args.overwrite)


if __name__ == "__main__":
    main()
