"""Method comparison over runs: filters, Pareto fronts, learning curves over seeds, config differences.

Inputs are plain DataFrames: a runs table (one row per run: ``run_id``, ``method``, ``model``, ``dataset``,
``seed``, ``tags``, ``trainable_params``, ``eval_accuracy``, ``ms_per_step``, ``peak_rss_mb``, ``spec`` as a dict
or JSON string, ...) and a metrics table in long form (``run_id``, ``step``, ``key``, ``value``).

Our choices:

* Pareto front (maximise accuracy, minimise trainable parameters): a run is on the front when no other run has
  at least its accuracy with at most its parameters and is strictly better in one of them; exact ties are all
  kept.
* Learning curves: each run's series (optionally EMA-smoothed, ``s₀ = x₀``, ``s_t = w s_{t−1} + (1 − w) x_t``)
  is linearly interpolated onto a common step grid, never extrapolated (NaN outside the run's steps); mean and
  sample standard deviation (ddof = 1; 0 with a single run) are taken over the runs present at each step.
* "Differences only": spec dicts are flattened to dotted keys; lists are compared by value; a key missing
  from a run counts as a value of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _as_set(values: str | Iterable[Any] | None) -> set[Any] | None:
    if values is None:
        return None
    return {values} if isinstance(values, str) else set(values)


def _tags_of(value: Any) -> set[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [t.strip() for t in value.split(",") if t.strip()]
    return set(value) if isinstance(value, (list, tuple, set)) else set()


def filter_runs(
    runs: pd.DataFrame,
    *,
    methods: str | Iterable[str] | None = None,
    models: str | Iterable[str] | None = None,
    datasets: str | Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    tags: str | Iterable[str] | None = None,
    status: str | Iterable[str] | None = None,
    run_ids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows whose column values are in the given sets (None: any). ``tags``: runs carrying all of them."""
    mask = pd.Series(True, index=runs.index)
    for column, allowed in (
        ("method", methods),
        ("model", models),
        ("dataset", datasets),
        ("seed", seeds),
        ("status", status),
        ("run_id", run_ids),
    ):
        allowed = _as_set(allowed)
        if allowed is not None:
            if column not in runs:
                raise KeyError(f"runs table has no column {column!r} to filter on")
            mask &= runs[column].isin(allowed)
    wanted = _as_set(tags)
    if wanted:
        mask &= runs["tags"].map(lambda t: wanted <= _tags_of(t))
    return runs[mask]


def pareto_mask(runs: pd.DataFrame, x: str = "trainable_params", y: str = "eval_accuracy") -> pd.Series:
    """True for runs on the front of maximal ``y`` and minimal ``x`` (rows with NaN in either are never on it)."""
    valid = runs[x].notna() & runs[y].notna()
    xs, ys = runs.loc[valid, x].to_numpy(float), runs.loc[valid, y].to_numpy(float)
    # dominated[i]: some j has x_j ≤ x_i and y_j ≥ y_i with one strict
    le_x, ge_y = xs[None, :] <= xs[:, None], ys[None, :] >= ys[:, None]
    strict = (xs[None, :] < xs[:, None]) | (ys[None, :] > ys[:, None])
    dominated = (le_x & ge_y & strict).any(axis=1)
    out = pd.Series(False, index=runs.index)
    out[valid[valid].index] = ~dominated
    return out


def pareto_front(runs: pd.DataFrame, x: str = "trainable_params", y: str = "eval_accuracy") -> pd.DataFrame:
    """The non-dominated runs sorted by ``x`` (then by descending ``y``): the front's line from left to right."""
    front = runs[pareto_mask(runs, x, y)]
    return front.sort_values([x, y], ascending=[True, False])


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average ``s_t = w s_{t−1} + (1 − w) x_t``, ``s₀ = x₀`` (weight 0: unchanged)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"EMA weight must be in [0, 1), got {weight}")
    x = np.asarray(values, dtype=float)
    out = np.empty_like(x)
    for i, v in enumerate(x):
        out[i] = v if i == 0 else weight * out[i - 1] + (1.0 - weight) * v
    return out


