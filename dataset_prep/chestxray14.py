#!/usr/bin/env python
"""NIH ChestX-ray14 -> the multi-label test table of the zero-shot evaluation.

    python dataset_prep/chestxray14.py --input ChestX-ray14/ --output nih14/ [--fraction 0.2]

--input holds `Data_Entry_2017_v2020.csv` (Image Index, Finding Labels as "A|B" or "No Finding", ...),
`test_list.txt` (one image name a line) and the images under `images/` (or the release's `images_NNN/images/`).
Writes `chestxray14_test.csv`: Path, the 14 findings one-hot, and the subgroup columns sex (M/F), age (years),
age_group (0-17, 18-39, 40-59, 60-69, 70+; empty for the release's few impossible ages) and view (PA/AP), for the
first --fraction of the official test list in its order (0.2 by default, as the authors evaluated).
"""

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError, InvalidArgumentError
from ace_lora_hf.data.tables import Row, is_plain_file_name, read_text
from dataset_prep._common import check_consistent, locked_outputs, parser, read_rows, write_tables


FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
# The data-entry columns kept for subgroup reports (ace-lora-evaluate --subgroup-columns sex,age_group,view).
DEMOGRAPHICS = ("Patient Age", "Patient Gender", "View Position")
SUBGROUP_COLUMNS = ("sex", "age", "age_group", "view")
AGE_GROUPS = ((18, "0-17"), (40, "18-39"), (60, "40-59"), (70, "60-69"), (121, "70+"))
ENTRIES_FILE, TEST_LIST_FILE = "Data_Entry_2017_v2020.csv", "test_list.txt"
TABLE = "chestxray14_test.csv"


def image_locations(input_dir: Path) -> dict[str, str]:
    """Image name -> path relative to --input, over `images/` and the release's `images_NNN/images/` folders."""
    folders = [input_dir / "images", *sorted(input_dir.glob("images_*/images"))]
    locations = {}
    for folder in folders:
        if folder.is_dir():
            locations.update({p.name: str(p.relative_to(input_dir)) for p in folder.glob("*.png")})
    return locations


def findings_of(row: Row) -> frozenset[str]:
    labels = frozenset(row.text("Finding Labels", f"{NO_FINDING!r} or findings joined by '|'").split("|"))
    unknown = sorted(labels - set(FINDINGS) - {NO_FINDING})
    if unknown:
        raise row.error("Finding Labels", f"{NO_FINDING!r} or findings among {', '.join(FINDINGS)} joined by '|' "
                                          f"({unknown[0]!r} is none of them)")
    return labels - {NO_FINDING}


def age_group(age: int) -> str:
    """The age band of `age` years ("" above 120: the release has a few typing errors such as 414)."""
    return next((band for limit, band in AGE_GROUPS if age < limit), "")


def subgroups_of(row: Row) -> dict[str, str | int]:
    age = row.whole_number("Patient Age")
    return {"sex": row.one_of("Patient Gender", ("M", "F")), "age": age, "age_group": age_group(age),
            "view": row.one_of("View Position", ("PA", "AP"))}


def findings_by_image(entries_path: Path) -> dict[str, tuple[frozenset[str], dict]]:
    """Image name -> its findings and subgroup columns, for every row of the data-entry table."""
    findings, first_rows = {}, {}
    for row in tqdm(read_rows(entries_path, ["Image Index", "Finding Labels", *DEMOGRAPHICS],
                              "the NIH data-entry table"), desc="rows"):
        name, labels, subgroups = row.file_name("Image Index"), findings_of(row), subgroups_of(row)
        check_consistent(first_rows, name, {"Finding Labels": "|".join(sorted(labels)) or NO_FINDING, **subgroups},
                         row, "image")
        findings[name] = labels, subgroups
    return findings


def official_test_names(test_list_path: Path) -> list[tuple[int, str]]:
    """(line, image name) of the official test list, in its order; each name a plain file name listed once."""
    names, first_lines = [], {}
    for line, text in enumerate(read_text(test_list_path, "the official test list").splitlines(), start=1):
        name = text.strip()
        if not name:
            continue
        if not is_plain_file_name(name):
            raise DataFormatError(f"{test_list_path}, line {line}: {name!r} is not a plain image file name (no '/', "
                                  "'\\', ':' or '..'); use the release's list.")
        if first_lines.setdefault(name, line) != line:
            raise DataFormatError(f"{test_list_path}, line {line}: {name!r} is listed again (first on line "
                                  f"{first_lines[name]}); remove the repeated line.")
        names.append((line, name))
    return names


def selected_names(test_list_path: Path, fraction: float) -> list[tuple[int, str]]:
    names = official_test_names(test_list_path)
    selected = names[: int(len(names) * fraction)]
    if not selected:
        raise InvalidArgumentError(f"--fraction {fraction} of the {len(names)} names in {test_list_path} selects no "
                                   "image; raise --fraction.")
    return selected


def test_rows(input_dir: Path, selected: list[tuple[int, str]],
              findings: dict[str, tuple[frozenset[str], dict]]) -> list[dict]:
    """Path, the one-hot findings and the subgroup columns of each selected image, which must have a data-entry row
    and a file."""
    test_list_path, locations = input_dir / TEST_LIST_FILE, image_locations(input_dir)
    rows = []
    for line, name in tqdm(selected, desc="images"):
        if name not in findings:
            raise DataFormatError(f"{test_list_path}, line {line}: {name!r} has no row in {ENTRIES_FILE}; use the "
                                  "release's two files together.")
        if name not in locations:
            raise DataFormatError(f"{test_list_path}, line {line}: image {name!r} not found under "
                                  f"{input_dir / 'images'} (or images_NNN/images); download every image archive.")
        labels, subgroups = findings[name]
        rows.append({"Path": locations[name], **{finding: int(finding in labels) for finding in FINDINGS}, **subgroups})
    return rows


def prepare(input_dir: Path, output_dir: Path, fraction: float = 0.2, overwrite: bool = False) -> None:
    if not 0 < fraction <= 1:
        raise InvalidArgumentError(f"--fraction must be in (0, 1], got {fraction}.")
    entries_path, test_list_path = input_dir / ENTRIES_FILE, input_dir / TEST_LIST_FILE
    with locked_outputs(output_dir, [entries_path, test_list_path], overwrite, [TABLE]):
        findings = findings_by_image(entries_path)
        rows = test_rows(input_dir, selected_names(test_list_path, fraction), findings)
        write_tables(output_dir, {TABLE: (rows, ["Path", *FINDINGS, *SUBGROUP_COLUMNS])})


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    parse = parser(__doc__, prog)
    parse.add_argument("--fraction", type=float, default=0.2, help="Share of the test list, from its start.")
    args = parse.parse_args(argv)
    prepare(args.input, args.output, args.fraction, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
