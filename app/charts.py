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
    fig = _layout(fig, title or key, "step", key)
    if not fig.data:  # no axis running from −1 to 4 around nothing
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        fig.add_annotation(text="nothing logged yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


# --- analysis figures ---
# Builders for the analysis views (engine.analysis): spectra, importance, landscapes, method comparison.

from collections.abc import Mapping, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402


def _color(i: int) -> str:
    return METHOD_COLORS[i % len(METHOD_COLORS)]


def _log10_or_nan(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def spectra_heatmap(
    sigmas: Mapping[str, np.ndarray],
    *,
    log: bool = True,
    max_index: int | None = None,
    title: str = "Singular values of ΔW",
) -> go.Figure:
    """Layers × index heatmap of σ (log10 by default; zeros and padding are blank)."""
    layers = list(sigmas)
    width = max((len(s) for s in sigmas.values()), default=0)
    width = min(width, max_index) if max_index else width
    z = np.full((len(layers), width), np.nan)
    for i, name in enumerate(layers):
        s = np.asarray(sigmas[name], dtype=float)[:width]
        z[i, : len(s)] = _log10_or_nan(s) if log else np.where(s > 0, s, np.nan)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=np.arange(1, width + 1),
            y=layers,
            colorscale="Viridis",
            colorbar=dict(title="log₁₀ σ" if log else "σ"),
            hovertemplate="%{y}<br>i=%{x}<br>%{z:.3g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, "singular value index", "layer", height=max(320, 14 * len(layers) + 120))


def spectra_curves(
    sigmas: Mapping[str, np.ndarray],
    *,
    layers: Sequence[str] | None = None,
    energy: bool = False,
    log_y: bool = True,
    title: str | None = None,
) -> go.Figure:
    """σ against index per layer (or the normalised cumulative energy Σ_{i≤k} σᵢ² / Σσ² with ``energy``)."""
    fig = go.Figure()
    for i, name in enumerate(layers if layers is not None else list(sigmas)):
        s = np.asarray(sigmas[name], dtype=float)
        if energy:
            total = (s**2).sum()
            y = np.cumsum(s**2) / total if total > 0 else np.zeros_like(s)
        else:
            y = np.where(s > 0, s, np.nan)
        fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1), y=y, mode="lines", name=name, line=dict(color=_color(i))))
    fig = _layout(
        fig,
        title or ("Cumulative energy" if energy else "Singular values"),
        "index",
        "cumulative energy" if energy else "σ",
    )
    if log_y and not energy:
        fig.update_yaxes(type="log")
    return fig


def spectra_overlay(
    sigmas_by_run: Mapping[str, np.ndarray], layer: str, *, normalise: bool = False, log_y: bool = True
) -> go.Figure:
    """One layer's σ for several runs (``normalise`` divides each by its σ₁)."""
    fig = go.Figure()
    for i, (run, s) in enumerate(sigmas_by_run.items()):
        s = np.asarray(s, dtype=float)
        if normalise and s.size and s.max() > 0:
            s = s / s.max()
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, len(s) + 1),
                y=np.where(s > 0, s, np.nan),
                mode="lines+markers",
                name=run,
                line=dict(color=_color(i)),
            )
        )
    fig = _layout(fig, f"σ of {layer}", "index", "σ / σ₁" if normalise else "σ")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def table_figure(
    table: pd.DataFrame, *, columns: Sequence[str] | None = None, digits: int = 4, title: str = ""
) -> go.Figure:
    """A DataFrame as a plotly table (floats rounded to ``digits`` significant digits)."""
    columns = list(columns) if columns is not None else list(table.columns)

    def fmt(v):
        return f"{v:.{digits}g}" if isinstance(v, (float, np.floating)) and np.isfinite(v) else v

    cells = [[fmt(v) for v in table[c]] for c in columns]
    fig = go.Figure(go.Table(header=dict(values=columns, align="left"), cells=dict(values=cells, align="left")))
    fig.update_layout(
        title=title, margin=dict(l=10, r=10, t=40 if title else 10, b=10), height=min(800, 60 + 26 * (len(table) + 1))
    )
    return fig


