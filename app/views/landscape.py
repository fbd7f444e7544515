"""Loss landscape: around a run's trained adapter (Li et al. 2018: 2-D surface, 1-D slice) or along the line from
its initialisation (Goodfellow et al. 2015), computed as a Ray job with live progress, stored and drawn here."""

from __future__ import annotations

from typing import Any, get_args

import streamlit as st

from app import charts
from app.analysis_common import stored_landscapes, trained_runs
from app.common import selected_run_id
from app.summary import short_label
from engine.artifacts import AdapterError
from jobs.analysis import LANDSCAPE_GRID_DEFAULTS, AnalysisError, LandscapeParams, compute_analysis, parse_params

FINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

st.title("Loss landscape")
runs = trained_runs()
run_id = selected_run_id(runs, key="landscape_run")
if run_id is None:
    st.info("No finished runs yet: a landscape is computed around a trained adapter.")
    st.stop()
by_id = {r["id"]: r for r in runs}
jobs: dict[str, str] = st.session_state.setdefault("landscape_jobs", {})  # run id -> Ray job id
failures: dict[str, str] = st.session_state.setdefault("landscape_failures", {})

# The widgets take their defaults and help from LandscapeParams; the settings of the kind chosen come first.
fields = LandscapeParams.model_fields
c = st.columns([2, 1, 1, 1])
kind = c[0].radio("kind", list(get_args(fields["kind"].annotation)), horizontal=True, help=fields["kind"].description,
                  key="landscape.kind")  # fmt: skip
values: dict[str, Any] = {"kind": kind}
values["grid"] = c[1].number_input(
    "grid", min_value=2, value=LANDSCAPE_GRID_DEFAULTS[kind], step=1, help=fields["grid"].description,
    key=f"landscape.grid.{kind}",
)  # fmt: skip
moved = "margin" if kind == "interpolation" else "span"
values[moved] = c[2].number_input(
    moved, min_value=0.0, value=float(fields[moved].default), help=fields[moved].description, key=f"landscape.{moved}"
)
values["examples"] = c[3].number_input(
    "examples", min_value=1, value=fields["examples"].default, help=fields["examples"].description,
    key="landscape.examples",
)  # fmt: skip
with st.expander("More settings"):
    c = st.columns(3)
    if kind != "interpolation":
        values["seed"] = c[0].number_input(
            "seed", value=fields["seed"].default, step=1, help=fields["seed"].description, key="landscape.seed"
        )
        norms = list(get_args(fields["normalization"].annotation))
        values["normalization"] = c[1].selectbox(
            "normalization", norms, index=norms.index(fields["normalization"].default),
            help=fields["normalization"].description, key="landscape.normalization",
        )  # fmt: skip
    values["chunk_size"] = c[2].number_input(
        "chunk size", min_value=1, value=fields["chunk_size"].default, step=1, help=fields["chunk_size"].description,
        key="landscape.chunk_size",
    )  # fmt: skip
    force = st.checkbox("Recompute even when a stored result matches", value=False, key="landscape_force")
try:
    params: dict[str, Any] | None = parse_params("landscape", values).model_dump(mode="json")
except AnalysisError as err:
    st.error(str(err))
    params = None

c = st.columns([1, 1, 3])
on_ray = c[0].button("Compute on Ray", type="primary", disabled=params is None or run_id in jobs, key="landscape_ray")
here = c[1].button(
    "Compute here", disabled=params is None, key="landscape_here",
    help="in this process: the page waits until it is done (fine for small grids and models)",
)  # fmt: skip
if on_ray:
    from jobs.analysis import submit_analysis

    try:
        jobs[run_id] = submit_analysis(run_id, "landscape", params, force=force)
        failures.pop(run_id, None)
        st.rerun()  # redraw with the button disabled and the progress bar showing
    except (AnalysisError, AdapterError) as err:
        st.error(str(err))
    except Exception as err:  # noqa: BLE001 - Ray unreachable or refusing: say so, the page stays usable
        st.error(f"Could not submit to Ray ({err}). Start the app with ./run_app.sh, or use Compute here.")
