"""Reading tables without surprises: UTF-8 text (plain or gzip), CSV and JSON Lines rows, every problem a one-line
`DataFormatError` that names the file, the line, the column and the value, and says what to fix.

One reader serves the datasets' own releases (`dataset_prep`) and the tables this package prepares and reads back
(training pairs, evaluation and retrieval tables). Rows come one at a time: the MIMIC tables have hundreds of
thousands.
"""

import codecs
import csv
import gzip
import hashlib
import json
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataFormatError
from .csv_cells import restored


LONGEST_SHOWN_VALUE = 60  # a cell quoted in an error is cut here, so that the error stays one readable line


def require_file(path: Path, what: str, advice: str = "") -> Path:
    if not path.is_file():
        raise DataFormatError(f"{path} not found: expected {what}{'; ' + advice if advice else ''}.")
    return path


def file_sha256(path: Path) -> str:
    """The hash of a data file: a checkpoint continues, and a prepared set records, only the same data."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path` (plain or .gz); a file in another encoding is refused naming its first bad line."""
    return _decode(path, _read_bytes(path, what), is_table=False)


def read_table_rows(path: Path, columns: Sequence[str], what: str, advice: str = "") -> Iterator["Row"]:
    """The rows of a CSV or JSON Lines table (`.csv`, `.jsonl`, either optionally `.gz`), each holding `columns`.

    `advice` ends the message of a missing column (e.g. which option names the column)."""
    suffix = Path(path.name.removesuffix(".gz")).suffix.lower()
    if suffix == ".csv":
        return read_rows(path, columns, what, advice)
    if suffix == ".jsonl":
        return read_json_lines(path, columns, what, advice)
    raise DataFormatError(f"{path}: expected a .csv or .jsonl table (optionally .gz), not {suffix or 'no suffix'}.")


def read_rows(path: Path, columns: Sequence[str], what: str, advice: str = "") -> Iterator["Row"]:
    """The data rows of a UTF-8 CSV table (plain or .gz), each holding `columns`, which are checked now; blank lines
    are skipped. The file is read as it is iterated, so memory does not grow with the table (a release's table can
    be hundreds of MB)."""
    rows = _streamed_rows(require_file(path, what), columns, what, advice)
    next(rows)  # reads and checks the header now
    return rows


def _streamed_rows(path: Path, columns: Sequence[str], what: str, advice: str) -> Iterator["Row | None"]:
    """None once the header is checked, then the rows."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, strict=True)
            header = [restored(name.strip()) for name in _next_record(reader, path, 1) or []]
            if not header:
                raise DataFormatError(f"{path} is empty: expected {what} with columns {list(columns)}.")
            _check_header(path, header, columns, advice)
            yield None
            yield from _rows(reader, path, header, columns)
    except UnicodeDecodeError:
        # Found in the middle of a block: the whole file, read again, says where (only on this error's path).
        _decode(path, _read_bytes(path, what), is_table=True)
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataFormatError(f"{path} is not a complete gzip file ({error}); download it again.") from None


def read_json_lines(path: Path, columns: Sequence[str], what: str, advice: str = "") -> Iterator["Row"]:
    """The rows of a JSON Lines table (one object per line) as CSV rows are read: its `columns` as text (numbers
    written as they are, null as empty), checked the same way."""
    # Split on newlines only: JSON strings may hold U+2028, which str.splitlines() would also split on.
    for line, text in enumerate(read_text(path, what).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}, line {line}: not JSON ({error.msg}); write one JSON object per line.") \
                from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}, line {line} is {shown(record)}; write one JSON object per line.")
        missing = [column for column in columns if column not in record]
        if missing:
            raise DataFormatError(f"{path}, line {line}: no {', '.join(map(repr, missing))} field; found "
                                  f"{sorted(record)}.{' ' + advice if advice else ''}")
        yield Row(path, line, {column: _cell(path, line, column, record[column]) for column in columns})


def _cell(path: Path, line: int, column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataFormatError(f"{path}, line {line}, column {column!r} is {shown(value)}; expected text or a number.")
    return value


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


def _check_header(path: Path, header: list[str], columns: Sequence[str], advice: str) -> None:
    missing = [column for column in columns if column not in header]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {header}."
                              f"{' ' + advice if advice else ''}")
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
        cells = {column: restored(record[i]) if i < len(record) else "" for column, i in positions.items()}
        yield Row(path, line, cells)


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
    """One data row of a table. Its readers check a cell and, when it is wrong, raise an error naming the file, line,
    column and value."""

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


__all__ = ["Row", "file_sha256", "is_plain_file_name", "is_relative_path", "read_json_lines", "read_rows",
           "read_table_rows", "read_text", "require_file", "shown"]