def head_importance_heatmap(
    scores, keep_mask=None, *, blocks: Sequence[int] | None = None, title: str = "Head importance"
) -> go.Figure:
    """Blocks × heads heatmap of scores; heads whose ``keep_mask`` is 0 are marked with a cross (second trace)."""
    z = np.array([[np.nan if v is None else float(v) for v in row] for row in np.asarray(scores, dtype=object)])
    rows = list(blocks) if blocks is not None else list(range(z.shape[0]))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(z.shape[1])),
            y=rows,
            colorscale="Blues",
            colorbar=dict(title="score"),
            hovertemplate="block %{y}, head %{x}<br>%{z:.3g}<extra></extra>",
        )
    )
    if keep_mask is not None:
        mask = np.asarray(keep_mask, dtype=float)
        r, c = np.nonzero(mask == 0)
        fig.add_trace(
            go.Scatter(
                x=c.tolist(),
                y=[rows[i] for i in r],
                mode="markers",
                name="masked",
                marker=dict(symbol="x", size=12, color="#E45756"),
            )
        )
    fig.update_yaxes(type="category")
    fig.update_xaxes(type="category")
    return _layout(fig, title, "head", "block")


def sharing_chart(table: pd.DataFrame, *, title: str = "Adapter importance, pruning and sharing") -> go.Figure:
    """Bars of per-position scores (a ``sharing_table``: block, site, score, pruned, shares): kept and pruned.

    Pruned bars are labelled with the block whose adapter they now share.
    """
    label = table["site"].astype(str) + " · " + table["block"].astype(str)
    fig = go.Figure()
    for name, rows, color in (("kept", ~table["pruned"], "#4C78A8"), ("pruned", table["pruned"], "#BAB0AC")):
        part = table[rows]
        text = [f"→ {s}" if s is not None and not pd.isna(s) else "" for s in part["shares"]]
        fig.add_trace(
            go.Bar(x=label[rows], y=part["score"], name=name, marker_color=color, text=text, textposition="outside")
        )
    fig.update_xaxes(categoryorder="array", categoryarray=list(label))
    return _layout(fig, title, "site · block", "importance")


def router_loads_chart(history: pd.DataFrame, *, layer: str | None = None, title: str | None = None) -> go.Figure:
    """Expert loads over training as stacked areas, one trace per expert (``router_load_table`` rows).

    Without ``layer`` the loads are averaged over the layers.
    """
    frame = history if layer is None else history[history["layer"] == layer]
    mean = frame.groupby(["step", "expert"], as_index=False)["load"].mean()
    fig = go.Figure()
    for i, (expert, g) in enumerate(mean.groupby("expert")):
        fig.add_trace(
            go.Scatter(
                x=g["step"],
                y=g["load"],
                mode="lines",
                stackgroup="loads",
                name=f"expert {expert}",
                line=dict(color=_color(i)),
            )
        )
    return _layout(fig, title or f"Router loads{' — ' + layer if layer else ' (mean over layers)'}", "step", "load")


def router_mean_heatmap(means: pd.DataFrame, *, title: str = "Mean router load") -> go.Figure:
    """Layers × experts heatmap of whole-run mean loads (``router_mean_table`` rows)."""
    pivot = means.pivot(index="layer", columns="expert", values="load").reindex(means["layer"].unique())
    fig = go.Figure(go.Heatmap(z=pivot.to_numpy(), x=list(pivot.columns), y=list(pivot.index), colorscale="Oranges"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, "expert", "layer", height=max(320, 14 * len(pivot) + 120))


def norm_profile_chart(
    table: pd.DataFrame, *, value: str = "grad_norm", kind: str = "lines", log_y: bool = True, title: str | None = None
) -> go.Figure:
    """Per-layer ‖grad‖ or ‖Δθ‖ (``value``) over steps: one line per layer, or a layers × steps heatmap."""
    title = title or {"grad_norm": "Gradient norm per layer", "update_norm": "Update norm per layer"}.get(value, value)
    if kind == "heatmap":
        pivot = table.pivot_table(index="layer", columns="step", values=value, sort=False)
        z = _log10_or_nan(pivot.to_numpy()) if log_y else pivot.to_numpy()
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=list(pivot.columns),
                y=list(pivot.index),
                colorscale="Viridis",
                colorbar=dict(title=f"log₁₀ {value}" if log_y else value),
            )
        )
        fig.update_yaxes(autorange="reversed")
        return _layout(fig, title, "step", "layer", height=max(320, 14 * len(pivot) + 120))
    fig = go.Figure()
    for i, (layer, g) in enumerate(table.groupby("layer", sort=False)):
        fig.add_trace(go.Scatter(x=g["step"], y=g[value], mode="lines", name=layer, line=dict(color=_color(i))))
    fig = _layout(fig, title, "step", value)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def _landscape_z(result: Mapping, accuracy: bool) -> tuple[np.ndarray, str]:
    key = "accuracies" if accuracy else "losses"
    if key not in result:
        raise KeyError(f"landscape has no {key}")
    return np.asarray(result[key], dtype=float), "accuracy" if accuracy else "loss"


