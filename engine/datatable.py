"""From a table of columns to examples: the column mapping, the task and the labels, the same for every source.

Every source (CSV/JSONL, Parquet/Arrow, a ``datasets`` directory or hub id, an image folder) reads into a ``Table``;
``to_raw`` maps the spec's columns onto it and returns ``RawData``:

* ``text_column`` (and ``text_pair_column`` for sentence pairs), or ``image_column``: the inputs;
* ``label_column``: the labels. ``task: auto`` makes a typed float column (Parquet, Arrow, ``datasets``) a
  regression target and anything else classes; ``classification`` / ``regression`` override it. Classes keep the
  order the data declares (a ``ClassLabel``'s names), else integers in numeric order (``"2"`` before ``"10"``),
  else names in sorted order: the same for every read of the same data, and recorded with each run;
* ``task: multiple_choice``: ``text_column`` is the question (``text_pair_column`` its passage or context, if any),
  ``choices_column`` the choices (a list column, a
  ``{text, label}`` column as ARC's, or several columns named with commas: ``sol1,sol2``) and ``label_column`` the
  answer (an index from 0, a choice's label or text, a letter A-Z; a digit string counts from 1 when the choices are
  named columns, as in SIQA and WinoGrande, from 0 for a list column, as in HellaSwag; a true/false answer without
  choices is a yes/no question, as in BoolQ).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.spec import DatasetSpec


class DataError(UserError):
    """A dataset that cannot be read or used; the message names the file (and line) and the fix."""


@dataclass
class RawData:
    modality: str  # "text" | "image"
    inputs: Any  # texts; images (N, 3, h, w) float32 in [0, 1]; or a list of image files/records decoded on encoding
    labels: np.ndarray  # int64 class ids (answer indices for multiple choice), or float32 regression targets
    label_names: list[str]  # the classes in order ([] for regression and multiple choice)
    task: str = "classification"  # "classification" | "regression" | "multiple_choice"
    pairs: list[str] | None = None  # the second text of each pair
    choices: list[list[str]] | None = None  # multiple choice: each question's choices
    fingerprint: str = ""  # identity of the content (for the on-disk cache)
    eval: RawData | None = None  # the evaluation split, when the spec names one (dataset.eval_split)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Table:
    """Columns of one split. ``kinds``: a typed source's column kinds ("float", "int", "bool", "string", "list",
    "other"); ``class_names``: a ``ClassLabel`` column's names; ``lines``: each row's line in its file."""

    where: str  # the file, directory or hub id, for messages
    columns: dict[str, list]
    lines: list[int] | None = None
    typed: bool = True
    kinds: dict[str, str] = field(default_factory=dict)
    class_names: dict[str, list[str]] = field(default_factory=dict)
    short: str = ""  # a short name for "column not in ..." messages (the file name)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def at(self, i: int) -> str:
        return f"{self.where} line {self.lines[i]}" if self.lines else f"{self.where} row {i}"

    def need(self, column: str, spec_field: str) -> list:
        if column not in self.columns:
            raise DataError(
                f"{spec_field}: column {column!r} not in {self.short or self.where} (columns: "
                f"{', '.join(self.columns)}): set {spec_field} to one of those"
            )
        return self.columns[column]


_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)")


def labels_from_strings(values: list[str], order: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class ids for label strings; integer labels keep their numeric order (``"2"`` before ``"10"``)."""
    if order is None:
        numeric = all(_INTEGER.fullmatch(v) for v in values)
        order = sorted(set(values), key=int if numeric else str)
    index = {n: i for i, n in enumerate(order)}
    return np.array([index[v] for v in values], dtype=np.int64), order


def to_raw(table: Table, spec: DatasetSpec, split_field: str = "dataset.split") -> RawData:
    """The examples of one split of a table, mapped by the spec's columns (see the module's docstring)."""
    if len(table) == 0:
        split = spec.split if split_field == "dataset.split" else spec.eval_split
        raise DataError(f"{split_field}: {split!r} of {table.where} is empty: pick a split that holds examples")
    if spec.task == "multiple_choice":
        return _multiple_choice(table, spec)
    is_image = spec.image_column in table.columns and spec.text_column not in table.columns
    if is_image and spec.text_pair_column:
        raise DataError(
            f"dataset.text_pair_column: {table.where} is an image dataset (column {spec.image_column!r}): a text "
            "pair belongs to a text dataset; remove text_pair_column"
        )
    labels, names, task = _labels(table, spec)
    if is_image:
        return RawData("image", list(table.columns[spec.image_column]), labels, names, task)
    texts = _texts(table, spec.text_column, "dataset.text_column")
    pairs = _texts(table, spec.text_pair_column, "dataset.text_pair_column") if spec.text_pair_column else None
    return RawData("text", texts, labels, names, task, pairs=pairs)


def _texts(table: Table, column: str, spec_field: str) -> list[str]:
    values = table.need(column, spec_field)
    for i, value in enumerate(values):
        if value is None:
            raise DataError(f"{spec_field}: {table.at(i)}: the text is null: give every example a text")
    return [str(v) for v in values]


# --- labels ----------------------------------------------------------------------------------------


