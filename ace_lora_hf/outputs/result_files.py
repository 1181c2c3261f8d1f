"""Per-image results on disk: CSV and JSON Lines stream as each batch finishes, JSON is written once at the end.

A streamed file grows under a temporary name (`NAME.partial`) and takes its name only when the run completes, so an
interrupted run loses at most the batch in flight and `--resume` continues it; nothing is ever written over the
finished file of an earlier run unless asked (`--overwrite`).
"""

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers.utils import logging

from ..data.csv_cells import restored, write_header, write_rows
from ..errors import InvalidArgumentError, OutputPathError
from .safe_outputs import atomic_file, naming_output, write_json_atomic, write_text_atomic


logger = logging.get_logger(__name__)

STREAMED_SUFFIXES = (".csv", ".jsonl")
DECISION_SEPARATOR = "; "  # between the labels a CSV row's decision column names


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def provenance_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


class ResultsFile:
    """The results of one run for `labels`, as CSV (`.csv`), JSON Lines (`.jsonl`) or one JSON document (`.json`).

    Each record is `{"image", "probabilities": {label: p}, "prediction"[, "decision"][, "target"]}` or
    `{"image", "error"}`; `decision` lists the labels a calibration's thresholds decide present. With `id_fields`,
    records also carry `"ids": {field: value}` (a DICOM input's UIDs: columns of their own in CSV, after the others).

    `provenance` (JSON values: the model's fingerprint, labels, templates, a digest of the inputs, the options that
    change numbers) is written beside the results as `NAME.meta.json`; the results file itself stays plain. `--resume`
    continues only results of the same provenance, and keeps only the first row of each of `inputs`.
    """

    def __init__(self, path: Path, labels: Sequence[str], with_target: bool = False, resume: bool = False,
                 overwrite: bool = False, provenance: dict | None = None, inputs: Sequence[str] | None = None,
                 with_decision: bool = False, id_fields: Sequence[str] = ()):
        self.path, self.labels, self.with_target, self.id_fields = path, list(labels), with_target, list(id_fields)
        self.with_decision = with_decision
        self.provenance = {"labels": self.labels, **(provenance or {})}
        self.format = path.suffix.lower()
        if self.format not in (*STREAMED_SUFFIXES, ".json"):
            raise InvalidArgumentError(f"--output {path}: name a .csv, .jsonl or .json file.")
        if resume and self.format == ".json":
            raise InvalidArgumentError(f"--output {path}: --resume continues a .csv or .jsonl file, not .json.")
        self.partial = partial_path(path)
        if self.partial.exists() and not (resume or overwrite):
            raise OutputPathError(f"{self.partial} holds an interrupted run; pass --resume to continue it or "
                                  "--overwrite to start over.")
        self.records: list[dict] = []
        self.done: set[str] = set()
        if resume:
            self.records = self._kept(self._read_earlier(), inputs)
            self.done = {record["image"] for record in self.records}
        self._file = None
        write_json_atomic(provenance_path(path), self.provenance)
        if self.format in STREAMED_SUFFIXES:
            self._start_partial()

    # -------------------------------------------------------------------------------------------------- reading

    @staticmethod
    def _kept(records: list[dict], inputs: Sequence[str] | None) -> list[dict]:
        """The earlier results worth keeping: no errors (they run again), one row per image, images of this run."""
        wanted = None if inputs is None else set(inputs)
        classified = [record for record in records if "error" not in record]
        kept, seen = [], set()
        for record in classified:
            image = record["image"]
            if image not in seen and (wanted is None or image in wanted):
                kept.append(record)
                seen.add(image)
        if len(kept) < len(classified):
            logger.warning("--resume: left out %d earlier row(s) repeated or of images not in this run",
                           len(classified) - len(kept))
        return kept

    def _read_earlier(self) -> list[dict]:
        """The records an earlier run of this output wrote; a last line cut off by its interruption is dropped (that
        image runs again), anything else that is not a record of these labels is refused, and so is a file whose
        provenance differs from this run's."""
        source = self.partial if self.partial.exists() else self.path
        if not source.exists():
            return []
        try:
            text = source.read_bytes().decode("utf-8")  # not read_text: its newline translation would turn \r into \n
        except UnicodeDecodeError:
            raise self._unusable(source, "is not a UTF-8 text file") from None
        parse = self._csv_records if self.format == ".csv" else self._jsonl_records
        parsed = list(parse(source, text))
        if parsed and not text.endswith(("\n", "\r")):
            # A row is complete only with its line end: one cut inside its last cell still has every cell.
            parsed[-1] = (parsed[-1][0], None, True)
        records = []
        for index, (number, record, cut_off) in enumerate(parsed, start=1):
            if record is None:
                if cut_off and index == len(parsed):
                    break
                raise self._unusable(source, f"line {number} is not a result of these labels")
            records.append(record)
        self._check_provenance(source)
        return records

    def _csv_records(self, source: Path, text: str) -> Iterator[tuple[int, dict | None, bool]]:
        """(line number, record or None, whether it looks cut off) of each row. The reader splits rows, not the text:
        a quoted cell may hold a line break (an image name with \\n, \\r or U+2028)."""
        reader = csv.reader(io.StringIO(text, newline=""))
        rows = ([restored(cell) for cell in cells] for cells in reader)
        header = next(rows, None)
        if header is not None and header != self._columns():
            raise OutputPathError(f"--resume: {source} has other columns ({header}) than this run's results "
                                  f"({self._columns()}); choose another --output or pass --overwrite to start over.")
        for cells in rows:
            complete = len(cells) == len(header)
            yield reader.line_num, self._from_row(dict(zip(header, cells))) if complete else None, \
                len(cells) < len(header)

    def _jsonl_records(self, source: Path, text: str) -> Iterator[tuple[int, dict | None, bool]]:
        """(line number, record or None, whether the line looks cut off) of each line; split on newlines only (a
        record never holds one: JSON escapes it)."""
        for number, line in enumerate(text.removesuffix("\n").split("\n"), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield number, None, True
                continue
            yield number, record if self._is_record(record) else None, False

    def _is_record(self, record) -> bool:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            return False
        if "error" in record:
            return True
        probabilities = record.get("probabilities")
        return (isinstance(probabilities, dict) and set(probabilities) == set(self.labels)
                and all(isinstance(value, (int, float)) for value in probabilities.values()))

    def _check_provenance(self, source: Path) -> None:
        recorded_path = provenance_path(self.path)
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise self._unusable(source, f"has no {recorded_path.name} saying what produced it (written by ace-lora-hf "
                                         "0.1, or copied without it)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._unusable(source, f"has a damaged {recorded_path.name}") from None
        if not isinstance(recorded, dict):
            raise self._unusable(source, f"has a damaged {recorded_path.name}")
        differing = sorted(key for key in recorded.keys() | self.provenance.keys()
                           if recorded.get(key) != self.provenance.get(key))
        if differing:
            raise self._unusable(source, f"was produced with another {', '.join(differing)} than this run")

    @staticmethod
    def _unusable(source: Path, problem: str) -> OutputPathError:
        return OutputPathError(f"--resume: {source} {problem}; pass --overwrite to start over, or choose another "
                               "--output.")

    # -------------------------------------------------------------------------------------------------- writing

    def _columns(self) -> list[str]:
        return ["image", *self.labels, "prediction", *(["decision"] if self.with_decision else []),
                *(["target"] if self.with_target else []), "error", *self.id_fields]

    def _row(self, record: dict) -> dict:
        row = {"image": record["image"], "prediction": record.get("prediction", ""), "error": record.get("error", "")}
        row.update({label: f"{p:.6f}" for label, p in record.get("probabilities", {}).items()})
        if "target" in record:
            row["target"] = record["target"]
        if "decision" in record:
            row["decision"] = DECISION_SEPARATOR.join(record["decision"])
        row.update(record.get("ids", {}))
        return row

    def _from_row(self, row: dict) -> dict | None:
        """The record of a CSV row, or None where its cells are not one."""
        ids = {"ids": {field: row[field] for field in self.id_fields}} if self.id_fields else {}
        if row["error"]:
            return {"image": row["image"], "error": row["error"], **ids}
        try:
            record = {"image": row["image"], "probabilities": {label: float(row[label]) for label in self.labels},
                      "prediction": row["prediction"], **ids}
            if self.with_decision:
                record["decision"] = [label for label in row.get("decision", "").split(DECISION_SEPARATOR) if label]
            if row.get("target", "") != "":
                record["target"] = int(row["target"])
        except ValueError:
            return None
        return record

    def _start_partial(self) -> None:
        """A fresh `.partial` holding the kept earlier records, opened for appending."""
        with atomic_file(self.partial, encoding="utf-8", newline="") as file:
            if self.format == ".csv":
                write_header(file, self._columns())
            self._append(file, self.records)
        self._file = self.partial.open("a", encoding="utf-8", newline="")

    def _append(self, file, records: list[dict]) -> None:
        if self.format == ".jsonl":
            file.writelines(json.dumps(record) + "\n" for record in records)
        else:
            write_rows(file, self._columns(), map(self._row, records))

    def write(self, records: list[dict]) -> None:
        """Add one batch's records (streamed formats reach the disk now)."""
        self.records.extend(records)
        if self._file is not None:
            with naming_output(self.partial):
                self._append(self._file, records)
                self._file.flush()

    def finish(self, summary: dict) -> Path:
        """Give the file its name; the JSON document also carries `summary` (labels, metrics, skipped files ...)."""
        if self._file is not None:
            self._file.close()
            os.replace(self.partial, self.path)
        else:
            write_text_atomic(self.path, json.dumps({**summary, "results": self.records}, indent=2, allow_nan=False))
        return self.path


__all__ = ["ResultsFile", "partial_path", "provenance_path"]
