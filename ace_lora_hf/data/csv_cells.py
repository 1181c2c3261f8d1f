"""The one way the package writes CSV: text that a spreadsheet would run as a formula is defused, and read back exactly.

A cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage return is a formula to Excel, LibreOffice and Google
Sheets, so an image name, a label or a report such as `=HYPERLINK(...)` would run when a results table is opened.
Such text gets OWASP's prefix, a single quote (`'=HYPERLINK(...)`), which spreadsheets show as text; numbers (MIMIC's
`-1` labels, probabilities) are written as they are. The package's CSV readers (`ace_lora_hf.data.tables`, `--resume`)
take the prefix off again, so every table the package writes reads back cell for cell.
"""

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import IO


# A cell that needs the prefix: formula text, or text that already looks prefixed (so that reading strips one quote
# and gives the text back).
_NEEDS_PREFIX = re.compile(r"'*[=+\-@\t\r]")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
PREFIX = "'"


def defused(value: object) -> object:
    """`value` as written into a CSV cell: formula text prefixed, numbers and anything else unchanged."""
    if isinstance(value, str) and _NEEDS_PREFIX.match(value) and not _NUMBER.fullmatch(value):
        return PREFIX + value
    return value


def restored(text: str) -> str:
    """The text a cell written by `defused` held."""
    if text.startswith(PREFIX) and _NEEDS_PREFIX.match(text, 1) and not _NUMBER.fullmatch(text, 1):
        return text[1:]
    return text


def write_header(file: IO[str], columns: Sequence[str]) -> None:
    csv.writer(file).writerow([defused(column) for column in columns])


def write_rows(file: IO[str], columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> None:
    """Rows (dicts keyed by `columns`; a missing key is an empty cell) below a header written by `write_header`."""
    writer = csv.writer(file)
    writer.writerows([defused(row.get(column, "")) for column in columns] for row in rows)


__all__ = ["defused", "restored", "write_header", "write_rows"]
