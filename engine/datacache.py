"""The on-disk cache of encoded data, shared by every run and study trial of one PEFT Lab home.

Tokenising a text set or decoding and resizing an image set is done once per *version* of the data: the encoded train
and eval splits are stored under ``$PEFTLAB_HOME/cache/data/<key>.safetensors`` (tensors only, no pickle; the class
names and task in its metadata). The key is a sha256 of everything the result depends on:

* the dataset's fingerprint: a file's content hash, a ``datasets`` fingerprint (``save_to_disk``, hub), an image
  folder's file names, sizes and modification times, a bundled set's package version; editing the source changes it;
* the columns, task, splits and caps of the spec, and ``max_length``;
* the tokenizer (a hash of its full serialisation) or the image preprocessing (size and interpolation).

An entry is written to a temporary name and renamed, so concurrent trials never read half of one; ``building(key)``
holds a lock file while one process encodes, so trials that start together encode once (the others wait, then
read the entry). ``STATS`` counts hits and misses and the seconds spent encoding, for benchmarks and tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FORMAT = 1  # bump when the stored layout changes
STATS: dict[str, float] = {"disk_hits": 0, "misses": 0, "encode_s": 0.0, "read_s": 0.0}
_TOKENIZER_DIGESTS: dict[int, tuple[Any, str]] = {}


def cache_dir() -> Path:
    home = os.environ.get("PEFTLAB_HOME") or str(Path(__file__).resolve().parent.parent / ".peftlab")
    path = Path(home) / "cache" / "data"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def enabled() -> bool:
    """``PEFTLAB_DATA_CACHE=0`` turns the disk cache off (benchmarks measure both)."""
    return os.environ.get("PEFTLAB_DATA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of the tokenizer's full serialisation (vocabulary, normaliser, special tokens), computed once per
    tokenizer object."""
    memo = _TOKENIZER_DIGESTS.get(id(tokenizer))
    if memo is not None and memo[0] is tokenizer:
        return memo[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        text = json.dumps([type(tokenizer).__name__, sorted(vocab.items())], default=str)
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "padding_side", None),
                        getattr(tokenizer, "truncation_side", None)])  # fmt: skip
    digest = hashlib.sha256((text + extra).encode()).hexdigest()
    _TOKENIZER_DIGESTS[id(tokenizer)] = (tokenizer, digest)
    return digest


def make_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def get(key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, metadata) stored under ``key``, or None."""
    from safetensors import safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not enabled() or not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, ValueError, json.JSONDecodeError, RuntimeError):
        return None  # a damaged entry is rebuilt
    STATS["disk_hits"] += 1
    STATS["read_s"] += time.perf_counter() - t0
    return tensors, meta


@contextlib.contextmanager
def building(key: str) -> Iterator[None]:
    """Hold ``key``'s lock while its entry is looked up and built: a second process waits for the first's entry."""
    if not enabled():
        yield
        return
    with open(cache_dir() / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def put(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    if not enabled():
        return
    path = cache_dir() / f"{key}.safetensors"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)
