"""Helpers shared by the analysis pages: run tables and pickers, stored analysis artifacts, importance views read
from the shape of the stored tables, and what an adapter can be exported as."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st

from app.common import run_label
from db import store

if TYPE_CHECKING:
    from engine.analysis.spectra import Spectra
    from engine.methods import Method
    from engine.models import TaskModel

# --- runs ------------------------------------------------------------------------------------------


def trained_runs() -> list[dict]:
    """Runs that finished training (the ones with an adapter to analyse), newest first."""
    return store.list_runs(status=["succeeded"], limit=None)


def pick_runs(runs: list[dict], key: str, label: str = "Runs", max_default: int = 2) -> list[str]:
    """A multiselect of runs; defaults to the ``?run=`` query parameter (one id, or several separated by commas),
    else the newest ``max_default``."""
    ids = [r["id"] for r in runs]
    labels = {r["id"]: run_label(r) for r in runs}
    wanted = [w for w in (st.query_params.get("run") or "").split(",") if w in ids]
    default = wanted or ids[:max_default]
    return st.multiselect(label, ids, default=default, format_func=labels.get, key=key)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A copy whose list, tuple and dict cells are JSON text, so mixed object columns render in ``st.dataframe``, and
    whose missing values are blank (a column with one is shown as text)."""

    def cell(value: Any) -> Any:
        if isinstance(value, (list, tuple, dict)):
            return json.dumps(list(value) if isinstance(value, tuple) else value)
        return value

    def missing(value: Any) -> bool:
        return value is None or (isinstance(value, float) and np.isnan(value))

    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(cell)
            kinds = {type(v) for v in out[column] if not missing(v)}
            if len(kinds) > 1 or out[column].map(missing).any():  # blank, never "None" or "nan"
                out[column] = out[column].map(lambda v: "" if missing(v) else str(v))
        elif out[column].dtype.kind == "f" and out[column].isna().any():
            out[column] = out[column].map(lambda v: "" if missing(v) else f"{v:.6g}")
    return out


# --- stored analyses -------------------------------------------------------------------------------


def analysis_json_paths(run_id: str, kind: str) -> list[Path]:
    """The JSON files (each analysis's completion marker) recorded as ``analysis:<kind>`` artifacts that exist."""
    paths = [Path(a["path"]) for a in store.list_artifacts(run_id, f"analysis:{kind}")]
    return [p for p in dict.fromkeys(paths) if p.suffix == ".json" and p.is_file()]


def chosen_ranks(run_id: str) -> tuple[dict[str, int], list[str]] | None:
    """``method_state.ranks`` of the run's adapter (methods that choose a rank per layer, e.g. SoKA) and the layers
    whose cap bound, or None when the method records no ranks."""
    for artifact in store.list_artifacts(run_id, "adapter_config"):
        path = Path(artifact["path"])
        if path.is_file():
            state = json.loads(path.read_text()).get("method_state") or {}
            if state.get("ranks"):
                return {k: int(v) for k, v in state["ranks"].items()}, list(state.get("capped_layers") or [])
    return None


def method_ranks(run_id: str) -> None:
    """Show the per-layer ranks a method chose (``method_state.ranks``) and warn where a cap bound."""
    found = chosen_ranks(run_id)
    if found is None:
        return
    ranks, capped = found
    st.subheader("Chosen ranks per layer")
    table = pd.DataFrame({"layer": list(ranks), "rank": list(ranks.values())})
    table["capped"] = table["layer"].isin(capped)
    st.dataframe(table, hide_index=True, width="stretch")
    if capped:
        st.warning(f"The max_rank cap bound in {len(capped)} layer(s): the spectrum asked for more components.")


def stored_spectra(run_id: str) -> Spectra | None:
    """The run's stored ``engine.analysis.spectra.Spectra``, or None when not computed yet."""
    from engine.analysis.spectra import load_spectra

    paths = analysis_json_paths(run_id, "spectra")
    return load_spectra(paths[-1]) if paths else None


def stored_landscapes(run_id: str) -> dict[str, dict[str, Any]]:
    """The run's stored landscapes by kind (``2d``, ``1d``, ``interpolation``)."""
    from engine.analysis.landscape import load_landscape

    results = [load_landscape(p) for p in analysis_json_paths(run_id, "landscape")]
    return {r["kind"]: r for r in results}


def stored_importance(run_id: str) -> dict[str, pd.DataFrame] | None:
    """The run's stored importance tables (``jobs.analysis`` kind ``importance``), or None."""
    from jobs.analysis import load_importance

    paths = analysis_json_paths(run_id, "importance")
    return load_importance(paths[-1]) if paths else None


