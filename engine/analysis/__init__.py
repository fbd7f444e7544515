"""Analyses of trained adapters and of runs: rank spectra, importance, loss landscapes, method comparison.

Every analysis talks to methods only through the contract in ``engine.methods.base`` (``delta_weight()``,
``low_rank_factors_of(layer)``, ``effective_base_weight()``, ``Method.adapted_layers`` and ``Method.artifacts``),
never through a method's name.

* ``spectra``: singular values of ΔW per adapted layer and the scalars derived from them;
* ``importance``: method artifacts (score matrices, router loads) as tidy tables, and ``LayerNormProfiler``;
* ``landscape``: 1-D and 2-D loss landscapes (Li et al. 2018) and linear interpolations;
* ``compare``: filtering, Pareto fronts, learning curves over seeds and config diffs of runs.

This module holds the one artifact format they share: numeric arrays in ``<stem>.npz`` next to
JSON metadata in ``<stem>.json``. It imports no submodule, so ``engine.analysis.compare`` stays light.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """The (``.npz``, ``.json``) pair of an artifact; ``path`` may carry either suffix or none."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``arrays`` to ``<stem>.npz`` and ``meta`` (JSON-able) to ``<stem>.json``; returns both paths."""
    npz_path, json_path = artifact_paths(path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    with open(npz_path, "wb") as handle:  # a file object keeps numpy from appending its own suffix
        # allow_pickle (numpy's default) is named so that no array name can be taken for it
        np.savez(handle, allow_pickle=True, **{k: np.asarray(v) for k, v in arrays.items()})
    json_path.write_text(json.dumps(meta, indent=1, default=_json_default))
    return npz_path, json_path


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what ``save_arrays`` wrote."""
    npz_path, json_path = artifact_paths(path)
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(json_path.read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def layer_role_block(name: str) -> tuple[str, int]:
    """(role, block) of a layer from its dotted name, by the model's role patterns; ("", -1) when none fits.

    A trailing ``.weight`` (a state-dict key) is ignored, so the same call serves modules and tensors.
    """
    from engine.models import ROLE_PATTERNS

    name = name.removesuffix(".weight")
    for pattern, role in ROLE_PATTERNS:
        match = re.search(pattern, name)
        if match:
            return role, int(match.group(1))
    return "", -1
