"""A comparison report as one self-contained HTML file: ``python -m app.cli report`` and Compare's "Download report".

The file opens anywhere without a network: plotly's JavaScript is inlined once, the figures follow as plain
``<div>``s, and the styles are in the page. It holds, for the runs given:

* the groups (configurations: ``engine.analysis.groups``) with n, seeds, mean ± std and the 95 % t interval, the
  baselines of their model and data, and the paired differences of groups that share seeds;
* the groups' means with their intervals, and accuracy against trainable and stored (adapter) parameters with the
  Pareto front, baselines as reference lines;
* learning curves (evaluation metric and training loss) as the mean with its 95 % interval per group;
* the configuration fields that differ between the runs; time per step and peak memory per group;
* the singular-value spectra of ΔW of the runs that have one stored (``app.cli analyze ID --kind spectra``).

No Streamlit here: the command line builds the same file.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from app import charts
from app.summary import runs_frame, short_label
from db import store
from engine.analysis.compare import differences_only, learning_curves, method_summary, pareto_front
from engine.analysis.groups import assign_groups, baselines, format_interval, group_stats, paired_differences

MAX_SPECTRA = 6  # runs whose spectra are drawn (the newest that have one)
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
p.meta, p.note { color: #555; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
"""


class _Figures:
    """Figures as HTML fragments; the first carries plotly's JavaScript inline, the others reuse it."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, fig: go.Figure) -> str:
        fig.update_layout(width=None)
        fragment = fig.to_html(full_html=False, include_plotlyjs=self.count == 0, config={"displaylogo": False})
        self.count += 1
        return f'<div class="figure">{fragment}</div>'


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(rows: pd.DataFrame, numeric: Sequence[str] = ()) -> str:
    """A DataFrame as an escaped HTML table (empty cells for missing values)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows.columns)
    body = []
    for _, row in rows.iterrows():
        cells = []
        for column in rows.columns:
            css = ' class="num"' if column in numeric else ""
            cells.append(f"<td{css}>{html.escape(_cell(row[column]))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _stored_params(run: dict) -> float | None:
    """Parameters the run stores (its adapter: shared or pruned ones counted once), when recorded."""
    summary = run.get("summary") or {}
    value = summary.get("stored_params", summary.get("adapter_params"))
    return None if value is None else float(value)


def _short_names(layers: Sequence[str]) -> dict[str, str]:
    from engine.analysis import layer_role_block

    names = {}
    for layer in layers:
        role, block = layer_role_block(layer)
        names[layer] = f"{block}.{role}" if role and block >= 0 else layer
    return names if len(set(names.values())) == len(names) else {n: n for n in layers}


def _spectra(run_id: str):
    from engine.analysis.spectra import load_spectra

    paths = [Path(a["path"]) for a in store.list_artifacts(run_id, "analysis:spectra")]
    paths = [p for p in paths if p.suffix == ".json" and p.is_file()]
    return load_spectra(paths[-1]) if paths else None


def build_report(runs: list[dict], title: str = "PEFT Lab report", metric: str = "eval_accuracy") -> str:
    """The report of ``runs`` (any statuses; statistics use the succeeded ones) as one HTML document."""
    figures = _Figures()
    parts: list[str] = []
    frame = assign_groups(runs_frame(runs)) if runs else pd.DataFrame()
    done = frame[frame["status"] == "succeeded"] if len(frame) else frame
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    models = ", ".join(sorted(set(frame["model"]))) if len(frame) else ""
    datasets = ", ".join(sorted(set(frame["dataset"]))) if len(frame) else ""
    parts.append(f"<h1>{html.escape(title)}</h1><p class='meta'>{len(runs)} runs ({len(done)} succeeded) · "
                 f"models: {html.escape(models)} · data: {html.escape(datasets)} · {now}</p>")  # fmt: skip
    if done.empty:
        parts.append("<p class='note'>No succeeded run among these: nothing to compare yet.</p>")
        return _document(title, parts)

    # --- groups, baselines, paired differences ---------------------------------------------------------
    stats = group_stats(done, metric)
    base = baselines(done, metric)
    parts.append("<h2>Configurations</h2><p class='note'>A group is one configuration: the full spec minus the "
                 "training seed (run names and experiments are labels). Mean ± sample std over seeds and the 95 % "
                 "confidence interval of the mean (Student t).</p>")  # fmt: skip
    table = pd.DataFrame({
        "configuration": stats["group"], "model": stats["model"], "dataset": stats["dataset"],
        "method": stats["method"], "n": stats["n"], "seeds": stats["seeds"],
        metric: [format_interval(r) for r in stats.to_dict("records")],
        "trainable params": stats["trainable_params"], "ms/step": stats["ms_per_step"],
        "peak RSS (MiB)": stats["peak_rss_mb"],
    })  # fmt: skip
    parts.append(_table(table, numeric=("n", "trainable params", "ms/step", "peak RSS (MiB)")))
    if len(base):
        parts.append("<p class='note'>Baselines of the same model and evaluation data: majority class (the "
                     "evaluation split's most frequent label) and the linear probe (head-only runs).</p>")  # fmt: skip
        parts.append(_table(base.drop(columns=["eval_data"]), numeric=("value", "n")))
    pairs = paired_differences(done, metric)
    if len(pairs):
        parts.append("<h3>Paired differences (same model, evaluation data and seeds)</h3>")
        intervals = ["" if p["ci_low"] is None or p["ci_low"] != p["ci_low"] else
                     f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]" for p in pairs.to_dict("records")]  # fmt: skip
        shown = pd.DataFrame({
            "a": pairs["group_a"], "b": pairs["group_b"], "common seeds": pairs["seeds"],
            "mean a − b": pairs["mean"], "95 % CI": intervals, "p (paired t)": pairs["p_value"],
        })  # fmt: skip
        parts.append(_table(shown, numeric=("mean a − b", "p (paired t)")))
    parts.append(figures.html(charts.group_intervals_chart(stats, base, metric=metric)))

    # --- accuracy vs parameters ------------------------------------------------------------------------
    parts.append("<h2>Accuracy vs parameters</h2>")
    stored = {r["id"]: _stored_params(r) for r in runs}
    scored = done.assign(stored_params=done["run_id"].map(stored)).dropna(subset=[metric])
    for x, name in (("trainable_params", "trainable"), ("stored_params", "stored (adapter)")):
        points = scored.dropna(subset=[x])
        points = points[points[x] > 0]
        if points.empty:
            continue
        fig = charts.pareto_chart(points, pareto_front(points, x=x, y=metric), x=x, y=metric, color="group",
                                  title=f"{metric} vs {name} parameters (Pareto front dashed)")  # fmt: skip
        parts.append(figures.html(charts.add_baselines(fig, base)))

    # --- learning curves -------------------------------------------------------------------------------
    metrics = store.get_metrics(frame["run_id"].tolist())
    parts.append("<h2>Learning curves</h2><p class='note'>Mean over the seeds of each configuration, band: 95 % "
                 "interval of the mean at each step.</p>")  # fmt: skip
    for key in (metric, "train_loss"):
        curves = learning_curves(metrics, frame, key, group="group") if not metrics.empty else pd.DataFrame()
        if len(curves):
            fig = charts.learning_curve_bands(curves, title=key, y_title=key, band="ci")
            if key == metric:
                fig = charts.add_baselines(fig, base)
            parts.append(figures.html(fig))

    # --- configuration differences ---------------------------------------------------------------------
    parts.append("<h2>Configuration differences</h2>")
    diff = differences_only(frame)
    labels = dict(zip(frame["run_id"], frame["group"]))
    diff.insert(0, "configuration", [labels[r] for r in diff.index])
    diff.insert(1, "seed", frame.set_index("run_id").loc[diff.index, "seed"].tolist())
    diff.insert(2, metric, frame.set_index("run_id").loc[diff.index, metric].tolist())
    parts.append(_table(diff.reset_index(), numeric=(metric,)))

    # --- time and memory -------------------------------------------------------------------------------
    measured = done.dropna(subset=["ms_per_step", "peak_rss_mb"], how="all")
    if len(measured):
        parts.append("<h2>Time and memory</h2><p class='note'>Mean ± std per configuration; wall time depends on "
                     "the machine and what else ran on it.</p>")  # fmt: skip
        summary = method_summary(measured, columns=("ms_per_step", "peak_rss_mb"), group="group")
        parts.append(figures.html(charts.resource_bars(summary, group="group")))

    # --- spectra ---------------------------------------------------------------------------------------
    with_spectra = [(r, s) for r in runs[: 4 * MAX_SPECTRA] if (s := _spectra(r["id"])) is not None][:MAX_SPECTRA]
    if with_spectra:
        parts.append("<h2>Spectra of ΔW</h2>")
        for run, spectra in with_spectra:
            names = _short_names(list(spectra.sigmas))
            sigmas = {names[k]: v for k, v in spectra.sigmas.items()}
            title_ = f"Singular values of ΔW (log₁₀ σ): {short_label(run)}"
            parts.append(figures.html(charts.spectra_heatmap(sigmas, title=title_)))
    parts.append(f"<p class='meta'>Run ids: {html.escape(', '.join(frame['run_id']))}</p>")
    return _document(title, parts)


def _document(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")  # fmt: skip


def write_report(runs: list[dict], out: Path, title: str = "PEFT Lab report", metric: str = "eval_accuracy") -> Path:
    """Write ``build_report`` to ``out`` (its folder is created) and return the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(runs, title, metric), encoding="utf-8")
    return out
