#!/usr/bin/env python
"""MIMIC-CXR-JPG + MIMIC-CXR reports -> the training table of examples/pretrain.py.

    python dataset_prep/mimic_cxr.py --input mimic-cxr-jpg/2.1.0/ --reports mimic-cxr-reports/ --output mimic/

--input holds `mimic-cxr-2.0.0-metadata.csv(.gz)`, `mimic-cxr-2.0.0-split.csv(.gz)`,
`mimic-cxr-2.0.0-chexpert.csv(.gz)` and `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`; --reports holds MIMIC-CXR's
`files/pXX/pSUBJECT/sSTUDY.txt` (default: --input). Frontal views only (ViewPosition PA or AP). Writes
`mimic_cxr.csv`: image, report (the FINDINGS and IMPRESSION sections, or the whole report when it has neither),
split (the official train/validate/test), subject_id (the patient: `ace-lora-prepare training-set --patient-column
subject_id` keeps each patient in one split) and the 14 CheXpert labels (1, 0, -1 uncertain, empty). Studies without
a report file are left out and counted. A split table that puts one patient in two splits is refused.
"""

import re
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.errors import DataFormatError
from ace_lora_hf.data.splits import check_patient_disjoint
from ace_lora_hf.data.tables import read_text
from dataset_prep._common import check_consistent, locked_outputs, parser, read_rows, require_dir, write_tables


CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
CHEXPERT_VALUES = (1, 0, -1)  # positive, negative, uncertain; empty is unmentioned
SPLITS = ("train", "validate", "test")
FRONTAL_VIEWS = ("PA", "AP")
SECTION_HEADER = re.compile(r"^\s*([A-Z][A-Z &/]+):", re.MULTILINE)
KEPT_SECTIONS = ("FINDINGS", "IMPRESSION")
TABLE = "mimic_cxr.csv"
METADATA, SPLIT, CHEXPERT = (f"mimic-cxr-2.0.0-{name}.csv" for name in ("metadata", "split", "chexpert"))


def find_table(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFormatError(f"{folder / name}(.gz) not found: expected MIMIC-CXR-JPG's {name}; point --input at the "
                          "release's version folder.")


def report_text(raw: str) -> str:
    """FINDINGS and IMPRESSION of a free-text report, whitespace collapsed; the whole text when neither exists."""
    headers = list(SECTION_HEADER.finditer(raw))
    sections = {}
    for header, following in zip(headers, headers[1:] + [None]):
        end = following.start() if following else len(raw)
        sections[header.group(1).strip()] = raw[header.end() : end]
    kept = [sections[name] for name in KEPT_SECTIONS if sections.get(name, "").strip()]
    text = " ".join(kept) if kept else re.sub(r"^\s*FINAL REPORT\s*", "", raw)
    return " ".join(text.split())


def read_report(path: Path) -> str:
    """The kept text of a report file; empty when the study has none."""
    return report_text(read_text(path, "a report")) if path.is_file() else ""


def study_folder(subject_id: int, study_id: int) -> str:
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}"


def frontal_images(metadata_path: Path) -> list[tuple[int, str, int, int]]:
    """(line, dicom_id, subject_id, study_id) of each frontal view, in the table's order."""
    frontal, first_rows = [], {}
    for row in tqdm(read_rows(metadata_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                              "MIMIC-CXR-JPG's metadata"), desc="metadata"):
        dicom_id = row.file_name("dicom_id")
        image = {"subject_id": row.whole_number("subject_id"), "study_id": row.whole_number("study_id"),
                 "ViewPosition": row.cells["ViewPosition"].strip()}
        check_consistent(first_rows, dicom_id, image, row, "dicom_id")
        if image["ViewPosition"] in FRONTAL_VIEWS and first_rows[dicom_id][1] == row.line:  # a repeat adds nothing
            frontal.append((row.line, dicom_id, image["subject_id"], image["study_id"]))
    return frontal


def official_splits(split_path: Path) -> dict[str, str]:
    """dicom_id -> train, validate or test; every patient (subject_id) in one split only."""
    first_rows = {}

    def patient_splits():
        for row in tqdm(read_rows(split_path, ["dicom_id", "subject_id", "split"], "MIMIC-CXR-JPG's split table"),
                        desc="splits"):
            split = row.one_of("split", SPLITS)
            check_consistent(first_rows, row.file_name("dicom_id"), {"split": split}, row, "dicom_id")
            yield row.whole_number("subject_id"), split, f"line {row.line}"

    check_patient_disjoint(patient_splits(), str(split_path))
    return {dicom_id: values["split"] for dicom_id, (values, _) in first_rows.items()}


def study_labels(chexpert_path: Path) -> dict[tuple[int, int], dict[str, int | None]]:
    """(subject_id, study_id) -> the 14 CheXpert labels (1, 0, -1, or None when unmentioned)."""
    first_rows = {}
    for row in tqdm(read_rows(chexpert_path, ["subject_id", "study_id", *CHEXPERT_LABELS],
                              "MIMIC-CXR-JPG's CheXpert labels"), desc="labels"):
        labels = {name: row.label(name, CHEXPERT_VALUES, required=False) for name in CHEXPERT_LABELS}
        check_consistent(first_rows, (row.whole_number("subject_id"), row.whole_number("study_id")), labels, row,
                         "(subject_id, study_id)")
    return {study: labels for study, (labels, _) in first_rows.items()}


def training_rows(metadata_path: Path, split_path: Path, chexpert_path: Path, reports_dir: Path) -> list[dict]:
    """One row per frontal image whose study has a report; the others are counted and left out."""
    frontal, split_of, labels_of = (frontal_images(metadata_path), official_splits(split_path),
                                    study_labels(chexpert_path))
    rows, missing_reports, reports = [], 0, {}
    for line, dicom_id, subject_id, study_id in tqdm(frontal, desc="images"):
        folder = study_folder(subject_id, study_id)
        if study_id not in reports:
            reports[study_id] = read_report(reports_dir / f"{folder}.txt")
        if not reports[study_id]:
            missing_reports += 1
            continue
        if dicom_id not in split_of:
            raise DataFormatError(f"{metadata_path}, line {line}: image {dicom_id!r} has no row in {split_path}; use "
                                  "the release's tables together.")
        labels = labels_of.get((subject_id, study_id), {})
        rows.append({"image": f"{folder}/{dicom_id}.jpg", "report": reports[study_id], "split": split_of[dicom_id],
                     "subject_id": subject_id,
                     **{name: "" if labels.get(name) is None else labels[name] for name in CHEXPERT_LABELS}})
    if missing_reports:
        print(f"left out {missing_reports} image(s) whose study has no (or an empty) report in {reports_dir}")
    return rows


def prepare(input_dir: Path, reports_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    tables = [find_table(input_dir, name) for name in (METADATA, SPLIT, CHEXPERT)]
    with locked_outputs(output_dir, tables, overwrite, [TABLE]):
        require_dir(input_dir / "files", "MIMIC-CXR-JPG's files/ folder")
        rows = training_rows(*tables, reports_dir)
        write_tables(output_dir, {TABLE: (rows, ["image", "report", "split", "subject_id", *CHEXPERT_LABELS])})


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    parse = parser(__doc__, prog)
    parse.add_argument("--reports", type=Path, help="MIMIC-CXR's report folder (default: --input).")
    args = parse.parse_args(argv)
    prepare(args.input, args.reports or args.input, args.output, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
