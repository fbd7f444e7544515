"""Runs: every run with its status, progress and live curves; cancel; errors and log tails of failures."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts
from app.common import STATUS_ICONS, elapsed_s, final_accuracy, format_duration, resume_button, run_label
from db import store
from db import studies as db_studies
from engine.methods import method_names

st.title("Runs")

c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
status_filter = c1.multiselect("Status", list(STATUS_ICONS), default=[], key="status_filter")
method_filter = c2.multiselect("Method", method_names(), default=[], key="method_filter")
studies = [""] + [s["id"] for s in db_studies.list_studies()]
wanted = st.query_params.get("study")  # ?study=ID: a study's trials, linked from the Studies page
study_filter = c3.selectbox(
    "Study", studies, index=studies.index(wanted) if wanted in studies else 0, key="study_filter",
    format_func=lambda s: s or "all runs",
)  # fmt: skip
limit = c4.number_input("Show at most", min_value=10, value=200, step=50)


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """Status, name, method, accuracy and progress first (they stay in view on a narrow screen). The accuracy is the
    final one, or a running run's last evaluation; missing values are blank, never None."""
    live = store.latest_metrics([r["id"] for r in runs if final_accuracy(r) is None])
    accuracy = [final_accuracy(r) if final_accuracy(r) is not None else live.get(r["id"], {}).get("eval_accuracy")
                for r in runs]  # fmt: skip
    return pd.DataFrame(
        {
            "status": [r["status"] for r in runs],
            "name": [r["name"] or r["method"] for r in runs],
            "method": [r["method"] for r in runs],
            "eval accuracy": ["" if a is None else f"{a:.4f}" for a in accuracy],
            "progress": [float(r["progress"] or 0.0) for r in runs],
            "detail": [f"/run_detail?run={r['id']}" for r in runs],
            "elapsed": [format_duration(elapsed_s(r)) for r in runs],
            "seed": [r["seed"] for r in runs],
            "model": [r["model"] for r in runs],
            "dataset": [r["dataset"] for r in runs],
            "trainable params": ["" if r["trainable_params"] is None else f"{r['trainable_params']:,}" for r in runs],
            "attempt": [r["attempt"] for r in runs],
            "stored params": [
                "" if (r.get("summary") or {}).get("stored_params") is None else f"{r['summary']['stored_params']:,}"
                for r in runs
            ],
            "run": [r["id"] for r in runs],
            "study": [f"/study?study={r['study_id']}" if r.get("study_id") else "" for r in runs],
        }
    )


@st.fragment(run_every=2.0)
def live_runs() -> None:
    """Re-runs every 2 s on its own: the table and curves update without reloading the page. Reading the runs
    applies the liveness rule, so a run whose worker died shows as lost (and the keeper retries it)."""
    runs = store.list_runs(status=status_filter or None, methods=method_filter or None, study=study_filter or None,
                           limit=int(limit))  # fmt: skip
    if not runs:
        st.info("No runs yet: launch some on the Launch page.")
        return
    active = [r for r in runs if r["status"] in ("queued", "running")]
    counts = pd.Series([r["status"] for r in runs]).value_counts()
    st.caption(" · ".join(f"{STATUS_ICONS[s]} {s}: {counts[s]}" for s in STATUS_ICONS if counts.get(s, 0)))
    st.dataframe(
        runs_table(runs),
        hide_index=True,
        width="stretch",
        column_config={
            "status": st.column_config.TextColumn("status", width=90),
            "name": st.column_config.TextColumn("name", width=170),
            "method": st.column_config.TextColumn("method", width=90),
            "eval accuracy": st.column_config.TextColumn(
                "eval accuracy", width=95, help="final, or the last evaluation of a running run"
            ),
            "progress": st.column_config.ProgressColumn(
                "progress", min_value=0.0, max_value=1.0, format="percent", width=110
            ),
            "detail": st.column_config.LinkColumn("detail", display_text="open", width=60),
            "elapsed": st.column_config.TextColumn("elapsed", width=70),
            "seed": st.column_config.NumberColumn("seed", width=50),
            "study": st.column_config.LinkColumn("study", display_text=r"study=(.*)$"),
        },
        key="runs_table",
    )
    # Live curves: the active runs, else the latest few.
    shown = (active or runs)[:8]
    metrics = store.get_metrics([r["id"] for r in shown], keys=["train_loss", "eval_accuracy"])
    labels = {r["id"]: f"{r['method']} s{r['seed']} ({r['id'][-6:]})" for r in shown}
    left, right = st.columns(2)
    left.plotly_chart(charts.metric_curves(metrics, "train_loss", labels, "training loss"), key="live_loss")
    right.plotly_chart(charts.metric_curves(metrics, "eval_accuracy", labels, "validation accuracy"), key="live_acc")

    if active:
        c1, c2 = st.columns([4, 1])
        labels_all = {r["id"]: run_label(r) for r in active}
        target = c1.selectbox("Active run", list(labels_all), format_func=labels_all.get, key="cancel_target")
        if c2.button("Cancel run", key="cancel"):
            from jobs.runs import cancel_run

            cancel_run(target)
            st.toast(f"cancelled {target}")

    stopped = [r for r in runs if r["status"] in ("failed", "lost", "cancelled")][:5]
    for r in stopped:
        with st.expander(run_label(r), icon=STATUS_ICONS[r["status"]]):
            from jobs.runs import job_logs

            st.error(r["error"] or "no error recorded")
            resume_button(r, key=f"resume_{r['id']}")
            st.code(job_logs(r["id"], tail=40) or "(no log)", language="text")


live_runs()
