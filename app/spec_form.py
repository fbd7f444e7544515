"""The Launch form, generated from RunSpec's fields (``engine.spec.spec_fields``).

One widget per leaf field, keyed by its dotted path (``train.lr``), labelled by the field's title, with the field's
description as help and RunSpec's default (or a cloned run's value) as its start. A section shows its common fields
and keeps the advanced ones in a "more options" expander, so a field added to RunSpec appears here without editing
this file. Four fields need more than one plain widget and have their own: the model and the dataset (a bundled
choice or a path), the methods (several at once: one run each) and the seed (several: one run each).

Optional numbers have no "empty" in a number box: 0 stands for None there, which is safe because every optional
number of RunSpec must be positive.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from typing import Any

import streamlit as st
import yaml

from engine.spec import SpecField, spec_fields

CUSTOM_MODEL = "other (hub id, local directory or timm/<name>)"
FILE_DATASET = "other (a file, a directory or a hub id)"
TASKS = ("classification", "causal LM (instruction tuning)")
COLUMNS = 3


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of a (partial) RunSpec dict, for the paths that are leaf fields."""
    paths = {f.path for f in spec_fields()}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = prefix + key
        if path in paths:
            out[path] = value
        elif isinstance(value, dict):
            out |= flatten(value, path + ".")
    return out


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """The RunSpec dict of {dotted path: value}."""
    out: dict[str, Any] = {}
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def start_values(clone: dict[str, Any]) -> dict[str, Any]:
    """Each field's first value: RunSpec's default, or the cloned run's value."""
    return {f.path: f.default for f in spec_fields()} | flatten(clone)


def _optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _step(value: float) -> float:
    """A step of the value's own order of magnitude (5e-4 steps by 1e-4), 0.01 from zero."""
    return 10.0 ** math.floor(math.log10(abs(value))) if value else 0.01


def plain_widget(field: SpecField, start: Any, problems: list[str]) -> Any:
    """The widget of a field by its type; returns the value as RunSpec takes it."""
    ann, optional = _optional(field.annotation)
    label, help_, key = field.title, field.description, field.path
    origin = typing.get_origin(ann)
    if ann is bool:
        return st.checkbox(label, value=bool(start), help=help_, key=key)
    if origin is typing.Literal:
        options = list(typing.get_args(ann))
        return st.selectbox(label, options, index=options.index(start), help=help_, key=key)
    if ann is int:
        value = int(st.number_input(label, value=int(start or 0), step=1, help=help_, key=key))
        return None if optional and value == 0 else value
    if ann is float:
        start = float(start or 0.0)
        value = float(st.number_input(label, value=start, step=_step(start), format="%.6g", help=help_, key=key))
        return None if optional and value == 0 else value
    if origin is list:
        text = st.text_input(label, ", ".join(map(str, start or [])), help=help_, key=key)
        return [part.strip() for part in text.split(",") if part.strip()]
    if origin is dict:
        text = st.text_input(label, yaml.safe_dump(start, default_flow_style=True).strip() if start else "",
                             help=help_, key=key)  # fmt: skip
        return _mapping(field.path, text, problems)
    text = st.text_input(label, "" if start is None else str(start), help=help_, key=key)
    return None if optional and not text.strip() else text


def _mapping(path: str, text: str, problems: list[str]) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        problems.append(f"{path}: write a YAML mapping, e.g. {{pretrained: false}}")
        return {}
    return value


def _bundled_or_other(
    field: SpecField, start: Any, bundled: dict[str, str], other: str, other_label: str, other_key: str
) -> str:
    """A selectbox of the bundled choices (with their descriptions) plus ``other``, which asks for a name in a text
    input; returns the choice or the name typed (empty if none yet)."""
    options = [*bundled, other]
    choice = st.selectbox(
        field.title, options, index=options.index(start if start in bundled else other), key=field.path,
        format_func=lambda c: c if c == other else f"{c}: {bundled[c]}", help=field.description,
    )  # fmt: skip
    if choice != other:
        return choice
    return st.text_input(other_label, "" if start in bundled else start, key=other_key).strip()


