"""Run detail: the full spec, metrics table and curves, parameter counts, device, timings, artifacts, log."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
import yaml

from app import charts
from app.analysis_common import method_ranks
from app.common import elapsed_s, format_duration, resume_button, selected_run_id
from app.generations import show_generations
from db import store

st.title("Run detail")
runs = store.list_runs(limit=1000)
run_id = selected_run_id(runs)
if run_id is None:
    st.info("No runs yet.")
    st.stop()


DOWNLOADABLE = ("adapter", "adapter_config")  # the trained adapter as stored (native layout)


def downloads(run_id: str, arts: list[dict]) -> None:
    """Download buttons for the stored adapter files (read when clicked) and a link to the Export page."""
    files = [a for a in arts if a["kind"] in DOWNLOADABLE and Path(a["path"]).is_file()]
    for a in files:
        name = Path(a["path"]).name
        st.download_button(
            f"Download {name}", data=lambda path=a["path"]: Path(path).read_bytes(), file_name=f"{run_id}-{name}",
            on_click="ignore", key=f"dl_{a['kind']}", help=f"sha256 {a['sha256']}",
        )  # fmt: skip
    if files:
        st.markdown(f"[Export as native, PEFT LoRA or merged model, zipped →](export?run={run_id})")


@st.fragment(run_every=3.0)
def detail() -> None:
    run = store.get_run(run_id)
    summary = run["summary"] or {}
    c = st.columns(5)
    c[0].metric("status", run["status"])
    c[1].metric("progress", f"{(run['progress'] or 0):.0%}")
    c[2].metric("elapsed", format_duration(elapsed_s(run)) or "-")
    acc = (summary.get("final_metrics") or {}).get("eval_accuracy")
    if acc is None:  # a running run: its last evaluation so far
        acc = store.latest_metrics([run_id])[run_id].get("eval_accuracy")
    c[3].metric(
        "eval accuracy",
        "-" if acc is None else f"{acc:.4f}",
        help=f"majority-class rate {summary['majority_rate']:.4f}" if summary.get("majority_rate") else None,
    )
    tp, total = run["trainable_params"], run["total_params"]
    c[4].metric("trainable / total", "-" if tp is None else f"{tp:,} / {total:,}",
                help=None if tp is None else f"{100 * tp / total:.3f}% trainable")  # fmt: skip
    if run["status"] in ("queued", "running") and st.button("Cancel this run", key="cancel_detail"):
        from jobs.runs import cancel_run

        cancel_run(run_id)
        st.rerun()
    resume_button(run, key="resume_detail")
    st.page_link("views/launch.py", label="Clone into Launch", icon=":material/content_copy:",
                 query_params={"clone": run_id},
                 help="Open the Launch form pre-filled with this run's spec")  # fmt: skip
    if run["error"]:
        st.error(run["error"])

    metrics = store.get_metrics([run_id])
    if not metrics.empty:
        keys = [k for k in ("train_loss", "eval_loss", "eval_accuracy", "perplexity", "lr") if k in set(metrics["key"])]
        cols = st.columns(2)
        for i, key in enumerate(keys):
            cols[i % 2].plotly_chart(charts.metric_curves(metrics, key, {run_id: run["method"]}), key=f"curve_{key}")
        with st.expander("Metrics table"):
            st.dataframe(metrics.pivot_table(index="step", columns="key", values="value"), width="stretch")

    left, right = st.columns(2)
    with left:
        st.subheader("Spec")
        st.code(yaml.safe_dump(run["spec"], sort_keys=False), language="yaml")
        st.download_button("Download RunSpec YAML", yaml.safe_dump(run["spec"], sort_keys=False),
                           file_name=f"{run_id}.yaml", key="dl_spec")  # fmt: skip
    with right:
        st.subheader("Run")
        info = {
            "device": run["device"], "executor": run["executor"], "attempt": run["attempt"], "owner": run["owner"],
            "last heartbeat": run["heartbeat_at"], "created": run["created_at"],
            "started": run["started_at"], "finished": run["finished_at"], **(summary.get("timings") or {}),
            "steps": summary.get("steps"), "adapter params (formula)": summary.get("adapter_params"),
            "stored params": summary.get("stored_params"), "stored bytes": summary.get("stored_bytes"),
        }  # fmt: skip
        st.dataframe(pd.DataFrame({"": [str(v) for v in info.values()]}, index=list(info)), width="stretch")
        method_ranks(run_id)
        st.subheader("Artifacts")
        arts = store.list_artifacts(run_id)
        if arts:
            st.dataframe(pd.DataFrame(arts)[["kind", "path", "bytes", "sha256"]], hide_index=True, width="stretch")
        downloads(run_id, arts)
    show_generations(arts)  # causal LMs: base vs adapted greedy generations
    from jobs.runs import job_logs

    with st.expander("Log (tail)", expanded=run["status"] == "failed"):
        st.code(job_logs(run_id, tail=80) or "(no log yet)", language="text")


detail()
