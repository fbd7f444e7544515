"""Helpers the analysis kinds share (leading underscore: ``engine.analysis.kinds`` does not import it as a kind)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from engine.artifacts import AdaptedModel


def load_trained(adapter_dir: Path, trust_remote_code: bool) -> AdaptedModel:
    """(meta, model, method): the trained adapter applied to its freshly loaded base model.

    ``trust_remote_code`` comes from the run's spec in the database (``run_trusts_remote_code``), not the files.
    """
    from engine.artifacts import load_adapted_model

    return load_adapted_model(adapter_dir, trust_remote_code=trust_remote_code)


def finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def value_at(alphas: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The value at coordinate ``target`` if it is a grid point, else None."""
    hits = np.flatnonzero(np.isclose(alphas, target, rtol=0.0, atol=1e-9))
    return finite(values[hits[0]]) if hits.size else None