def _task_choices(start_model: Any) -> bool:
    """The task radio above the model: classification or a causal LM (instruction tuning); True for the latter.
    It narrows the bundled models and datasets offered (a hub model or a file is judged by its contents)."""
    from engine.backends.hf_causal import TINY

    options = list(TASKS)
    default = TASKS[1] if start_model in TINY else TASKS[0]
    task = st.radio("Task", options, index=options.index(default), horizontal=True, key="launch_task",
                    help="a causal LM trains on instruction data (prompt/response or multiple choice)")  # fmt: skip
    return task == TASKS[1]


def model_widget(field: SpecField, start: Any, problems: list[str]) -> str:
    """A bundled model of the chosen task, or any other by name or path."""
    from engine.backends.hf_causal import TINY
    from engine.models import BUNDLED

    causal = _task_choices(start)
    bundled = {k: v for k, v in BUNDLED.items() if (k in TINY) == causal}
    start = next(iter(bundled)) if start in BUNDLED and start not in bundled else start  # the other task's model
    name = _bundled_or_other(field, start, bundled, CUSTOM_MODEL, "Model name or path", "custom_model")
    if not name:
        problems.append("model: enter a hub id, a local directory or timm/<name>")
    return name


def dataset_widget(field: SpecField, start: Any, problems: list[str]) -> str:
    """A bundled dataset of the chosen task, or another by path (CSV, JSONL, Parquet, Arrow, a directory) or hub id."""
    from engine.data import BUNDLED
    from engine.lm_data import BUNDLED as INSTRUCTIONS

    causal = st.session_state.get("launch_task") == TASKS[1]
    bundled = {k: v for k, v in BUNDLED.items() if (k in INSTRUCTIONS) == causal}
    start = next(iter(bundled)) if start in BUNDLED and start not in bundled else start  # the other task's data
    path = _bundled_or_other(field, start, bundled, FILE_DATASET, "Dataset path or hub id", "data_path")
    if not path:
        problems.append("dataset.name: enter a data file, a dataset directory or a hub id")
    return path


def methods_widget(field: SpecField, start: Any, problems: list[str]) -> list[str]:
    """Several methods at once: one run (per seed) each."""
    from engine.methods import method_names

    chosen = st.multiselect(field.title, method_names(), default=[start], key=field.path, help=field.description)
    if not chosen:
        problems.append("method: choose at least one PEFT method")
    return chosen


def seeds_widget(field: SpecField, start: Any, problems: list[str]) -> list[int]:
    """Several seeds at once: '0', '0, 1, 2' or '0-4', one run per seed."""
    from app.common import parse_seeds

    text = st.text_input(field.title, str(start), key=field.path,
                         help="'0', '0, 1, 2' or '0-4': one run per seed")  # fmt: skip
    try:
        return parse_seeds(text)
    except ValueError as err:
        problems.append(str(err))
        return []


WIDGETS: dict[str, Callable[[SpecField, Any, list[str]], Any]] = {
    "model": model_widget,
    "dataset.name": dataset_widget,
    "method.name": methods_widget,
    "train.seed": seeds_widget,
}


def _grid(fields: list[SpecField], start: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Plain fields three to a row, the fields with their own widget on a row of their own."""
    values: dict[str, Any] = {}
    row: list[SpecField] = []

    def flush() -> None:
        for column, field in zip(st.columns(COLUMNS), row):
            with column:
                values[field.path] = plain_widget(field, start[field.path], problems)
        row.clear()

    for field in fields:
        if field.path in WIDGETS:
            flush()
            values[field.path] = WIDGETS[field.path](field, start[field.path], problems)
            continue
        row.append(field)
        if len(row) == COLUMNS:
            flush()
    flush()
    return values


def section_form(section: str, start: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The widgets of one section ({dotted path: value}): common fields, then the advanced ones in an expander.
    ``problems`` collects what the widgets can tell before RunSpec validates (an empty custom model, bad seeds)."""
    fields = [f for f in spec_fields() if f.section == section]
    values = _grid([f for f in fields if not f.advanced], start, problems)
    advanced = [f for f in fields if f.advanced]
    if advanced:
        with st.expander(f"More {section} options"):
            values |= _grid(advanced, start, problems)
    return values
