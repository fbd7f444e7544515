"""Spectra: singular values of each adapted layer's ΔW (stored per run), as a layer × index heatmap, per-layer
curves, one layer across runs, and the scalars (effective rank, stable rank, relative update size, intruders)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts
from app.analysis_common import chosen_ranks, pick_runs, short_layer_names, stored_spectra, trained_runs
from app.common import config_form
from app.summary import short_label
from engine.analysis.spectra import SCALAR_COLUMNS
from engine.artifacts import AdapterError
from jobs.analysis import AnalysisError, SpectraParams, compute_analysis

st.title("Spectra of ΔW")
runs = trained_runs()
if not runs:
    st.info("No finished runs yet: spectra are computed from a trained adapter.")
    st.stop()
by_id = {r["id"]: r for r in runs}
selected = pick_runs(runs, key="spectra_runs")
if not selected:
    st.info("Pick one or more runs.")
    st.stop()

with st.expander("Settings"):
    params = config_form(SpectraParams, key_prefix="spectra")
    force = st.checkbox("Recompute even when a stored result matches", value=False, key="spectra_force")
stored = {run_id: stored_spectra(run_id) for run_id in selected}
missing = [run_id for run_id, s in stored.items() if s is None]
label = "Compute" if not missing else f"Compute ({len(missing)} not computed yet)"
if st.button(label, type="primary" if missing else "secondary", key="spectra_compute"):
    for run_id in selected:
        with st.spinner(f"Spectra of {short_label(by_id[run_id])}"):
            try:
                compute_analysis(run_id, "spectra", params, force=force)
            except (AnalysisError, AdapterError) as err:
                st.error(f"{short_label(by_id[run_id])}: {err}")
    stored = {run_id: stored_spectra(run_id) for run_id in selected}
    if not [r for r, s in stored.items() if s is None]:
        st.rerun()  # the button's label and the page now show what is stored

spectra = {run_id: s for run_id, s in stored.items() if s is not None}
if not spectra:
    st.info("No stored spectra for these runs yet: press Compute (seconds for small models).")
    st.stop()
not_yet = [short_label(by_id[r]) for r, s in stored.items() if s is None]
if not_yet:
    st.caption("Not computed yet: " + ", ".join(not_yet))
labels = {run_id: short_label(by_id[run_id]) for run_id in spectra}

# --- scalars -----------------------------------------------------------------------------------------
st.subheader("Scalars per layer")
tables = [s.table.assign(run=labels[run_id]) for run_id, s in spectra.items()]
for run_id, table in zip(spectra, tables, strict=True):  # per-layer ranks a method chose (SoKA), beside the spectra
    found = chosen_ranks(run_id)
    table["chosen rank"] = table["layer"].map(found[0]) if found is not None else None
scalars = pd.concat(tables, ignore_index=True)[["run", "layer", "role", "block", "source", "chosen rank",
                                                *SCALAR_COLUMNS]]  # fmt: skip
st.dataframe(scalars, hide_index=True, width="stretch", key="spectra_scalars")
for run_id, s in spectra.items():
    settings = ", ".join(f"{k} {v}" for k, v in s.settings.items() if k != "analysis")
    skipped = f"; skipped (no dense ΔW): {', '.join(s.skipped)}" if s.skipped else ""
    st.caption(f"{labels[run_id]}: {settings}{skipped}")

# --- one run -------------------------------------------------------------------------------------------
st.subheader("One run")
with_layers = {run_id: s for run_id, s in spectra.items() if s.sigmas}
if not with_layers:
    st.info("None of these runs has an adapted layer with a dense ΔW (see the skipped layers above).")
    st.stop()
shown = st.selectbox("Run", list(with_layers), format_func=labels.get, key="spectra_shown")
names = short_layer_names(with_layers[shown].sigmas)
sigmas = {names[layer]: sigma for layer, sigma in with_layers[shown].sigmas.items()}
c = st.columns(3)
log = c[0].checkbox("log₁₀ σ", value=True, key="spectra_log")
width = max(len(s) for s in sigmas.values())
max_index = c[1].number_input("Largest index shown", min_value=1, value=min(width, 64), step=1, key="spectra_max")
energy = c[2].checkbox("Cumulative energy curves", value=False, key="spectra_energy")
st.plotly_chart(charts.spectra_heatmap(sigmas, log=log, max_index=int(max_index)), key="spectra_heatmap")
layers = st.multiselect("Layers", list(sigmas), default=list(sigmas)[:6], key=f"spectra_layers_{shown}")
if layers:
    fig = charts.spectra_curves(sigmas, layers=layers, energy=energy, title=f"{labels[shown]}")
    st.plotly_chart(fig, key="spectra_curves")

# --- one layer across runs ----------------------------------------------------------------------------
st.subheader("One layer across runs")
first = next(iter(with_layers.values())).sigmas
common = [name for name in first if all(name in s.sigmas for s in with_layers.values())]
if not common:
    st.info("The selected runs share no layer with a dense ΔW.")
else:
    c = st.columns([3, 1])
    layer = c[0].selectbox("Layer", common, key="spectra_overlay_layer", format_func=lambda n: n.removeprefix("net."))
    normalise = c[1].checkbox("Divide by σ₁", value=False, key="spectra_normalise")
    overlay = {labels[run_id]: s.sigmas[layer] for run_id, s in with_layers.items()}
    st.plotly_chart(charts.spectra_overlay(overlay, layer, normalise=normalise), key="spectra_overlay")