if here:
    bar = st.progress(0.0, text="computing")
    try:
        compute_analysis(run_id, "landscape", params, progress=lambda f: bar.progress(f, text=f"{f:.0%}"), force=force)
    except (AnalysisError, AdapterError) as err:
        st.error(str(err))
    bar.empty()


@st.fragment(run_every=2.0)
def job_progress(run_id: str, job_id: str) -> None:
    """Polls the Ray job on its own every 2 s; when the job ends, the whole page reruns to show the result."""
    from jobs.analysis import analysis_job_status

    try:
        status = analysis_job_status(job_id)
    except Exception as err:  # noqa: BLE001 - Ray gone: stop polling, keep what is stored
        jobs.pop(run_id, None)
        failures[run_id] = f"lost track of Ray job {job_id}: {err}"
        st.rerun()
        return
    fraction = min(max(status["progress"], 0.0), 1.0)
    st.progress(fraction, text=f"Ray job {job_id}: {status['status'].lower()}, {fraction:.0%}")
    if status["status"] in FINAL_JOB_STATES:
        jobs.pop(run_id, None)
        if status["status"] != "SUCCEEDED":
            failures[run_id] = f"Ray job {job_id} {status['status'].lower()}: {status['message'] or ''}"
        st.rerun()


if run_id in jobs:
    job_progress(run_id, jobs[run_id])
if run_id in failures:
    st.error(failures[run_id])

landscapes = stored_landscapes(run_id)
if not landscapes:
    st.info("No landscape stored for this run yet: choose the parameters and compute one.")
    st.stop()


def describe(result: dict[str, Any]) -> str:
    meta = result.get("meta", {})
    parts = [f"{meta.get('steps')} points per axis", f"{meta.get('examples')} examples",
             f"{meta.get('parameters', 0):,} parameters moved"]  # fmt: skip
    if result["kind"] == "interpolation":
        parts.append(f"‖θ_end − θ_start‖ = {meta.get('distance', float('nan')):.4g}")
    else:
        parts.append(f"span ±{meta.get('span')}, {meta.get('normalization')} normalisation, seed {meta.get('seed')}")
    if meta.get("seconds") is not None:
        parts.append(f"{meta['seconds']:.1f} s on {meta.get('device', '?')}")
    return " · ".join(parts)


has_accuracy = any("accuracies" in r for r in landscapes.values())
accuracy = st.toggle("Show accuracy instead of loss", value=False, disabled=not has_accuracy, key="landscape_acc")
if "2d" in landscapes:
    result = landscapes["2d"]
    st.subheader("2-D landscape")
    left, right = st.columns(2)
    left.plotly_chart(charts.landscape_contour(result, accuracy=accuracy), key="landscape_contour")
    right.plotly_chart(charts.landscape_surface(result, accuracy=accuracy), key="landscape_surface")
    st.caption(describe(result))

others = [r["id"] for r in runs if r["id"] != run_id]
for kind, title in (("1d", "1-D slice along a random direction"), ("interpolation", "Initialisation → trained")):
    if kind not in landscapes:
        continue
    st.subheader(title)
    c = st.columns([3, 1])
    overlay_ids = c[0].multiselect("Overlay runs", others, format_func=lambda i: short_label(by_id[i]),
                                   key=f"landscape_overlay_{kind}")  # fmt: skip
    log_y = c[1].checkbox("log scale", value=False, key=f"landscape_log_{kind}")
    curves = {short_label(by_id[run_id]): landscapes[kind]}
    absent = []
    for other in overlay_ids:
        found = stored_landscapes(other).get(kind)
        if found is None:
            absent.append(short_label(by_id[other]))
        else:
            curves[short_label(by_id[other])] = found
    plotted = {name: r for name, r in curves.items() if not accuracy or "accuracies" in r}
    st.plotly_chart(charts.landscape_curves(plotted, accuracy=accuracy, log_y=log_y), key=f"landscape_{kind}")
    st.caption(describe(landscapes[kind]))
    if absent:
        st.caption(f"No stored {kind} landscape for: {', '.join(absent)}")
