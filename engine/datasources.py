"""Where researchers keep their data, read into a ``Table`` (``engine.datatable``):

* ``.parquet`` and ``.arrow`` files (pyarrow; a ``datasets``-written file keeps its ``ClassLabel`` names);
* a ``save_to_disk`` directory (``datasets.load_from_disk``; ``dataset.split`` picks a split of a ``DatasetDict``);
* a local dataset repository (data files, optionally a README declaring configs) and a hub id, through
  ``datasets.load_dataset(name, config, split=...)``. ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are honoured as set
  when the dataset is read, and an unreachable hub is one line naming the id and how to work offline. ``datasets``
  runs no dataset script (it has no ``trust_remote_code`` for data): nothing read here executes code;
* an image folder: one sub-folder of images per class (classes in sorted order, as ``datasets``' ``imagefolder``),
  optionally below a split folder (``train/<class>/...``, ``val200/<class>/...``). Every file with an image suffix
  must open as an image; other files are ignored.

Split names accept ``datasets``' slices (``train[:800]``, ``validation[:10%]``) for every directory and hub source.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.datatable import DataError, Table
from engine.spec import DatasetSpec

TABLE_SUFFIXES = (".parquet", ".arrow")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DATA_FILE_SUFFIXES = frozenset({".parquet", ".arrow", ".csv", ".jsonl", ".json", ".tsv", ".txt"})
_SPLIT = re.compile(r"([\w.-]+)(?:\[(-?\d*%?):(-?\d*%?)\])?")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


# --- fingerprints ----------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """sha256 of a file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_stamp(root: Path) -> str:
    """A digest of every file below ``root`` by relative path, size and modification time (cheap: no reading)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --- kinds of name ---------------------------------------------------------------------------------


def is_table_file(name: str) -> bool:
    return Path(name).suffix in TABLE_SUFFIXES and Path(name).is_file()


def is_directory(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def looks_like_hub_id(name: str) -> bool:
    """owner/name or a canonical name, not a path that happens not to exist (a data file suffix, ./, ~)."""
    return (
        bool(_HUB_ID.fullmatch(name))
        and not name.startswith((".", "/", "~"))
        and Path(name).suffix not in DATA_FILE_SUFFIXES
        and not Path(name).exists()
    )


# --- arrow tables ------------------------------------------------------------------------------------


def _kind(feature: Any) -> str:
    from datasets import ClassLabel, Image, Value

    if isinstance(feature, ClassLabel):
        return "int"
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, Value):
        dtype = feature.dtype
        if dtype.startswith(("float", "double", "half")):
            return "float"
        if dtype.startswith(("int", "uint")):
            return "int"
        return "bool" if dtype == "bool" else "string" if "string" in dtype else "other"
    return "list" if isinstance(feature, (list, tuple)) or type(feature).__name__ in ("List", "Sequence") else "other"


def arrow_to_table(arrow: Any, where: str, features: Any = None, short: str = "") -> Table:
    """A pyarrow Table (and its ``datasets`` features, read from its schema when not given) as a ``Table``."""
    from datasets import ClassLabel, Features

    if features is None:
        try:
            features = Features.from_arrow_schema(arrow.schema)
        except (ValueError, TypeError, KeyError):
            features = {}
    columns = {name: arrow.column(name).to_pylist() for name in arrow.column_names}
    return Table(
        where=where,
        columns=columns,
        kinds={name: _kind(f) for name, f in features.items()},
        class_names={name: list(f.names) for name, f in features.items() if isinstance(f, ClassLabel)},
        short=short or where,
    )


def read_table_file(path: Path) -> Table:
    """A ``.parquet`` or ``.arrow`` file (an Arrow IPC stream, as ``datasets`` writes, or an IPC file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            arrow = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    arrow = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    arrow = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
        raise DataError(
            f"dataset.name: {path} is not a readable {kind} file ({' '.join(str(err).split())[:160]}): write it with "
            f"pandas/pyarrow/datasets ({'to_parquet' if kind == 'Parquet' else 'save_to_disk'})"
        ) from None
    return arrow_to_table(arrow, str(path), short=path.name)


# --- datasets directories and the hub ----------------------------------------------------------------


def _split_parts(split: str, field: str) -> tuple[str, str | None, str | None]:
    m = _SPLIT.fullmatch(split.replace(" ", ""))
    if not m:
        raise DataError(f"{field}: {split!r} is not a split name (e.g. train, or a slice: train[:800])")
    return m.group(1), m.group(2), m.group(3)


def _bound(text: str | None, n: int) -> int | None:
    if not text:
        return None
    return round(n * float(text[:-1]) / 100) if text.endswith("%") else int(text)


def _select(ds: Any, split: str, field: str) -> Any:
    _, start, stop = _split_parts(split, field)
    if start is None and stop is None:
        return ds
    n = len(ds)
    return ds.select(range(n)[slice(_bound(start, n), _bound(stop, n))])


def _dataset_table(ds: Any, where: str) -> tuple[Table, str]:
    """A ``datasets.Dataset`` as a Table (images left undecoded: decoded when encoded), and its fingerprint."""
    from datasets import Image

    for name, feature in ds.features.items():
        if isinstance(feature, Image) and feature.decode:
            ds = ds.cast_column(name, Image(decode=False))
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    return arrow_to_table(ds.data.table, where, ds.features), str(ds._fingerprint)


def read_saved(root: Path, spec: DatasetSpec, split: str, field: str) -> tuple[Table, str]:
    """A ``save_to_disk`` directory: a ``Dataset`` (one split: the split's name is not checked, its slice applies) or
    a ``DatasetDict`` (``split`` picks one)."""
    import datasets

    quiet()
    try:
        loaded = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(
            f"dataset.name: {root} cannot be read as a save_to_disk dataset ({' '.join(str(err).split())[:160]}): "
            "write it again with save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        base, _, _ = _split_parts(split, field)
        if base not in loaded:
            raise DataError(
                f"{field}: split {base!r} not in {root} (splits: {', '.join(loaded)}): set {field} to one of those"
            )
        loaded = loaded[base]
    table, fingerprint = _dataset_table(_select(loaded, split, field), str(root))
    return table, fingerprint


def is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def has_data_files(root: Path) -> bool:
    return (root / "README.md").is_file() or any(p.suffix in DATA_FILE_SUFFIXES for p in root.rglob("*") if p.is_file())


def hub_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


@contextlib.contextmanager
def _offline_as_set() -> Iterator[None]:
    """``datasets`` reads the offline flags once, at import: follow the environment as it is now."""
    import datasets.config
    import huggingface_hub.constants as hub

    before = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    offline = hub_offline()
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def load_with_datasets(name: str, spec: DatasetSpec, split: str, field: str, *, hub: bool) -> tuple[Table, str]:
    """``datasets.load_dataset(name, config, split=split)`` for a hub id or a local dataset repository, every error
    one line naming the field and the fix."""
    import datasets

    quiet()
    _split_parts(split, field)
    if hub and not hub_offline():
        from engine.preflight import hub_endpoint, hub_reachable  # late: preflight imports this package

        endpoint = hub_endpoint()
        if not hub_reachable(endpoint):
            raise DataError(
                f"dataset.name: hub dataset {name!r} cannot be read: the hub ({endpoint}) is unreachable. To work "
                "offline, set HF_DATASETS_OFFLINE=1 with the dataset in the local datasets cache, or give a "
                "save_to_disk directory or a data file"
            )
    try:
        with _offline_as_set():
            # the datasets cache as the environment names it now (datasets reads HF_DATASETS_CACHE at import)
            cache_dir = os.environ.get("HF_DATASETS_CACHE")
            loaded = datasets.load_dataset(name, spec.config, split=split, cache_dir=cache_dir)
    except ValueError as err:
        raise DataError(_load_error(name, spec, split, field, err)) from None
    except (ConnectionError, FileNotFoundError, OSError) as err:
        if hub and hub_offline():
            raise DataError(
                f"dataset.name: hub dataset {name!r} is not in the local datasets cache, and HF_DATASETS_OFFLINE "
                "(or HF_HUB_OFFLINE) is set so the hub was not asked: load it once where the hub is reachable, or "
                "give a save_to_disk directory or a data file, or unset HF_DATASETS_OFFLINE"
            ) from None
        detail = " ".join(str(err).split())[:160]
        raise DataError(
            f"dataset.name: {name!r} cannot be loaded ({detail}): check the hub id (owner/name), log in for a "
            "gated dataset, or give a local directory or file"
        ) from None
    return _dataset_table(loaded, name)


def _load_error(name: str, spec: DatasetSpec, split: str, field: str, err: ValueError) -> str:
    text = " ".join(str(err).split())
    listed = re.search(r"\[([^\]]*)\]", text)
    options = listed.group(1).replace("'", "") if listed else ""
    if "corresponds to no data" in text:
        return f"{field}: {split!r} of {name} is empty: pick a split (or slice) that holds examples"
    if "Config name is missing" in text:
        return f"dataset.config: {name} has several configs ({options}): set dataset.config to one of them"
    if "BuilderConfig" in text or "config" in text.lower() and spec.config and spec.config in text:
        return f"dataset.config: {spec.config!r} is not a config of {name} (configs: {options}): pick one of those"
    if "split" in text.lower():
        return f"{field}: {split!r} is not a split of {name} (splits: {options or '?'}): set {field} to one of those"
    return f"dataset.name: {name} cannot be loaded ({text[:160]}): check the dataset and dataset.config"


# --- image folders -----------------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_image_folder(root: Path) -> bool:
    return root.is_dir() and any(_images_in(d) for d in _class_dirs(root))


def read_image_folder(root: Path, spec: DatasetSpec, split: str, field: str) -> Table:
    """An image folder (one sub-folder per class), or its split folder ``root/<split>`` when there is one. Every
    image is opened (header only) so an unreadable file is named before a run starts."""
    from PIL import Image, UnidentifiedImageError

    base, start, stop = _split_parts(split, field)
    folder = root / base if (root / base).is_dir() and is_image_folder(root / base) else root
    classes = [d for d in _class_dirs(folder) if _images_in(d)]
    paths, labels = [], []
    for index, class_dir in enumerate(classes):
        for path in _images_in(class_dir):
            try:
                with Image.open(path) as img:
                    img.verify()
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
                raise DataError(
                    f"dataset.name: {path} in image folder {root} cannot be read as an image "
                    f"({type(err).__name__}): remove or replace that file"
                ) from None
            paths.append(str(path))
            labels.append(index)
    n = len(paths)
    keep = range(n)[slice(_bound(start, n), _bound(stop, n))]
    return Table(
        where=str(folder),
        columns={spec.image_column: [paths[i] for i in keep], spec.label_column: [labels[i] for i in keep]},
        kinds={spec.image_column: "image", spec.label_column: "int"},
        class_names={spec.label_column: [d.name for d in classes]},
    )
