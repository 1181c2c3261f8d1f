"""Shared pieces of the dataset_prep command lines: arguments, checked reading of a release's files, outputs that
are checked before the work and committed together after it, splits."""

import argparse
import codecs
import csv
import gzip
import io
import math
import re
import zlib
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sklearn.model_selection import train_test_split

from ace_lora_hf.errors import DataFormatError
from ace_lora_hf.safe_outputs import atomic_file, check_output_file, check_output_folder, ensure_folder, folder_lock


Table = tuple[Sequence[Mapping[str, Any]], Sequence[str]]  # rows and column names of one prepared CSV
LONGEST_SHOWN_VALUE = 60  # a cell quoted in an error is cut here, so that the error stays one readable line


def parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="The dataset as downloaded (see above).")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the prepared CSV files.")
    parser.add_argument("--overwrite", action="store_true", help="Replace prepared files that already exist.")
    return parser


# ------------------------------------------------------------------------------------------------------ inputs


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{path} not found: expected {what}; point --input at the release as downloaded.")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataFormatError(f"{path} not found: expected {what}; point --input at the release as downloaded.")
    return path


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path` (plain or .gz); a file in another encoding is refused naming its first bad line."""
    return _decode(path, _read_bytes(path, what), is_table=False)


def read_rows(path: Path, columns: Sequence[str], what: str) -> Iterator["Row"]:
    """The data rows of a UTF-8 CSV table (plain or .gz), each holding `columns`, which are checked now.

    Rows are produced one at a time (the MIMIC tables have hundreds of thousands); blank lines are skipped.
    """
    text = _decode(path, _read_bytes(path, what), is_table=True)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = [name.strip() for name in _next_record(reader, path, 1) or []]
    if not header:
        raise DataFormatError(f"{path} is empty: expected {what} with columns {list(columns)}.")
    _check_header(path, header, columns)
    return _rows(reader, path, header, columns)


def _read_bytes(path: Path, what: str) -> bytes:
    """The content of `path`, decompressed if it ends in .gz, without the byte-order mark some editors add."""
    data = require_file(path, what).read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise DataFormatError(f"{path} is not a complete gzip file ({error}); download it again.") from None
    return data.removeprefix(codecs.BOM_UTF8)


def _decode(path: Path, data: bytes, is_table: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data, error.start, is_table) from None


def _not_utf8(path: Path, data: bytes, position: int, is_table: bool) -> DataFormatError:
    """The error for the first byte that is not UTF-8: its line and, in a table, its column and cell."""
    start, end = _line_bounds(data, position)
    line = data.count(b"\n", 0, position) + 1
    where = f"{path}, line {line}"
    if is_table:
        header = _csv_fields(data[slice(*_line_bounds(data, 0))])
        index = max(len(_csv_fields(data[start:position])) - 1, 0)
        cells = _csv_fields(data[start:end])
        column = header[index].strip() if index < len(header) else f"#{index + 1}"
        where += f", column {column!r} is {shown(cells[index] if index < len(cells) else '')}"
    return DataFormatError(f"{where}: not UTF-8 text (byte {data[position:position + 1]!r}, e.g. Latin-1); "
                           "save the file as UTF-8.")


def _line_bounds(data: bytes, position: int) -> tuple[int, int]:
    """Start and end of the line of `data` that holds `position`."""
    end = data.find(b"\n", position)
    return data.rfind(b"\n", 0, position) + 1, len(data) if end < 0 else end


def _csv_fields(line: bytes) -> list[str]:
    return next(csv.reader([line.rstrip(b"\r\n").decode("utf-8", "replace")]), [])


def _next_record(reader, path: Path, line: int) -> list[str] | None:
    """The record starting on `line`, or None at the end of the table."""
    try:
        return next(reader, None)
    except csv.Error as error:
        raise DataFormatError(f"{path}, line {line}: not valid CSV ({error}); fix the quoting of the record that "
                              "starts there.") from None


def _check_header(path: Path, header: list[str], columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in header]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {header}. Use the "
                              "release's table.")
    repeated = [column for column in columns if header.count(column) > 1]
    if repeated:
        raise DataFormatError(f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once in the "
                              "header; keep one of each.")


def _rows(reader, path: Path, header: list[str], columns: Sequence[str]) -> Iterator["Row"]:
    positions = {column: header.index(column) for column in columns}
    while True:
        line = reader.line_num + 1  # where the record starts: a quoted cell may span lines
        record = _next_record(reader, path, line)
        if record is None:
            return
        if not any(cell.strip() for cell in record):
            continue
        if len(record) > len(header):
            raise DataFormatError(f"{path}, line {line}: {len(record)} cells but the header names {len(header)} "
                                  "columns; remove the extra cells or quote a value holding a comma.")
        yield Row(path, line, {column: record[i] if i < len(record) else "" for column, i in positions.items()})


def shown(value: Any) -> str:
    """A cell as an error quotes it: `empty`, or its repr cut to a readable length."""
    if value is None or value == "":
        return "empty"
    text = repr(value)
    return text if len(text) <= LONGEST_SHOWN_VALUE else text[: LONGEST_SHOWN_VALUE - 4] + "...'"


def is_plain_file_name(value: str) -> bool:
    """A name of one file inside a folder: joined to that folder, it cannot lead anywhere else."""
    return value not in ("", ".", "..") and not any(character in value for character in "/\\:\0")


def is_relative_path(value: str) -> bool:
    """A relative path that stays below the folder it is joined to (no root, drive or `..` part)."""
    parts = value.replace("\\", "/").split("/")
    return value != "" and parts[0] != "" and ":" not in parts[0] and ".." not in parts and "\0" not in value


@dataclass(frozen=True, slots=True)
class Row:
    """One data row of a release's table. Its readers check a cell and, when it is wrong, raise an error naming the
    file, line, column and value."""

    path: Path
    line: int
    cells: dict[str, str]

    def error(self, column: str, expected: str) -> DataFormatError:
        return DataFormatError(f"{self.path}, line {self.line}, column {column!r} is "
                               f"{shown(self.cells[column].strip())}; expected {expected}.")

    def text(self, column: str, expected: str) -> str:
        value = self.cells[column].strip()
        if not value:
            raise self.error(column, expected)
        return value

    def label(self, column: str, allowed: Sequence[int], required: bool = True) -> int | None:
        """An integer label among `allowed` (written `1` or `1.0`); `None` for an empty cell when not required."""
        value = self.cells[column].strip()
        if not value and not required:
            return None
        try:
            number = float(value)
        except ValueError:
            number = None
        if number not in allowed:
            raise self.error(column, " or ".join(map(str, allowed)) + ("" if required else " or empty"))
        return int(number)

    def number(self, column: str, positive: bool = False) -> float:
        """A finite number, at least 0 (above 0 if `positive`)."""
        value = self.cells[column].strip()
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not math.isfinite(number) or not (number > 0 if positive else number >= 0):
            raise self.error(column, "a number above 0" if positive else "a number, 0 or more")
        return number

    def whole_number(self, column: str) -> int:
        value = self.cells[column].strip()
        if not re.fullmatch(r"[0-9]+", value):
            raise self.error(column, "a whole number")
        return int(value)

    def one_of(self, column: str, allowed: Sequence[str]) -> str:
        value = self.cells[column].strip()
        if value not in allowed:
            raise self.error(column, " or ".join(map(repr, allowed)))
        return value

    def file_name(self, column: str) -> str:
        """A cell that names one file: no folder part, so that it cannot point outside its folder."""
        value = self.cells[column].strip()
        if not is_plain_file_name(value):
            raise self.error(column, "a file name without '/', '\\', ':' or '..' (it must stay inside its folder)")
        return value

    def relative_path(self, column: str) -> str:
        """A cell holding a path that stays below the data root."""
        value = self.cells[column].strip()
        if not is_relative_path(value):
            raise self.error(column, "a relative path without a leading '/', a drive or '..' (it must stay below "
                                     "the data root)")
        return value


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
                   folders: Iterable[str] = ()) -> Iterator[None]:
    """Hold the --output folder for the run and check its outputs before any work.

    --output must be a folder; no output may be one of `inputs` (not even with --overwrite); existing outputs need
    --overwrite. A failed run removes the --output folder again if the run created it and left it empty.
    """
    inputs = list(inputs)
    with folder_lock(output.resolve()):
        created = not output.exists()
        ensure_folder(output)
        try:
            for name in tables:
                check_output_file(output / name, inputs, overwrite)
            for name in folders:
                check_output_folder(output / name, inputs, overwrite)
            yield
        except BaseException:
            if created and output.is_dir() and not any(output.iterdir()):
                output.rmdir()
            raise


def write_tables(output: Path, tables: Mapping[str, Table]) -> None:
    """Write every table under a temporary name and rename them into place together: a failure leaves none."""
    with ExitStack() as commit:
        for name, (rows, columns) in tables.items():
            file = commit.enter_context(atomic_file(output / name, newline="", encoding="utf-8"))
            writer = csv.DictWriter(file, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
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
