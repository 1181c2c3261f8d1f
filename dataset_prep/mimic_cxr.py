#!/usr/bin/env python
"""MIMIC-CXR-JPG + MIMIC-CXR reports -> the training table of examples/pretrain.py.

    python dataset_prep/mimic_cxr.py --input mimic-cxr-jpg/2.1.0/ --reports mimic-cxr-reports/ --output mimic/

--input holds `mimic-cxr-2.0.0-metadata.csv(.gz)`, `mimic-cxr-2.0.0-split.csv(.gz)`,
`mimic-cxr-2.0.0-chexpert.csv(.gz)` and `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`; --reports holds MIMIC-CXR's
`files/pXX/pSUBJECT/sSTUDY.txt` (default: --input). Frontal views only (ViewPosition PA or AP). Writes
`mimic_cxr.csv`: image, report (the FINDINGS and IMPRESSION sections, or the whole report when it has neither),
split (the official train/validate/test) and the 14 CheXpert labels (1, 0, -1 uncertain, empty). Studies without
a report file are left out and counted.
"""

import re
from pathlib import Path

from tqdm import tqdm

from dataset_prep._common import LayoutError, output_paths, parser, read_table, require_dir, write_csv


CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
FRONTAL_VIEWS = ("PA", "AP")
SECTION_HEADER = re.compile(r"^\s*([A-Z][A-Z &/]+):", re.MULTILINE)
KEPT_SECTIONS = ("FINDINGS", "IMPRESSION")


def find_table(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise LayoutError(f"{folder / name}(.gz) not found: expected MIMIC-CXR-JPG's {name}.")


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


def study_folder(subject_id: int, study_id: int) -> str:
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}"


def prepare(input_dir: Path, reports_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    (table_path,) = output_paths(output_dir, ["mimic_cxr.csv"], overwrite)
    require_dir(input_dir / "files", "MIMIC-CXR-JPG's files/ folder")
    metadata = read_table(find_table(input_dir, "mimic-cxr-2.0.0-metadata.csv"),
                          ["dicom_id", "subject_id", "study_id", "ViewPosition"], "MIMIC-CXR-JPG's metadata")
    splits = read_table(find_table(input_dir, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "split"],
                        "MIMIC-CXR-JPG's split table")
    chexpert = read_table(find_table(input_dir, "mimic-cxr-2.0.0-chexpert.csv"),
                          ["subject_id", "study_id", *CHEXPERT_LABELS], "MIMIC-CXR-JPG's CheXpert labels")
    split_of = dict(zip(splits["dicom_id"], splits["split"]))
    labels_of = {(row.subject_id, row.study_id): row for row in chexpert.itertuples(index=False)}
    label_positions = {name: chexpert.columns.get_loc(name) for name in CHEXPERT_LABELS}
    frontal = metadata[metadata["ViewPosition"].isin(FRONTAL_VIEWS)]
    rows, missing_reports, reports = [], 0, {}
    for image in tqdm(frontal.itertuples(index=False), total=len(frontal), desc="images"):
        folder = study_folder(image.subject_id, image.study_id)
        if image.study_id not in reports:
            report_path = reports_dir / f"{folder}.txt"
            reports[image.study_id] = report_text(report_path.read_text()) if report_path.is_file() else ""
        if not reports[image.study_id]:
            missing_reports += 1
            continue
        if image.dicom_id not in split_of:
            raise LayoutError(f"image {image.dicom_id} of the metadata has no row in the split table.")
        labels = labels_of.get((image.subject_id, image.study_id))
        row = {"image": f"{folder}/{image.dicom_id}.jpg", "report": reports[image.study_id],
               "split": split_of[image.dicom_id]}
        for name, position in label_positions.items():
            value = None if labels is None else labels[position]
            row[name] = "" if value is None or value != value else int(value)
        rows.append(row)
    if missing_reports:
        print(f"left out {missing_reports} image(s) whose study has no (or an empty) report in {reports_dir}")
    write_csv(table_path, rows, ["image", "report", "split", *CHEXPERT_LABELS])


def main(argv=None) -> None:
    parse = parser(__doc__)
    parse.add_argument("--reports", type=Path, help="MIMIC-CXR's report folder (default: --input).")
    args = parse.parse_args(argv)
    prepare(args.input, args.reports or args.input, args.output, args.overwrite)


if __name__ == "__main__":
    main()
