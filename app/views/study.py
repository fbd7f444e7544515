"""Studies: start one from YAML, follow its progress and best trial, and read the search: parallel coordinates,
the metric against each searched field, every trial's curve (stopped ones greyed), a sortable trial table."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import yaml

from app import study_view
from app.study_form import study_form
from db import store
from db import studies as db_studies

st.title("Studies")

with st.expander("New study", expanded=not db_studies.list_studies(limit=1)):
    submitted = study_form()
if submitted:
    st.query_params["study"] = submitted
    st.rerun()

studies = db_studies.list_studies()
if not studies:
    st.info("No studies yet: write one above, or run python -m app.cli study recipes/studies/tiny-lr-grid.yaml")
    st.stop()
ids = [s["id"] for s in studies]
wanted = st.query_params.get("study")
labels = {s["id"]: f"{s['name']} · {s['id']} · {s['status']}" for s in studies}
study_id = st.selectbox("Study", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=labels.get)
if study_id != wanted:
    st.query_params["study"] = study_id
links = st.columns(4)
links[0].link_button("Its trials in Runs", f"/runs?study={study_id}")
links[1].link_button("Compare its trials", f"/compare?study={study_id}&status=succeeded,stopped")


@st.fragment(run_every=3.0)
def progress() -> None:
    from jobs.studies import best_trial

    study = db_studies.get_study(study_id)
    trials = db_studies.trial_runs(study_id)
    spec = study["spec"]
    metric, mode = spec.get("metric", "eval_accuracy"), spec.get("mode", "max")
    counts = pd.Series([t["status"] for t in trials], dtype=str).value_counts()
    done = int(sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled", "stopped")))
    st.caption(f"Study {study['status']} · search {spec.get('search', 'grid')} · scheduler "
               f"{'ASHA' if 'asha' in str(spec.get('scheduler')) else 'FIFO'} · at most "
               f"{spec.get('max_concurrent')} trials at a time")  # fmt: skip
    c = st.columns(4)
    c[0].metric("finished", f"{done} / {study['n_trials']}")
    c[1].metric("running", int(counts.get("running", 0)))
    c[2].metric("stopped early", int(counts.get("stopped", 0)))
    c[3].metric("queued", int(counts.get("queued", 0)) + max(0, study["n_trials"] - len(trials)))
    if study["error"]:
        st.warning(study["error"])
    best = best_trial(study_id)
    if best:
        shown = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best["params"].items())
        st.success(f"Best so far: {metric} {best['value']:.4f} ({mode}) · {shown}")
        b = st.columns(3)
        b[0].link_button("Open best in Launch", f"/?clone={best['run_id']}")  # Launch is the home page
        b[1].link_button("Best trial's detail", f"/run_detail?run={best['run_id']}")
        run = store.get_run(best["run_id"]) or {}
        b[2].download_button("Save best as recipe", data=yaml.safe_dump(run.get("spec", {}), sort_keys=False),
                             file_name=f"{study['name']}-best.yaml", on_click="ignore")  # fmt: skip
    if study["status"] in ("queued", "running") and st.button("Cancel study", key="cancel_study"):
        from jobs.studies import cancel_study

        cancel_study(study_id)
        st.rerun()
    if not trials:
        return
    table = study_view.trials_table(trials, metric)
    st.plotly_chart(study_view.parallel_coordinates(table, metric, mode), key="parcoords")
    figs = study_view.sensitivity(table, metric)
    for col, fig in zip(st.columns(max(1, min(3, len(figs)))), figs):
        col.plotly_chart(fig, key=f"sens_{fig.layout.title.text}")
    metrics = store.get_metrics([t["id"] for t in trials], keys=[metric])
    st.plotly_chart(study_view.eval_curves(metrics, trials, metric), key="curves")
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            metric: st.column_config.NumberColumn(format="%.4f"),
            "detail": st.column_config.LinkColumn("detail", display_text="open"),
        },
    )  # fmt: skip


progress()