def raw_method_analysis(run_id: str) -> dict[str, Any]:
    """The method's own analysis data (artifact ``method_analysis``), or {} when it stored none."""
    rows = store.list_artifacts(run_id, "method_analysis")
    if not rows or not Path(rows[-1]["path"]).is_file():
        return {}
    return json.loads(Path(rows[-1]["path"]).read_text())


def short_layer_names(layers: Iterable[str]) -> dict[str, str]:
    """Layer name → ``"<block>.<role>"`` (e.g. ``"3.q"``) for figure axes; unchanged where no role is known, and
    all unchanged if two layers would get the same short name."""
    from engine.analysis import layer_role_block

    names = {}
    for layer in dict.fromkeys(layers):
        role, block = layer_role_block(layer)
        names[layer] = f"{block}.{role}" if role and block >= 0 else layer
    return names if len(set(names.values())) == len(names) else {n: n for n in names}


# --- importance views ------------------------------------------------------------------------------
#
# ``engine.analysis.importance.artifact_tables`` turns a method's analysis data into tables by shape. The views
# below pick figures by the columns of those tables, never by method name:
#
# * a cell table (``row``, ``col``, score, companions) with a 0/1 companion whose name contains "mask" is a
#   head-score map with a keep mask (1 = kept): a heatmap with the masked cells marked;
# * a cell table with a boolean ``pruned`` companion and a ``shares…`` companion (the row whose adapter a pruned
#   position uses) is a prune-and-share map: bars of the scores, pruned ones labelled with the row they share;
# * (layer, step, expert, load) tables are router loads over training, (layer, expert, load) their means;
# * (step, layer, grad_norm, update_norm) is the per-layer norm profile every adapted run records.


@dataclass
class ScoreMap:
    """A rows × columns score matrix with its companions, as matrices (NaN where a cell has no value)."""

    name: str
    score: np.ndarray
    companions: dict[str, np.ndarray]
    row_labels: list[Any]
    col_labels: list[Any]

    @property
    def keep_mask(self) -> np.ndarray | None:
        found = [m for n, m in self.companions.items() if "mask" in n.lower() and _binary(m)]
        return found[0] if found else None

    @property
    def prune_map(self) -> tuple[np.ndarray, np.ndarray] | None:
        pruned = self.companions.get("pruned")
        shares = [m for n, m in self.companions.items() if n.lower().startswith("shares")]
        return (pruned, shares[0]) if pruned is not None and _binary(pruned) and shares else None


def _binary(matrix: np.ndarray) -> bool:
    values = matrix[~np.isnan(matrix)]
    return bool(values.size) and bool(np.isin(values, (0.0, 1.0)).all())


def _cell_table(table: pd.DataFrame) -> bool:
    return list(table.columns[:2]) == ["row", "col"] and len(table.columns) > 2


def _labels(count: int, candidates: list[list[Any]]) -> list[Any]:
    """The first candidate label list of the right length, else 0..count−1."""
    for labels in candidates:
        if len(labels) == count:
            return list(labels)
    return list(range(count))


def score_maps(tables: dict[str, pd.DataFrame], raw: dict[str, Any] | None = None) -> list[ScoreMap]:
    """The cell tables that carry a keep mask or a prune-and-share map, as matrices with axis labels.

    Axis labels come from the other data of the same artifact: a numeric vector table (e.g. ``blocks``) or a
    top-level list in the method's raw data (e.g. site names) whose length matches the axis.
    """
    vector_tables = [(n, t) for n, t in tables.items() if list(t.columns[:1]) == ["index"] and len(t.columns) == 2]
    vector_tables.sort(key=lambda item: "block" not in item[0].lower())  # a "blocks" vector labels rows first
    vectors = [t.iloc[:, 1].tolist() for _, t in vector_tables]
    lists = [v for v in (raw or {}).values() if isinstance(v, list) and v and all(isinstance(x, str) for x in v)]
    found = []
    for name, table in tables.items():
        if not _cell_table(table):
            continue
        rows, cols = int(table["row"].max()) + 1, int(table["col"].max()) + 1
        matrices = {}
        for column in table.columns[2:]:
            matrix = np.full((rows, cols), np.nan)
            values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
            matrix[table["row"].astype(int), table["col"].astype(int)] = values
            matrices[column] = matrix
        score_name = table.columns[2]
        ints = [[int(x) for x in v] for v in vectors if all(float(x).is_integer() for x in v)]
        view = ScoreMap(
            name=name,
            score=matrices.pop(score_name),
            companions=matrices,
            row_labels=_labels(rows, ints),
            col_labels=_labels(cols, lists),
        )
        if view.keep_mask is not None or view.prune_map is not None:
            found.append(view)
    return found


