"""Importance: what a method recorded while training (head scores and masks, position scores with the pruning
and sharing map, router loads), and the per-layer gradient / update norms every adapted run records."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts
from app.analysis_common import (
    norm_profile,
    raw_method_analysis,
    router_tables,
    score_maps,
    short_layer_names,
    stored_importance,
    trained_runs,
)
from app.common import selected_run_id
from engine.analysis.importance import head_importance_table, sharing_table
from jobs.analysis import AnalysisError, compute_analysis

st.title("Importance")
runs = trained_runs()
run_id = selected_run_id(runs, key="importance_run")
if run_id is None:
    st.info("No finished runs yet: importance data is recorded while a run trains.")
    st.stop()
run = next(r for r in runs if r["id"] == run_id)

tables = stored_importance(run_id)
rebuild = st.button("Rebuild the tables from the run's files", key="importance_rebuild")
if tables is None or rebuild:
    # Cheap (it reads the JSON the method and the profiler wrote during training), so it runs on first view.
    try:
        compute_analysis(run_id, "importance", force=tables is not None)
    except AnalysisError as err:
        st.info(str(err))
        st.stop()
    tables = stored_importance(run_id)

raw = raw_method_analysis(run_id)
maps = score_maps(tables, raw)
routers = router_tables(tables)
profile = norm_profile(tables)
if not maps and not routers:
    st.info(
        f"Method **{run['method']}** records no importance data: no head or position scores, no pruning map, no "
        "router loads (methods that mask heads, prune positions or route between experts record them while "
        "training). The per-layer norm profile below is recorded for every adapted run."
    )
settings = {k: v for k, v in raw.items() if v is None or isinstance(v, (bool, int, float, str))}
if settings:
    with st.expander("Settings the method recorded"):
        st.dataframe(pd.DataFrame({"value": [str(v) for v in settings.values()]}, index=list(settings)))

for i, view in enumerate(maps):
    if view.keep_mask is not None:
        st.subheader("Head scores" + (f": {view.name}" if len(maps) > 1 else ""))
        keep = view.keep_mask
        fig = charts.head_importance_heatmap(
            view.score, keep, blocks=view.row_labels, title="Head importance (× masked)"
        )
        st.plotly_chart(fig, key=f"heads_{i}")
        table = head_importance_table(view.score, keep, blocks=view.row_labels).sort_values("rank")
        st.caption(f"{int(table['masked'].sum())} of {len(table)} heads masked")
        st.dataframe(table, hide_index=True, width="stretch", key=f"heads_table_{i}")
    else:
        pruned, shares = view.prune_map
        st.subheader("Position scores, pruning and sharing" + (f": {view.name}" if len(maps) > 1 else ""))
        table = sharing_table(view.score, pruned, shares, row_labels=view.row_labels, col_labels=view.col_labels)
        st.plotly_chart(charts.sharing_chart(table), key=f"sharing_{i}")
        st.caption(f"{int(table['pruned'].sum())} of {len(table)} positions pruned; '→ b': shares block b's adapter")
        st.dataframe(table.sort_values("rank"), hide_index=True, width="stretch", key=f"sharing_table_{i}")

for i, (name, history, means) in enumerate(routers):
    st.subheader("Router loads over training" + (f": {name}" if len(routers) > 1 else ""))
    names = short_layer_names(history["layer"])
    history = history.assign(layer=history["layer"].map(names))
    means = means.assign(layer=means["layer"].map(lambda n, names=names: names.get(n, n)))
    mean_label = "mean over layers"
    layer = st.selectbox("Layer", [mean_label, *dict.fromkeys(history["layer"])], key=f"router_layer_{i}")
    left, right = st.columns(2)
    fig = charts.router_loads_chart(history, layer=None if layer == mean_label else layer)
    left.plotly_chart(fig, key=f"router_loads_{i}")
    right.plotly_chart(charts.router_mean_heatmap(means), key=f"router_means_{i}")

st.subheader("Gradient and update norms per layer")
if profile is None:
    st.info("This run recorded no norm profile (it has no adapted layers, e.g. full fine-tuning or a linear probe).")
else:
    c = st.columns(3)
    value = c[0].radio("Value", ["grad_norm", "update_norm"], horizontal=True, key="norm_value",
                       format_func={"grad_norm": "‖∇θ‖", "update_norm": "‖θ − θ_start‖"}.get)  # fmt: skip
    kind = c[1].radio("View", ["lines", "heatmap"], horizontal=True, key="norm_kind")
    log_y = c[2].checkbox("log scale", value=True, key="norm_log")
    shown = profile.assign(layer=profile["layer"].map(short_layer_names(profile["layer"])))
    st.plotly_chart(charts.norm_profile_chart(shown, value=value, kind=kind, log_y=log_y), key="norm_profile")

used = {view.name for view in maps} | {name for name, _, _ in routers} | {f"{name}.mean" for name, _, _ in routers}
rest = {name: t for name, t in tables.items() if name not in used and t is not profile}
if rest:
    with st.expander(f"All tables ({len(rest)} more)"):
        for name, table in rest.items():
            st.caption(name)
            st.dataframe(table, hide_index=True, width="stretch", key=f"table_{name}")