def landscape_contour(result: Mapping, *, accuracy: bool = False, title: str | None = None) -> go.Figure:
    """Contour of a 2-D landscape (``losses[i, j]`` at ``alphas[i], betas[j]``) with the solution marked."""
    z, label = _landscape_z(result, accuracy)
    fig = go.Figure(
        go.Contour(
            x=result["alphas"],
            y=result["betas"],
            z=z.T,
            colorscale="Viridis",
            contours=dict(showlabels=True),
            colorbar=dict(title=label),
        )
    )
    fig.add_trace(
        go.Scatter(x=[0.0], y=[0.0], mode="markers", name="trained", marker=dict(symbol="star", size=12, color="white"))
    )
    return _layout(fig, title or f"{label.capitalize()} landscape", "α (direction 1)", "β (direction 2)", height=420)


def landscape_surface(result: Mapping, *, accuracy: bool = False, title: str | None = None) -> go.Figure:
    """3-D surface of a 2-D landscape."""
    z, label = _landscape_z(result, accuracy)
    fig = go.Figure(go.Surface(x=result["alphas"], y=result["betas"], z=z.T, colorscale="Viridis"))
    fig.update_layout(
        title=title or f"{label.capitalize()} surface",
        height=480,
        margin=dict(l=0, r=0, t=40, b=0),
        scene=dict(xaxis_title="α", yaxis_title="β", zaxis_title=label),
    )
    return fig


def landscape_curves(
    results: Mapping[str, Mapping], *, accuracy: bool = False, log_y: bool = False, title: str | None = None
) -> go.Figure:
    """1-D landscapes or interpolations of several runs overlaid, one line per run."""
    fig = go.Figure()
    kinds = set()
    for i, (run, result) in enumerate(results.items()):
        z, label = _landscape_z(result, accuracy)
        kinds.add(result.get("kind"))
        fig.add_trace(go.Scatter(x=result["alphas"], y=z, mode="lines", name=run, line=dict(color=_color(i))))
    x_title = "t (0: start, 1: end)" if kinds == {"interpolation"} else "α"
    fig = _layout(
        fig,
        title or ("Accuracy" if accuracy else "Loss") + " along the direction",
        x_title,
        "accuracy" if accuracy else "loss",
    )
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def pareto_chart(
    runs: pd.DataFrame,
    front: pd.DataFrame,
    *,
    x: str = "trainable_params",
    y: str = "eval_accuracy",
    color: str = "method",
    log_x: bool = True,
    title: str = "Accuracy vs trainable parameters",
):
    """Runs as points (one trace per ``color`` value) and the Pareto front (``compare.pareto_front``) as a line."""
    fig = go.Figure()
    for i, (name, g) in enumerate(runs.groupby(color, sort=False)):
        hover = g["run_id"] if "run_id" in g else None
        fig.add_trace(
            go.Scatter(x=g[x], y=g[y], mode="markers", name=str(name), text=hover, marker=dict(size=9, color=_color(i)))
        )
    fig.add_trace(
        go.Scatter(
            x=front[x], y=front[y], mode="lines", name="Pareto front", line=dict(color="black", dash="dash", shape="hv")
        )
    )
    fig = _layout(fig, title, x, y, height=380)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def learning_curve_bands(
    curves: pd.DataFrame,
    *,
    log_y: bool = False,
    title: str = "Learning curves",
    y_title: str = "value",
    band: str = "std",
) -> go.Figure:
    """Mean ± std per group (``compare.learning_curves`` rows): a shaded band and a mean line per group. With
    ``band="ci"`` the band is the 95 % Student-t interval of the mean at each step (none where one run is present)."""
    from scipy import stats

    fig = go.Figure()
    for i, (name, g) in enumerate(curves.groupby("group", sort=False)):
        color = _color(i)
        width = g["std"]
        if band == "ci":
            n = g["n"].to_numpy(float)
            t = stats.t.ppf(0.975, np.maximum(n - 1, 1))
            width = pd.Series(np.where(n > 1, t * g["std"].to_numpy(float) / np.sqrt(np.maximum(n, 1)), 0.0),
                              index=g.index)  # fmt: skip
        upper, lower = g["mean"] + width, g["mean"] - width
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([g["step"], g["step"][::-1]]),
                y=np.concatenate([upper, lower[::-1]]),
                fill="toself",
                fillcolor=_rgba(color, 0.2),
                line=dict(width=0),
                hoverinfo="skip",
                showlegend=False,
                name=f"{name} ± {'95 % CI' if band == 'ci' else 'std'}",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=g["step"],
                y=g["mean"],
                mode="lines",
                name=str(name),
                line=dict(color=color),
                customdata=g[["std", "n"]],
                hovertemplate="%{y:.4g} ± %{customdata[0]:.2g} (n=%{customdata[1]})<extra>" + str(name) + "</extra>",
            )
        )
    fig = _layout(fig, title, "step", y_title)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def resource_bars(
    summary: pd.DataFrame,
    *,
    columns: Sequence[str] = ("ms_per_step", "peak_rss_mb"),
    group: str = "method",
    titles: Sequence[str] = ("time per step (ms)", "peak memory (MB)"),
):
    """Side-by-side bars (mean ± std per group, from ``compare.method_summary``), one subplot per column."""
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=list(titles)[: len(columns)])
    for k, column in enumerate(columns):
        fig.add_trace(
            go.Bar(
                x=summary[group],
                y=summary[f"{column}_mean"],
                name=column,
                showlegend=False,
                error_y=dict(type="data", array=summary.get(f"{column}_std"), visible=True),
                marker_color=[_color(i) for i in range(len(summary))],
            ),
            row=1,
            col=k + 1,
        )
    fig.update_layout(height=320, margin=dict(l=40, r=10, t=40, b=40), template="plotly_white")
    return fig


