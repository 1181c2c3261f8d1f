"""Shared pieces of the dataset_prep command lines: arguments, input checks, splits, safe CSV output."""

import argparse
import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split


class LayoutError(SystemExit):
    """The input folder or file is not laid out as the dataset's official release."""


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="The dataset as downloaded (see above).")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the prepared CSV files.")
    parser.add_argument("--overwrite", action="store_true", help="Replace prepared files that already exist.")
    return parser


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LayoutError(f"{path} not found: expected {what}.")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise LayoutError(f"{path} not found: expected {what}.")
    return path


def read_table(path: Path, columns: Sequence[str], what: str, **read_csv_kwargs) -> pd.DataFrame:
    """Read a CSV (plain or .gz) and check that it has `columns`."""
    require_file(path, what)
    try:
        table = pd.read_csv(path, **read_csv_kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError) as error:
        raise LayoutError(f"{path}: cannot be read as CSV ({error}).") from error
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise LayoutError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {list(table.columns)}.")
    return table


def output_paths(output: Path, names: Iterable[str], overwrite: bool) -> list[Path]:
    """The output files, refusing to replace existing ones unless `overwrite`."""
    paths = [output / name for name in names]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise SystemExit(f"{', '.join(existing)} already exist(s); pass --overwrite to replace.")
    output.mkdir(parents=True, exist_ok=True)
    return paths


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write through a temporary file, so an interrupted run never leaves a half-written table."""
    staging = path.with_name(path.name + ".tmp")
    with staging.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(path)
    print(f"wrote {path} ({len(rows)} rows)")


def split_ids(ids: Iterable, fractions: dict[str, float], seed: int) -> dict:
    """Give each id a split name, e.g. `{"train": 0.7, "valid": 0.15, "test": 0.15}`.

    Split sizes are `round(fraction * len(ids))` (the last split takes the rest); the splits are peeled off in
    order, each with sklearn's `train_test_split(..., random_state=seed)` over the sorted ids that remain.
    """
    remaining = sorted(ids)
    total, names = len(remaining), list(fractions)
    assignment = {}
    for name in names[:-1]:
        size = round(fractions[name] * total)
        if size >= len(remaining):
            taken, remaining = remaining, []
        elif size == 0:
            taken = []
        else:
            taken, remaining = train_test_split(remaining, train_size=size, random_state=seed)
        assignment.update(dict.fromkeys(taken, name))
    assignment.update(dict.fromkeys(remaining, names[-1]))
    return assignment
