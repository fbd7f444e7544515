"""Plotly figures of the Merge page (data in, figure out): the merge weights of the sources, and every source
checkpoint's accuracy beside the merges (the figure the MWA paper argues from)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from app.charts import METHOD_COLORS, _layout

SOURCE_COLOR, LAST_COLOR = "#BAB0AC", "#4C78A8"


def source_label(source: dict[str, Any]) -> str:
    """``step 47`` for a kept checkpoint of one run; the run id for a run's final adapter."""
    return source["run_id"] if source.get("final") else f"step {source['step']}"


def merge_weights_chart(sources: Sequence[dict[str, Any]], title: str = "Merge weights") -> go.Figure:
    """One bar per source: its weight, with the loss and step it was computed from in the hover."""
    fig = go.Figure(
        go.Bar(
            x=[source_label(s) for s in sources], y=[s["weight"] for s in sources], name="weight",
            marker_color=LAST_COLOR, customdata=[[s["loss"], s["step"]] for s in sources],
            hovertemplate="%{x}<br>weight %{y:.4f}<br>loss %{customdata[0]:.4f}<br>step %{customdata[1]}"
            "<extra></extra>",
        )
    )  # fmt: skip
    return _layout(fig, title, "source", "weight")


def merge_accuracy_chart(
    sources: Sequence[dict[str, Any]], merged: Sequence[tuple[str, float]], title: str = "Accuracy"
) -> go.Figure:
    """Every source's evaluation accuracy (the last kept checkpoint highlighted as ``last``), then one bar per
    merge (``uniform``, ``mwa loss p=2``, ...), all on one axis."""
    fig = go.Figure()
    one_run = bool(sources) and not any(s.get("final") for s in sources)
    labels = [source_label(s) for s in sources]
    accuracies = [s.get("eval_accuracy") for s in sources]
    colors = [LAST_COLOR if one_run and i == len(sources) - 1 else SOURCE_COLOR for i in range(len(sources))]
    fig.add_trace(go.Bar(x=labels, y=accuracies, name="sources", marker_color=colors,
                         hovertemplate="%{x}: %{y:.4f}<extra></extra>"))  # fmt: skip
    if one_run:
        fig.add_trace(go.Bar(x=["last"], y=[accuracies[-1]], name="last checkpoint", marker_color=LAST_COLOR,
                             hovertemplate="last checkpoint: %{y:.4f}<extra></extra>"))  # fmt: skip
    for i, (label, accuracy) in enumerate(merged):
        fig.add_trace(go.Bar(x=[label], y=[accuracy], name=label, marker_color=METHOD_COLORS[(i + 1) % 10],
                             hovertemplate=f"{label}: %{{y:.4f}}<extra></extra>"))  # fmt: skip
    values = [a for a in accuracies if a is not None] + [a for _, a in merged]
    if values:
        low, high = min(values), max(values)
        pad = max(0.01, (high - low) * 0.5)
        fig.update_yaxes(range=[max(0.0, low - pad), min(1.0, high + pad)])
    fig.update_layout(showlegend=True, bargap=0.25)
    return _layout(fig, title, "", "eval accuracy", height=360)
