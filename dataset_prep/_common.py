"""Shared pieces of the dataset_prep command lines: arguments, checked reading of a release's files, outputs that
are checked before the work and committed together after it, splits."""

import argparse
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sklearn.model_selection import train_test_split

from ace_lora_hf.data import tables
from ace_lora_hf.data.csv_cells import write_header, write_rows
from ace_lora_hf.errors import DataFormatError, OutputPathError
from ace_lora_hf.data.tables import Row, shown
from ace_lora_hf.outputs.safe_outputs import (atomic_file, check_output_file, check_output_folder, ensure_folder,
                                              folder_lock)


Table = tuple[Sequence[Mapping[str, Any]], Sequence[str]]  # rows and column names of one prepared CSV
RELEASE_ADVICE = "point --input at the release as downloaded"


def parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="The dataset as downloaded (see above).")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the prepared CSV files.")
    parser.add_argument("--overwrite", action="store_true", help="Replace prepared files that already exist.")
    return parser


# ------------------------------------------------------------------------------------------------------ inputs


def require_file(path: Path, what: str) -> Path:
    return tables.require_file(path, what, RELEASE_ADVICE)


def read_rows(path: Path, columns: Sequence[str], what: str) -> Iterator[Row]:
    """The rows of a release's CSV table (plain or .gz), each holding `columns`."""
    return tables.read_rows(require_file(path, what), columns, what, "Use the release's table.")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataFormatError(f"{path} not found: expected {what}; {RELEASE_ADVICE}.")
    return path


def check_listed_once(first_lines: dict[Hashable, int], key: Hashable, row: Row, column: str) -> None:
    """Refuse an id that a table lists twice where each id is one output row."""
    first = first_lines.setdefault(key, row.line)
    if first != row.line:
        raise DataFormatError(f"{row.path}, line {row.line}, column {column!r}: {shown(key)} is listed again (first "
                              f"on line {first}); remove the repeated row.")


def check_consistent(earlier: dict[Hashable, tuple[dict[str, Any], int]], key: Hashable, values: dict[str, Any],
                     row: Row, what: str) -> None:
    """Merge an id listed again with the same values; refuse one listed again with a contradicting value."""
    first, first_line = earlier.setdefault(key, (values, row.line))
    for column, value in values.items():
        if first[column] != value:
            raise DataFormatError(f"{row.path}, line {row.line}, column {column!r} is {shown(value)} but line "
                                  f"{first_line} gives {shown(first[column])} for the same {what} {shown(key)}; "
                                  "remove the contradicting row.")


# ----------------------------------------------------------------------------------------------------- outputs


@contextmanager
def locked_outputs(output: Path, inputs: Iterable[Path], overwrite: bool, tables: Iterable[str],
                   folders: Mapping[str, str] = MappingProxyType({})) -> Iterator[None]:
    """Hold the --output folder for the run and check its outputs before any work.

    --output must be a folder; no output may be one of `inputs` (not even with --overwrite); existing outputs need
    --overwrite, and an output folder (name -> the glob of the files the script writes there) is replaced only when it
    holds nothing else. A failed run removes the --output folder again if the run created it and left it empty.
    """
    inputs = list(inputs)
    with folder_lock(output.resolve()):
        created = not output.exists()
        ensure_folder(output)
        try:
            for name in tables:
                check_output_file(output / name, inputs, overwrite)
            for name, written in folders.items():
                check_output_folder(output / name, inputs, overwrite)
                _check_only_ours(output / name, written)
            yield
        except BaseException:
            if created and output.is_dir() and not any(output.iterdir()):
                output.rmdir()
            raise


def _check_only_ours(folder: Path, written: str) -> None:
    """Refuse to replace a folder that holds anything but what this script writes there (`written`, a glob)."""
    if folder.is_dir():
        foreign = sorted(path.name for path in folder.iterdir() if not (path.is_file() and path.match(written)))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputPathError(f"{folder} holds {foreign[0]!r}{more}, which this script does not write there "
                                  f"({written}); --overwrite replaces the whole folder: move them, or choose another "
                                  "--output.")


def write_tables(output: Path, tables: Mapping[str, Table]) -> None:
    """Write every table under a temporary name and rename them into place together: a failure leaves none."""
    with ExitStack() as commit:
        for name, (rows, columns) in tables.items():
            file = commit.enter_context(atomic_file(output / name, newline="", encoding="utf-8"))
            write_header(file, columns)
            write_rows(file, columns, rows)
            file.flush()  # a full disk fails here, before any of the tables is renamed into place
    for name, (rows, _) in tables.items():
        print(f"wrote {output / name} ({len(rows)} rows)")


# ------------------------------------------------------------------------------------------------------ splits


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


def check_test_split_has_both_targets(splits: Mapping[Hashable, str], target_of: Mapping[Hashable, int],
                                      source: Path) -> None:
    """A zero-shot test split that holds one class only cannot be scored (AUC needs both)."""
    targets = {target_of[key] for key, split in splits.items() if split == "test"}
    if targets != {0, 1}:
        raise DataFormatError(f"{source}: the test split holds only Target {sorted(targets)}; the table needs "
                              "positive and negative images.")
