"""Compare: filter runs, group them by configuration (the full spec minus the seed) with n, mean, std and the 95 %
interval, paired differences on common seeds, majority-class and linear-probe baselines, accuracy against trainable
parameters with the Pareto front, learning curves as mean ± 95 % CI, a table of the runs with their (differing)
configs, time per step and peak memory, and the whole comparison as one HTML report."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts
from app.analysis_common import display_table
from app.summary import runs_frame
from db import store
from engine.analysis.compare import (
    differences_only,
    export_csv,
    filter_runs,
    flatten,
    learning_curves,
    method_summary,
    pareto_front,
    pareto_mask,
)
from engine.analysis.groups import assign_groups, baselines, format_interval, group_stats, paired_differences
from engine.metrics import DIRECTION, METRICS

st.title("Compare runs")
runs = store.list_runs(limit=None)
if not runs:
    st.info("No runs yet: launch some on the Launch page, then compare them here.")
    st.stop()
frame = assign_groups(runs_frame(runs)).rename(columns={"group": "configuration"})


def options(column: str) -> list:
    return sorted(frame[column].dropna().unique().tolist())


def from_url(name: str, choices: list, default: list | None = None) -> list:
    """A filter's starting value from the URL (``?model=minilm-l6&method=lora,neat``), so a view can be shared."""
    wanted = [v for v in (st.query_params.get(name) or "").split(",") if v in choices]
    return wanted or (default or [])


c = st.columns(7)
methods = c[0].multiselect("Method", options("method"), from_url("method", options("method")), key="f_method")
models = c[1].multiselect("Model", options("model"), from_url("model", options("model")), key="f_model")
datasets = c[2].multiselect("Dataset", options("dataset"), from_url("dataset", options("dataset")), key="f_dataset")
experiments = c[3].multiselect(
    "Experiment", options("experiment"), from_url("experiment", options("experiment")), key="f_experiment"
)
tags = c[4].multiselect("Tags (all of)", sorted({t for ts in frame["tags"] for t in ts}), key="f_tags")
statuses = c[5].multiselect(
    "Status", options("status"), from_url("status", options("status"), ["succeeded"]), key="f_status"
)
study_ids = sorted({r["study_id"] for r in runs if r.get("study_id")})
chosen_studies = c[6].multiselect("Study", study_ids, from_url("study", study_ids), key="f_study")

filtered = filter_runs(
    frame, methods=methods or None, models=models or None, datasets=datasets or None, tags=tags or None,
    status=statuses or None,
)  # fmt: skip
if experiments:
    filtered = filtered[filtered["experiment"].isin(experiments)]
if chosen_studies:  # a study's trials (?study=ID from the Studies page)
    in_study = {r["id"] for r in runs if r.get("study_id") in chosen_studies}
    filtered = filtered[filtered["run_id"].isin(in_study)]
if filtered.empty:
    st.info("No run matches these filters: widen them (e.g. clear the status filter).")
    st.stop()
labels = dict(zip(frame["run_id"], frame["label"]))
candidates = filtered["run_id"].tolist()
# Keyed by the candidates, so that changing a filter starts again from all the runs it lets through.
chosen_ids = st.multiselect(
    "Runs", candidates, default=candidates, format_func=labels.get, key=f"runs_{hash(tuple(candidates))}"
)
if not chosen_ids:
    st.info("No run selected.")
    st.stop()
GROUPS = ["configuration", "method", "name", "model", "dataset", "experiment"]
group = st.selectbox(
    "Group by", GROUPS, index=GROUPS.index(from_url("group", GROUPS, ["configuration"])[0]), key="group",
    help="curves and bars average the runs of each group; a configuration is the full spec minus the seed "
    "(run names and experiments are labels)",
)  # fmt: skip
# Sorted by group, so every figure meets the groups in the same order and gives each the same colour.
chosen = filtered[filtered["run_id"].isin(chosen_ids)].sort_values([group, "run_id"], kind="stable")
group_order = {name: i for i, name in enumerate(dict.fromkeys(chosen[group]))}
chosen_runs = [r for r in runs if r["id"] in set(chosen["run_id"])]


def report_html() -> str:
    """The comparison as one self-contained HTML file (built when the button is clicked)."""
    from app.report import build_report

    return build_report(chosen_runs, title="PEFT Lab comparison")


st.download_button("Download report", report_html, file_name="peftlab-report.html", mime="text/html",
                   icon=":material/download:", key="report",
                   help="One HTML file with every table and figure below; opens offline")  # fmt: skip

# --- configurations: n, mean, std, 95 % CI, paired differences, baselines ------------------------------
st.subheader("Configurations (mean over seeds, 95 % CI)")
done = chosen[chosen["status"] == "succeeded"].rename(columns={"configuration": "group"})
base = baselines(done) if len(done) else pd.DataFrame(columns=["model", "dataset", "baseline", "value", "n"])
if done.empty or done["eval_accuracy"].isna().all():
    st.info("No succeeded run with a final accuracy among these yet: intervals appear once runs finish.")
