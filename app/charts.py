"""Plotly figure builders: data in, figure out. Pages call these; tests check their traces."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

METHOD_COLORS = [
    "#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC",
]  # fmt: skip


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(
        title=title, xaxis_title=x, yaxis_title=y, height=height, margin=dict(l=40, r=10, t=40, b=40),
        legend=dict(orientation="h", y=-0.25), template="plotly_white",
    )  # fmt: skip
    return fig


def metric_curves(metrics: pd.DataFrame, key: str, labels: dict[str, str] | None = None, title: str | None = None):
    """One line per run of metric ``key`` against step. ``metrics`` has run_id, step, key, value."""
    fig = go.Figure()
    df = metrics[metrics["key"] == key] if not metrics.empty else metrics
    for i, (run_id, g) in enumerate(df.groupby("run_id", sort=False)):
        fig.add_trace(
            go.Scatter(
                x=g["step"], y=g["value"], mode="lines+markers" if len(g) < 30 else "lines",
                name=(labels or {}).get(run_id, run_id), line=dict(color=METHOD_COLORS[i % len(METHOD_COLORS)]),
            )
        )  # fmt: skip
    return _layout(fig, title or key, "step", key)
