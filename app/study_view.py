"""What the Study page shows, as plain functions of a study's trials: the trial table, and the figures (parallel
coordinates, the metric against each searched field, every trial's evaluation curve). No Streamlit here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

STOPPED_GREY = "rgba(150,150,150,0.45)"


def trials_table(trials: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """One row per trial: its number, status, the searched fields' values, its metric and a link to Run detail."""
    rows = []
    for t in trials:
        final = (t["summary"] or {}).get("final_metrics", {})
        rows.append(
            {"trial": int(t["id"].rsplit("-t", 1)[-1]), "status": t["status"]}
            | {k: _plain(v) for k, v in (t["trial_params"] or {}).items()}
            | {
                metric: final.get(metric),
                "progress": float(t["progress"] or 0.0),
                "error": t["error"] or "",
                "detail": f"/run_detail?run={t['id']}",
            }  # fmt: skip
        )
    return pd.DataFrame(rows)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def searched_fields(table: pd.DataFrame, metric: str) -> list[str]:
    """The fields the trials differ in (a single seed, say, is not worth an axis)."""
    fixed = {"trial", "status", metric, "progress", "error", "detail"}
    return [c for c in table.columns if c not in fixed and table[c].astype(str).nunique() > 1]


def _axis(values: pd.Series, label: str) -> dict[str, Any]:
    """A parallel-coordinates axis: numbers as they are (log scale shown as log10 when they span decades),
    anything else as category codes with their names as ticks."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        v = values.astype(float)
        if (v > 0).all() and v.max() / v.min() >= 100:
            return {"label": f"log10 {label}", "values": np.log10(v)}
        return {"label": label, "values": v}
    cats = sorted(values.astype(str).unique())
    codes = values.astype(str).map({c: i for i, c in enumerate(cats)})
    return {"label": label, "values": codes, "tickvals": list(range(len(cats))), "ticktext": cats}


def parallel_coordinates(table: pd.DataFrame, metric: str, mode: str = "max") -> go.Figure:
    """Each finished trial is a line through its searched values to its metric, coloured by the metric."""
    done = table.dropna(subset=[metric])
    fields = searched_fields(done, metric)
    fig = go.Figure()
    if done.empty or not fields:
        return fig.update_layout(title="Parallel coordinates (no finished trial yet)", height=360)
    dims = [_axis(done[f], f) for f in fields] + [{"label": metric, "values": done[metric].astype(float)}]
    fig.add_trace(go.Parcoords(
        line={"color": done[metric].astype(float), "colorscale": "Viridis", "reversescale": mode == "min",
              "showscale": True},
        dimensions=dims,
    ))  # fmt: skip
    return fig.update_layout(title=f"Searched fields against {metric}", height=380, margin={"l": 60, "r": 40})


def sensitivity(table: pd.DataFrame, metric: str) -> list[go.Figure]:
    """The metric against each searched field (log x for fields spanning decades); stopped trials in grey."""
    done = table.dropna(subset=[metric])
    figs = []
    for field in searched_fields(done, metric):
        fig = go.Figure()
        for stopped, part in done.groupby(done["status"] == "stopped"):
            fig.add_trace(go.Scatter(
                x=part[field], y=part[metric], mode="markers", name="stopped early" if stopped else "finished",
                marker={"size": 9, "color": STOPPED_GREY if stopped else None},
                text=[f"trial {n}" for n in part["trial"]],
            ))  # fmt: skip
        values = done[field]
        log = pd.api.types.is_numeric_dtype(values) and (values > 0).all() and values.max() / values.min() >= 100
        fig.update_layout(title=f"{metric} vs {field}", xaxis_title=field, yaxis_title=metric, height=300,
                          xaxis_type="log" if log else None, margin={"t": 40, "b": 40})  # fmt: skip
        figs.append(fig)
    return figs


def eval_curves(metrics: pd.DataFrame, trials: list[dict[str, Any]], metric: str) -> go.Figure:
    """Every trial's ``metric`` against the step; stopped trials greyed, so the survivors stand out."""
    fig = go.Figure()
    status = {t["id"]: t["status"] for t in trials}
    number = {t["id"]: int(t["id"].rsplit("-t", 1)[-1]) for t in trials}
    for run_id, part in metrics[metrics["key"] == metric].groupby("run_id"):
        stopped = status.get(run_id) == "stopped"
        fig.add_trace(go.Scatter(
            x=part["step"], y=part["value"], mode="lines+markers", name=f"trial {number.get(run_id, '?')}",
            line={"color": STOPPED_GREY} if stopped else {}, opacity=0.6 if stopped else 1.0,
        ))  # fmt: skip
    return fig.update_layout(title=f"{metric} of every trial (grey: stopped early)", xaxis_title="step",
                             yaxis_title=metric, height=360)  # fmt: skip
