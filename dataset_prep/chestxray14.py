#!/usr/bin/env python
"""NIH ChestX-ray14 -> the multi-label test table of the zero-shot evaluation.

    python dataset_prep/chestxray14.py --input ChestX-ray14/ --output nih14/ [--fraction 0.2]

--input holds `Data_Entry_2017_v2020.csv` (Image Index, Finding Labels as "A|B" or "No Finding", ...),
`test_list.txt` (one image name a line) and the images under `images/` (or the release's `images_NNN/images/`).
Writes `chestxray14_test.csv`: Path and the 14 findings one-hot, for the first --fraction of the official test
list in its order (0.2 by default, as the authors evaluated).
"""

from pathlib import Path

from tqdm import tqdm

from dataset_prep._common import LayoutError, output_paths, parser, read_table, require_file, write_csv


FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)


def image_locations(input_dir: Path) -> dict[str, str]:
    """Image name -> path relative to --input, over `images/` and the release's `images_NNN/images/` folders."""
    folders = [input_dir / "images", *sorted(input_dir.glob("images_*/images"))]
    locations = {}
    for folder in folders:
        if folder.is_dir():
            locations.update({p.name: str(p.relative_to(input_dir)) for p in folder.glob("*.png")})
    return locations


def prepare(input_dir: Path, output_dir: Path, fraction: float = 0.2, overwrite: bool = False) -> None:
    if not 0 < fraction <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], got {fraction}.")
    (table_path,) = output_paths(output_dir, ["chestxray14_test.csv"], overwrite)
    entries = read_table(input_dir / "Data_Entry_2017_v2020.csv", ["Image Index", "Finding Labels"],
                         "the NIH data-entry table")
    findings_of = dict(zip(entries["Image Index"], entries["Finding Labels"]))
    test_list = require_file(input_dir / "test_list.txt", "the official test list").read_text().split()
    selected = test_list[: int(len(test_list) * fraction)]
    locations = image_locations(input_dir)
    rows = []
    for name in tqdm(selected, desc="images"):
        if name not in findings_of:
            raise LayoutError(f"{name} of test_list.txt has no row in Data_Entry_2017_v2020.csv.")
        if name not in locations:
            raise LayoutError(f"{name} not found under {input_dir / 'images'} (or images_NNN/images).")
        labels = set(findings_of[name].split("|")) - {"No Finding"}
        unknown = labels - set(FINDINGS)
        if unknown:
            raise LayoutError(f"{name}: unknown finding(s) {sorted(unknown)} in Data_Entry_2017_v2020.csv.")
        rows.append({"Path": locations[name], **{finding: int(finding in labels) for finding in FINDINGS}})
    write_csv(table_path, rows, ["Path", *FINDINGS])


def main(argv=None) -> None:
    parse = parser(__doc__)
    parse.add_argument("--fraction", type=float, default=0.2, help="Share of the test list, from its start.")
    args = parse.parse_args(argv)
    prepare(args.input, args.output, args.fraction, args.overwrite)


if __name__ == "__main__":
    main()
