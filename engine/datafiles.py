"""Text files a researcher writes by hand: CSV and JSONL, read into a ``Table`` with every error tied to its line.

Values of these files carry no types a reader can trust (``1.0`` in a CSV may be a class or a target), so their
labels are classes unless the spec says ``task: regression``; a decimal label under ``auto`` is refused rather
than silently turning a classifier into a regressor.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from engine.datatable import DataError, Table


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped), or a DataError naming the file, the line and the fix."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(
            f"dataset.name: {path} cannot be read ({err.strerror}): check the path and its permissions"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"dataset.name: {path} is not UTF-8 text (line {line} has the byte 0x{data[err.start]:02x}): "
            "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or iconv -t utf-8)"
        ) from None


def csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank row; a row whose field count differs from the header's is refused."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"dataset.name: {path} is empty: write a header line (e.g. text,label), then one row each")
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise DataError(
                    f"dataset.name: {path} line {reader.line_num} has {len(fields)} fields where the header has "
                    f"{len(header)}: fix that row (quote a field that holds a comma)"
                )
            rows.append((reader.line_num, dict(zip(header, fields))))
    except csv.Error as err:
        raise DataError(
            f"dataset.name: {path} line {reader.line_num} is not valid CSV ({err}): fix that line"
        ) from None
    if not rows:
        raise DataError(f"dataset.name: {path} has no rows: add one row per example below the header")
    return rows


def jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is refused."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"dataset.name: {path} line {number} is not valid JSON ({err.msg}, column {err.colno}): "
                "write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"dataset.name: {path} line {number} holds a JSON {type(row).__name__}, not an object: "
                'write one JSON object per line, e.g. {"text": "...", "label": 0}'
            )
        rows.append((number, row))
    if not rows:
        raise DataError(f"dataset.name: {path} has no rows: write one JSON object per line")
    return rows


def read_text_table(path: Path, needed: list[tuple[str, str]]) -> Table:
    """A CSV or JSONL file as a ``Table``. ``needed``: (column, spec field) pairs every line must have; a column
    absent from the first row names the columns there are, one absent from a later line names that line."""
    rows = csv_rows(path, read_text(path)) if path.suffix == ".csv" else jsonl_rows(path, read_text(path))
    _, first = rows[0]
    for col, fld in needed:
        if col not in first:
            raise DataError(f"{fld}: column {col!r} not in {path.name} (columns: {', '.join(first)})")
        for number, row in rows:
            if col not in row:
                raise DataError(f"{fld}: {path} line {number} has no {col!r} field: give every line the same fields")
    columns = {name: [row.get(name) for _, row in rows] for name in first}
    return Table(where=str(path), columns=columns, lines=[n for n, _ in rows], typed=False)