def _labels(table: Table, spec: DatasetSpec) -> tuple[np.ndarray, list[str], str]:
    column = spec.label_column
    values = table.need(column, "dataset.label_column")
    kind = table.kinds.get(column, "")
    if spec.task == "regression" or (spec.task == "auto" and table.typed and kind == "float"):
        return _targets(table, values, column), [], "regression"
    if table.typed and kind == "float":
        raise DataError(
            f"dataset.task: classification, but column {column!r} of {table.where} holds decimal numbers "
            "(regression targets): set dataset.task: regression (or auto), or map the values to classes"
        )
    if column in table.class_names:
        names = table.class_names[column]
        ids = np.array(values, dtype=np.int64)
        if (ids < 0).any() or (ids >= len(names)).any():
            i = int(np.flatnonzero((ids < 0) | (ids >= len(names)))[0])
            raise DataError(
                f"dataset.label_column: {table.at(i)} has label {int(ids[i])}, not one of the {len(names)} classes "
                f"of column {column!r} (a test split without labels?): pick a split with labels"
            )
        present = len(np.unique(ids))
        if present < 2:
            _one_class(table, names[int(ids[0])], column)
        return ids, list(names), "classification"
    strings = [_label(v, table, i, column) for i, v in enumerate(values)]
    ids, names = labels_from_strings(strings)
    if len(names) < 2:
        _one_class(table, names[0], column)
    return ids, names, "classification"


def _one_class(table: Table, name: str, column: str) -> None:
    raise DataError(
        f"dataset.label_column: {table.where} has one class only ({name!r} in column {column!r}): a classifier "
        "needs at least two classes"
    )


def _label(value: Any, table: Table, i: int, column: str) -> str:
    """A label as its class name: integers and strings are classes; decimals, empty values and the rest are not."""
    where = f"dataset.label_column: {table.at(i)}"
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) or (isinstance(value, str) and _DECIMAL.fullmatch(value)):
        raise DataError(
            f"{where}: label {value!r} in column {column!r} is a decimal number: labels must be integers (class "
            "ids) or strings (class names); map the values to classes, or set dataset.task: regression"
        )
    if value is None or value == "":
        raise DataError(f"{where}: the label in column {column!r} is empty: give every example a label")
    if isinstance(value, (list, dict)):
        kind = type(value).__name__
        raise DataError(f"{where}: label in column {column!r} is a JSON {kind}: use an integer or a string")
    return str(value)


def _targets(table: Table, values: list, column: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float32)
    for i, value in enumerate(values):
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or isinstance(value, bool):
            raise DataError(
                f"dataset.label_column: {table.at(i)}: {value!r} in column {column!r} is not a finite number, as a "
                "regression target must be: fix the value, or set dataset.task: classification"
            )
        out[i] = number
    return out


# --- multiple choice -------------------------------------------------------------------------------


def _multiple_choice(table: Table, spec: DatasetSpec) -> RawData:
    questions = _texts(table, spec.text_column, "dataset.text_column")
    answers = table.need(spec.label_column, "dataset.label_column")
    named = [c.strip() for c in spec.choices_column.split(",")] if "," in spec.choices_column else None
    if named:
        columns = [table.need(c, "dataset.choices_column") for c in named]
        choice_rows: list[Any] = [[col[i] for col in columns] for i in range(len(table))]
    elif spec.choices_column in table.columns or not all(isinstance(a, bool) for a in answers):
        choice_rows = table.need(spec.choices_column, "dataset.choices_column")
    else:
        choice_rows = [["no", "yes"]] * len(table)  # yes/no questions (BoolQ): the answer is the choice
    choices, labels = [], np.empty(len(table), dtype=np.int64)
    for i, (row, answer) in enumerate(zip(choice_rows, answers)):
        texts, keys = _choice_list(row, table, i, spec.choices_column)
        labels[i] = _answer_index(answer, texts, keys, bool(named), table, i, spec.label_column)
        choices.append(texts)
    pairs = _texts(table, spec.text_pair_column, "dataset.text_pair_column") if spec.text_pair_column else None
    return RawData("text", questions, labels, [], "multiple_choice", pairs=pairs, choices=choices)


def _choice_list(row: Any, table: Table, i: int, column: str) -> tuple[list[str], list[str]]:
    """(choice texts, choice labels) of one question."""
    if isinstance(row, dict) and "text" in row:
        texts, keys = list(row["text"]), [str(k) for k in row.get("label") or []]
    elif isinstance(row, (list, tuple)):
        texts, keys = list(row), []
    else:
        raise DataError(
            f"dataset.choices_column: {table.at(i)}: the choices in column {column!r} are a "
            f"{type(row).__name__}, not a list: write them as a list of strings (or name several columns: a,b)"
        )
    if len(texts) < 2 or any(t is None or str(t).strip() == "" for t in texts):
        raise DataError(
            f"dataset.choices_column: {table.at(i)}: a question needs at least two non-empty choices "
            f"(column {column!r} has {len(texts)}): fix that row"
        )
    return [str(t) for t in texts], keys


def _answer_index(
    answer: Any, texts: list[str], keys: list[str], named: bool, table: Table, i: int, column: str
) -> int:
    index: int | None = None
    if isinstance(answer, bool):
        index = int(answer)
    elif isinstance(answer, int):
        index = answer
    elif isinstance(answer, str):
        a = answer.strip()
        if a in keys:
            index = keys.index(a)
        elif a in texts:
            index = texts.index(a)
        elif _INTEGER.fullmatch(a):
            index = int(a) - 1 if named else int(a)
        elif len(a) == 1 and a.isalpha():
            index = ord(a.upper()) - ord("A")
    if index is None or not 0 <= index < len(texts):
        raise DataError(
            f"dataset.label_column: {table.at(i)}: answer {answer!r} in column {column!r} is not one of its "
            f"{len(texts)} choices: give the answer as an index from 0, a letter, or the choice's text"
        )
    return index
