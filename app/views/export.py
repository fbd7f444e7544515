"""Export: a run's adapter in the native format (every method), as Hugging Face PEFT LoRA (exactly from low-rank
factors, or by truncated SVD of ΔW at a chosen rank) and as a merged model; each export downloads as a zip."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from app.analysis_common import ExportOptions, adapter_export_options, trained_runs, zip_directory
from app.common import selected_run_id
from db import config, store
from engine.export import (
    FORMATS,
    LAB_META_FILE,
    MANIFEST_FILE,
    AdapterError,
    export_run,
    resolve_export_dir,
    run_trusts_remote_code,
)
from jobs.analysis import AnalysisError, trained_run

st.title("Export")
runs = trained_runs()
run_id = selected_run_id(runs, key="export_run")
if run_id is None:
    st.info("No finished runs yet: an export needs a trained adapter.")
    st.stop()
try:
    run, adapter_dir = trained_run(run_id)
except AnalysisError as err:
    st.info(str(err))
    st.stop()


# The run's spec in the database, never the adapter's files, decides whether its base model's code may run.
trust_remote_code = run_trusts_remote_code(run)


@st.cache_data(show_spinner="Reading the adapter")
def options_of(adapter_dir: str, adapter_sha256: str, trust_remote_code: bool) -> ExportOptions:
    """What the adapter can be exported as; cached per adapter file (its sha256 is part of the key)."""
    return adapter_export_options(adapter_dir, trust_remote_code)


def export_dir(fmt: str) -> Path:
    """One export per format and run, replaced by the next export of that format.

    The name goes through ``resolve_export_dir`` under the page's export root (``PEFTLAB_EXPORTS``, else
    ``exports`` in the home), the rule every export follows (no ``..``, nothing outside the root, no symlinks, not
    the root itself).
    """
    return resolve_export_dir(f"{run_id}-{fmt}", config.exports_root())


try:
    options = options_of(str(adapter_dir), store.list_artifacts(run_id, "adapter")[-1]["sha256"], trust_remote_code)
except AdapterError as err:
    st.error(f"The adapter of this run cannot be read: {err}")
    st.stop()


def run_export(fmt: str, **kwargs) -> None:
    with st.spinner(f"Exporting {fmt}"):
        try:
            result = export_run(
                adapter_dir, fmt, export_dir(fmt).name, root=config.exports_root(), summary=run["summary"],
                overwrite=True, trust_remote_code=trust_remote_code, **kwargs,
            )  # fmt: skip
        except AdapterError as err:
            st.error(f"{fmt}: {err}")
            return
    st.success(f"{fmt}: {len(result.files)} files written to {result.path}")


native, peft, merged = st.columns(3)
with native:
    st.subheader("Native")
    st.caption("Every method: the adapter tensors as trained, the config with the base model's fingerprint, a card.")
    if st.button("Export native", key="export_native"):
        run_export("native")
with peft:
    st.subheader("PEFT LoRA")
    if not options.peft_possible:
        reasons = dict.fromkeys([options.peft_exact_reason, options.peft_svd_reason])
        st.caption("Not available: " + "; ".join(reasons))
    else:
        modes = (["exact"] if options.peft_exact_reason is None else []) + (
            ["svd"] if options.peft_svd_reason is None else []
        )
        mode = st.radio(
            "Conversion", modes, horizontal=True, key="peft_mode",
            format_func={"exact": "low-rank factors (exact)", "svd": "truncated SVD of ΔW"}.get,
        )  # fmt: skip
        if options.peft_exact_reason is not None:
            st.caption(f"{options.peft_exact_reason}: converted by truncated SVD (Eckart–Young) at the chosen rank")
        kwargs = {}
        if mode == "svd":
            kwargs["svd_rank"] = int(
                st.number_input("SVD rank", min_value=1, value=options.default_rank, step=1, key="svd_rank")
            )
        elif options.factor_rank_max is not None:
            rank = st.number_input(
                "Factor rank (0: as trained)", min_value=0, max_value=options.factor_rank_max, value=0, step=1,
                key="factor_rank", help="the layers can truncate their factors to a smaller rank (nested ranks)",
            )  # fmt: skip
            kwargs["factor_rank"] = int(rank) or None
        if st.button("Export PEFT", key="export_peft"):
            run_export("peft", **kwargs)
with merged:
    st.subheader("Merged")
    if options.merged_reason is not None:
        st.caption(f"Not available: {options.merged_reason}")
    else:
        st.caption("The whole model with the update folded into its weights, loadable without PEFT Lab.")
        if st.button("Export merged", key="export_merged"):
            run_export("merged")

# --- exports on disk ------------------------------------------------------------------------------------
exports = {}
for fmt in FORMATS:
    try:
        directory = export_dir(fmt)
    except AdapterError as err:  # e.g. a symlink planted under the export root
        st.warning(f"{fmt}: {err}")
        continue
    if (directory / MANIFEST_FILE).is_file():
        exports[fmt] = directory
if not exports:
    st.info("No export of this run yet.")
    st.stop()
st.subheader("Exports of this run")
for fmt, directory in exports.items():
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    with st.container(border=True):
        st.markdown(f"**{fmt}** · `{directory}` · {manifest.get('created_at', '')}")
        files = manifest.get("files", {})
        table = pd.DataFrame(
            {"file": list(files), "bytes": [f["bytes"] for f in files.values()],
             "sha256": [f["sha256"] for f in files.values()]}
        )  # fmt: skip
        st.dataframe(table, hide_index=True, width="stretch", key=f"files_{fmt}")
        lab_meta = directory / LAB_META_FILE
        conversion = json.loads(lab_meta.read_text()).get("conversion") if lab_meta.is_file() else None
        if conversion:
            c = st.columns(3)
            c[0].metric("conversion", conversion["mode"], help="exact factors, truncated SVD, or factors at a rank")
            c[1].metric("rank", conversion["svd_rank"] or conversion["factor_rank"] or conversion["rank"])
            c[2].metric(
                "reconstruction error", f"{conversion['relative_error']:.3e}",
                help="‖ΔW − BA‖_F / ‖ΔW‖_F over all layers (0 for an exact export)",
            )  # fmt: skip
            if conversion["mode"] != "exact" and conversion.get("layer_errors"):
                errors = pd.Series(conversion["layer_errors"], name="relative error").rename_axis("layer")
                with st.expander("Error per layer"):
                    st.dataframe(errors.reset_index(), hide_index=True, width="stretch", key=f"errors_{fmt}")
        st.download_button(
            f"Download {directory.name}.zip", data=lambda d=directory: zip_directory(d),
            file_name=f"{directory.name}.zip", mime="application/zip", on_click="ignore", key=f"zip_{fmt}",
        )  # fmt: skip