def router_tables(tables: dict[str, pd.DataFrame]) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(name, loads over training, mean load per layer and expert) for every router-load history table.

    The means are the table ``<name>.mean`` when the artifact has one, else the mean over the recorded windows.
    """
    out = []
    for name, table in tables.items():
        if {"layer", "step", "expert", "load"} <= set(table.columns) and len(table):
            means = tables.get(f"{name}.mean")
            if means is None or not {"layer", "expert", "load"} <= set(means.columns):
                means = table.groupby(["layer", "expert"], as_index=False, sort=False)["load"].mean()
            out.append((name, table, means))
    return out


def norm_profile(tables: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    """The per-layer gradient / update norm profile, when recorded."""
    for table in tables.values():
        if {"step", "layer", "grad_norm", "update_norm"} <= set(table.columns) and len(table):
            return table
    return None


# --- export ----------------------------------------------------------------------------------------


@dataclass
class ExportOptions:
    """What an adapted model can be exported as; each ``*_reason`` is None when possible, else why not."""

    merged_reason: str | None
    peft_exact_reason: str | None
    peft_svd_reason: str | None
    default_rank: int  # the rank offered for an SVD conversion (``Method.default_export_rank()``, else 8)
    factor_rank_max: int | None  # set when every layer supports a rank choice: the largest rank they all give

    @property
    def peft_possible(self) -> bool:
        return self.peft_exact_reason is None or self.peft_svd_reason is None


def export_options(model: TaskModel, method: Method) -> ExportOptions:
    """Decide from the adapted model and the method instance (never from its name) which exports exist.

    * merged: the instance says it is mergeable (``Method.mergeable``, which a config may switch off), or it adapts
      no layer (full fine-tuning, a linear probe: the trained model is saved as it is);
    * PEFT LoRA needs a Hugging Face model and adapted layers; exact when every layer is a ``LowRankLinear``
      (or the method's ``peft_variant`` names its factors), by truncated SVD of ΔW when every layer has a dense
      ``delta_weight()``; a chosen factor rank when every layer ``supports_rank_choice``.
    """
    import torch

    from engine.methods.base import LowRankLinear

    layers = method.adapted_layers(model)
    mergeable = method.mergeable or not layers
    merged_reason = (
        None if mergeable else f"{method.name} is not mergeable: its update is not a fixed ΔW on the weights"
    )
    default_rank = method.default_export_rank() or 8
    if not model.backend.supports_peft:
        reason = f"PEFT export needs a Hugging Face transformers model; {model.info.name} is a {model.kind} model"
        return ExportOptions(merged_reason, reason, reason, default_rank, None)
    if not layers:
        reason = f"{method.name} has no adapted linear layers: there is no low-rank update to write"
        return ExportOptions(merged_reason, reason, reason, default_rank, None)
    variant = method.peft_variant
    factored = all(isinstance(layer, LowRankLinear) for layer in layers.values())
    exact = factored or bool(variant and variant.factor_A and variant.factor_B)
    with torch.no_grad():
        dense = all(layer.delta_weight() is not None for layer in layers.values())
    svd_reason = None if dense else f"the layers of {method.name} have no dense ΔW (not linear in their input)"
    exact_reason = svd_reason or (None if exact else f"the layers of {method.name} expose no low-rank factors")
    choice = [l.rank for l in layers.values() if isinstance(l, LowRankLinear) and l.supports_rank_choice]
    factor_rank_max = min(choice) if len(choice) == len(layers) else None
    return ExportOptions(merged_reason, exact_reason, svd_reason, default_rank, factor_rank_max)


def adapter_export_options(adapter_dir: str | Path, trust_remote_code: bool = False) -> ExportOptions:
    """``export_options`` of a run's adapter directory (the adapter applied to a freshly loaded base model).

    ``trust_remote_code`` comes from the run's spec in the database (``engine.artifacts.run_trusts_remote_code``).
    """
    from engine.artifacts import load_adapted_model

    adapted = load_adapted_model(adapter_dir, trust_remote_code=trust_remote_code)
    return export_options(adapted.model, adapted.method)


def zip_directory(directory: str | Path) -> bytes:
    """The directory's files as a zip archive, under a top-level folder named after the directory."""
    directory = Path(directory)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.write(path, f"{directory.name}/{path.relative_to(directory).as_posix()}")
    return buffer.getvalue()