def step_grid(series: Iterable[np.ndarray], points: int = 200) -> np.ndarray:
    """The union of the runs' steps, or ``points`` evenly spaced steps over their span when the union is larger."""
    steps = np.unique(np.concatenate([np.asarray(s, dtype=float) for s in series] or [np.zeros(0)]))
    if len(steps) <= points:
        return steps
    return np.linspace(steps[0], steps[-1], points)


def learning_curves(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    key: str,
    *,
    group: str = "method",
    smoothing: float = 0.0,
    points: int = 200,
) -> pd.DataFrame:
    """Mean ± std of metric ``key`` over the runs of each ``group`` value, on a common step grid.

    Returns (group, step, mean, std, n) with n the number of runs contributing at that step.
    """
    selected = metrics[(metrics["key"] == key) & metrics["run_id"].isin(runs["run_id"])]
    group_of = dict(zip(runs["run_id"], runs[group]))
    rows = []
    per_group: dict[Any, list[tuple[np.ndarray, np.ndarray]]] = {}
    for run_id, frame in selected.groupby("run_id", sort=False):
        frame = frame.sort_values("step").drop_duplicates("step", keep="last")
        steps, values = frame["step"].to_numpy(float), frame["value"].to_numpy(float)
        if smoothing:
            values = ema(values, smoothing)
        per_group.setdefault(group_of[run_id], []).append((steps, values))
    for name, series in per_group.items():
        grid = step_grid([s for s, _ in series], points)
        stacked = np.stack(
            [np.where((grid >= s[0]) & (grid <= s[-1]), np.interp(grid, s, v), np.nan) for s, v in series]
        )
        n = np.sum(~np.isnan(stacked), axis=0)
        mean = np.nansum(stacked, axis=0) / np.maximum(n, 1)
        sq = np.nansum((stacked - mean) ** 2, axis=0)
        std = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), 0.0)
        for step, m, s, k in zip(grid, mean, std, n):
            if k:
                rows.append({"group": name, "step": step, "mean": m, "std": s, "n": int(k)})
    return pd.DataFrame(rows, columns=["group", "step", "mean", "std", "n"])


def method_summary(
    runs: pd.DataFrame,
    columns: Sequence[str] = ("eval_accuracy", "trainable_params", "ms_per_step", "peak_rss_mb"),
    group: str = "method",
) -> pd.DataFrame:
    """Mean, std (ddof = 1) and count of each column per group, e.g. for time/step and memory bars."""
    present = [c for c in columns if c in runs]
    stats = runs.groupby(group, sort=False)[present].agg(["mean", "std", "count"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    for c in present:
        stats[f"{c}_std"] = stats[f"{c}_std"].fillna(0.0)
    return stats.reset_index()


# --- config differences --------------------------------------------------------------------------


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists become tuples so values compare and hash."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, prefix=f"{path}.")
        else:
            out[path] = tuple(value) if isinstance(value, list) else value
    return out


def _spec_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return json.loads(value) if value.strip() else {}
    return dict(value) if isinstance(value, Mapping) else {}


_MISSING = "—"


def differences_only(runs: pd.DataFrame, spec_column: str = "spec", index: str = "run_id") -> pd.DataFrame:
    """The flattened spec keys whose values differ across ``runs``: one row per run, one column per key."""
    flat = [flatten(_spec_dict(v)) for v in runs[spec_column]]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({repr(f.get(k, _MISSING)) for f in flat}) > 1]
    data = {k: [f.get(k, _MISSING) for f in flat] for k in differing}
    table = pd.DataFrame(data, index=runs[index].to_list() if index in runs else runs.index, columns=differing)
    table.index.name = index
    return table


def export_csv(table: pd.DataFrame, path: str | Path | None = None) -> str:
    """The table as CSV text (dict and list cells as JSON); also written to ``path`` when given."""
    cells = table.map(lambda v: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v)
    text = cells.to_csv(index=table.index.name is not None)
    if path is not None:
        Path(path).write_text(text)
    return text