else:
    stats = group_stats(done)
    shown = pd.DataFrame({
        "configuration": stats["group"], "method": stats["method"], "model": stats["model"],
        "dataset": stats["dataset"], "n": stats["n"], "seeds": [", ".join(map(str, s)) for s in stats["seeds"]],
        "accuracy: mean ± std [95 % CI]": [format_interval(r) for r in stats.to_dict("records")],
        "trainable params": stats["trainable_params"],
    })  # fmt: skip
    st.dataframe(display_table(shown), hide_index=True, width="stretch", key="groups_table")
    left, right = st.columns([3, 2])
    left.plotly_chart(charts.group_intervals_chart(stats, base), key="group_intervals")
    with right:
        if len(base):
            st.caption("Baselines (same model and evaluation data)")
            st.dataframe(display_table(base.drop(columns=["eval_data"])), hide_index=True, key="baselines")
        pairs = paired_differences(done)
        if len(pairs):
            st.caption("Paired differences on common seeds (a − b)")
            st.dataframe(display_table(pd.DataFrame({
                "a": pairs["group_a"], "b": pairs["group_b"], "n": pairs["n"],
                "mean a − b": [format_interval(p, 4) for p in pairs.to_dict("records")],
                "p (paired t)": pairs["p_value"].map(lambda p: "" if p is None or p != p else f"{p:.3f}"),
            })), hide_index=True, key="paired")  # fmt: skip

# --- a metric vs trainable parameters ------------------------------------------------------------------
st.subheader("Metric vs trainable parameters")
finals = {r["id"]: (r.get("summary") or {}).get("final_metrics") or {} for r in runs}
recorded = [m for m in METRICS if DIRECTION[m] == "max" and any(m in finals[i] for i in chosen["run_id"])]
recorded = recorded or ["eval_accuracy"]
start = recorded.index(from_url("metric", recorded, recorded[:1])[0])
metric = st.selectbox("Metric", recorded, index=start, key="pareto_metric",
                      help="a higher-is-better metric the runs recorded (engine.metrics)")  # fmt: skip
chosen[metric] = pd.to_numeric(chosen["run_id"].map(lambda i: finals[i].get(metric)), errors="coerce")
scored = chosen.dropna(subset=[metric, "trainable_params"])
if scored.empty:
    st.info(f"None of these runs has both a final {metric} and a trainable-parameter count yet.")
else:
    log_x = st.checkbox("log-scale parameters", value=True, key="pareto_log")
    front = pareto_front(scored, y=metric)
    title = f"{metric} vs trainable parameters"
    fig = charts.pareto_chart(scored, front, y=metric, color=group, log_x=log_x, title=title)
    if metric == "eval_accuracy":  # the baselines are accuracies
        fig = charts.add_baselines(fig, base)
    st.plotly_chart(fig, key="pareto")
    st.caption(f"Pareto front: {', '.join(front['label'])}")

# --- learning curves ---------------------------------------------------------------------------------
st.subheader("Learning curves (mean ± 95 % CI over the runs of each group)")
metrics = store.get_metrics(chosen["run_id"].tolist())
keys = sorted(set(metrics["key"])) if not metrics.empty else []
eval_keys = [k for k in keys if k.startswith("eval_")]
train_keys = [k for k in keys if k.startswith("train_")]
if not eval_keys and not train_keys:
    st.info("These runs have logged no metrics yet.")
else:
    c = st.columns(4)
    eval_key = c[0].selectbox("Eval metric", eval_keys, key="eval_key") if eval_keys else None
    train_key = c[1].selectbox("Train metric", train_keys, key="train_key") if train_keys else None
    smoothing = c[2].slider("Smoothing (EMA weight)", 0.0, 0.95, 0.0, 0.05, key="smoothing")
    log_y = c[3].checkbox("log-scale values", value=False, key="curves_log")
    left, right = st.columns(2)
    for column, key in ((left, eval_key), (right, train_key)):
        if key is None:
            continue
        curves = learning_curves(metrics, chosen, key, group=group, smoothing=smoothing)
        curves = curves.sort_values("group", key=lambda g: g.map(group_order), kind="stable")
        fig = charts.learning_curve_bands(curves, log_y=log_y, title=key, y_title=key, band="ci")
        if key == "eval_accuracy":
            fig = charts.add_baselines(fig, base)
        column.plotly_chart(fig, key=f"curves_{key}")

# --- table -------------------------------------------------------------------------------------------
st.subheader("Runs")
diff_only = st.toggle("Config: differences only", value=True, key="diff_only")
chosen["pareto"] = pareto_mask(chosen, y=metric)
summary_columns = ["run_id", "label", "configuration", "method", "model", "dataset", "seed", "status", "eval_accuracy",
                   "eval_loss", "trainable_params", "stored_params", "stored_bytes", "ms_per_step", "peak_rss_mb",
                   "pareto"]  # fmt: skip
summary_columns += [metric] if metric not in summary_columns else []
if diff_only:
    config = differences_only(chosen)
else:
    config = pd.DataFrame([flatten(s) for s in chosen["spec"]], index=chosen["run_id"].tolist())
config.columns = [f"spec.{c}" for c in config.columns]
table = chosen[summary_columns].set_index("run_id").join(config)
table.index.name = "run_id"
st.dataframe(display_table(table), width="stretch", key="runs_table")
st.download_button("Download table (CSV)", export_csv(table), file_name="comparison.csv", mime="text/csv",
                   key="csv")  # fmt: skip

# --- resources ---------------------------------------------------------------------------------------
st.subheader("Time per step and peak memory (mean ± std per group)")
measured = chosen.dropna(subset=["ms_per_step", "peak_rss_mb"], how="all")
if measured.empty:
    st.info("No timings yet: they are recorded when a run finishes.")
else:
    summary = method_summary(measured, columns=("ms_per_step", "peak_rss_mb"), group=group)
    st.plotly_chart(charts.resource_bars(summary, group=group), key="resources")