# --- groups of runs (engine.analysis.groups) ---


def add_baselines(fig: go.Figure, baselines: pd.DataFrame, *, vertical: bool = False) -> go.Figure:
    """Dotted reference lines (``groups.baselines`` rows: majority class, linear probe) with their labels; on the
    y axis, or on the x axis with ``vertical`` (a figure whose values run along x)."""
    dash = {"majority class": "dot", "linear probe": "dash"}
    several = baselines["dataset"].nunique() > 1 or baselines["model"].nunique() > 1 if len(baselines) else False
    for _, b in baselines.iterrows():
        label = f"{b['baseline']} {b['value']:.3f}" + (f" ({b['model']}, {b['dataset']})" if several else "")
        line = dict(color="#555", dash=dash.get(b["baseline"], "dot"), width=1)
        if vertical:
            fig.add_vline(x=b["value"], line=line, annotation_text=label, annotation_position="top")
        else:
            fig.add_hline(y=b["value"], line=line, annotation_text=label, annotation_position="bottom right")
    return fig


def group_intervals_chart(
    stats: pd.DataFrame, baselines: pd.DataFrame | None = None, *, metric: str = "eval_accuracy",
    title: str = "Mean over seeds with 95 % CI",
) -> go.Figure:  # fmt: skip
    """One row per group (``groups.group_stats``): the mean as a dot, the 95 % t interval as error bars, the seeds'
    count in the label; baselines as vertical reference lines."""
    fig = go.Figure()
    ordered = stats.sort_values("mean", na_position="first")
    labels = [f"{g} (n={n})" for g, n in zip(ordered["group"], ordered["n"])]
    low = (ordered["mean"] - ordered["ci_low"].astype(float)).fillna(0.0)
    high = (ordered["ci_high"].astype(float) - ordered["mean"]).fillna(0.0)
    fig.add_trace(
        go.Scatter(
            x=ordered["mean"], y=labels, mode="markers", name="mean", marker=dict(size=10, color=_color(0)),
            error_x=dict(type="data", symmetric=False, array=high, arrayminus=low, visible=True),
            hovertemplate="%{x:.4f}<extra>%{y}</extra>", showlegend=False,
        )
    )  # fmt: skip
    if baselines is not None and len(baselines):
        add_baselines(fig, baselines, vertical=True)
    return _layout(fig, title, metric, "", height=max(260, 40 * len(ordered) + 140))
