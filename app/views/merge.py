"""Merge: the kept checkpoints of one run, or the final adapters of several runs, merged into a new run (MWA,
uniform, linear, TIES, DARE; docs/METHODS.md, "Merging"). The weights show before merging; after, every source's
accuracy beside the merges."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from pydantic import ValidationError

from app.analysis_common import pick_runs, trained_runs
from app.merge_charts import merge_accuracy_chart, merge_weights_chart, source_label
from db import merges
from engine.adapter_merge import MERGE_METHODS, MergeSettings
from engine.errors import UserError
from jobs.merge import preview, submit_merge

st.title("Merge")
st.caption(
    "One run merges its kept checkpoints (train with `train.keep_checkpoints`); several runs of one method and base "
    "model merge their final adapters. Low-rank layers merge by ΔW, re-factorised at the method's rank."
)
runs = trained_runs()
if not runs:
    st.info("No finished runs yet: train one with train.keep_checkpoints (e.g. 6) to merge its checkpoints.")
    st.stop()
source_ids = pick_runs(runs, key="merge_runs", label="Sources", max_default=1)
if not source_ids:
    st.info("Pick one run (its kept checkpoints) or several runs (their final adapters).")
    st.stop()

method_col, metric_col, p_col, extra_col = st.columns(4)
method = method_col.selectbox("Method", MERGE_METHODS, key="merge_method")
metric = metric_col.selectbox("MWA metric", ("loss", "step"), key="merge_metric", disabled=method == "uniform",
                              help="weights ∝ (1/training loss)^p or step^p")  # fmt: skip
p = p_col.number_input("p (penalty exponent)", value=1.0 if method == "mwa" else 0.0, step=0.5, key=f"merge_p_{method}",
                       disabled=method == "uniform", help="0: the uniform mean; larger: lean on the best")  # fmt: skip
density = drop = None
if method == "ties":
    density = extra_col.number_input("TIES density", 0.01, 1.0, 0.2, 0.05, key="merge_density")
elif method == "dare":
    drop = extra_col.number_input("DARE drop probability", 0.0, 0.99, 0.9, 0.05, key="merge_drop")
try:
    settings = MergeSettings(method=method, metric=metric, p=None if method == "uniform" else p,
                             density=density or 0.2, drop_prob=0.9 if drop is None else drop)  # fmt: skip
    sources = preview(source_ids, settings)
except ValidationError as err:
    st.error(f"{err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}")
    st.stop()
except UserError as err:
    st.error(str(err))
    st.stop()

st.plotly_chart(merge_weights_chart(sources, title=f"Weights: {settings.label()}"), key="merge_weights")
table = pd.DataFrame([{"source": source_label(s), "run": s["run_id"], "step": s["step"], "training loss": s["loss"],
                       "eval accuracy": s["eval_accuracy"], "weight": s["weight"]} for s in sources])  # fmt: skip
st.dataframe(table, hide_index=True)

also_uniform = method != "uniform" and st.checkbox("Also merge uniformly (the baseline)", value=True, key="merge_uni")
if st.button("Merge", type="primary", key="merge_go"):
    done = {(m["summary"] or {}).get("merge", {}).get("label") for m in merges.merges_of(source_ids)
            if m["status"] in ("queued", "running", "succeeded")}  # fmt: skip
    wanted = [settings] + ([MergeSettings(method="uniform")] if also_uniform else [])
    with st.spinner("Merging"):
        for s in wanted:
            if s.label() in done and s is not settings:
                continue
            try:
                merged_id = submit_merge(source_ids, s)
            except UserError as err:
                st.error(str(err))
                break
            st.toast(f"{merged_id}: {s.label()}")


@st.fragment(run_every=2.0)
def results() -> None:
    """The merges of these sources: a table, and the accuracies beside the sources' (refreshing while any runs)."""
    made = merges.merges_of(source_ids)
    if not made:
        st.info("No merge of these sources yet.")
        return
    rows, finished = [], {}
    for m in made:
        merge = (m["summary"] or {}).get("merge") or {}
        label = merge.get("label") or m["name"]
        accuracy = ((m["summary"] or {}).get("final_metrics") or {}).get("eval_accuracy")
        rows.append({"run": m["id"], "merge": label, "status": m["status"], "eval accuracy": accuracy,
                     "max re-factorisation error": merge.get("max_refactorisation_error"),
                     "error": m["error"]})  # fmt: skip
        if m["status"] == "succeeded" and accuracy is not None:
            finished[label] = accuracy  # the newest merge of each label
    st.plotly_chart(merge_accuracy_chart(sources, list(finished.items())), key="merge_accuracy")
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.caption("A merged run opens in Run detail, Spectra and Export like any run (its id above).")


results()
