"""Analyses of a trained run as stored, reusable artifacts: rank spectra, importance tables, loss landscapes.

``compute_analysis(run_id, kind, params)`` rebuilds what the analysis needs from the run's artifact directory,
runs the engine function (``engine.analysis.spectra``, ``.importance``, ``.landscape``), saves the result beside
the run's adapter and records every file with ``db.store.add_artifact`` (kind ``analysis:<kind>``):

* ``analysis/spectra.{npz,json}``: singular values of ΔW per adapted layer (``adapter_spectra``); a run without
  adapted layers (full fine-tuning, linear probe) is compared with a freshly loaded base model
  (``update_spectra``, ``ΔW = W_trained − W_pretrained``);
* ``analysis/importance.json``: the tables ``engine.analysis.importance.artifact_tables`` finds in the method's
  analysis data (``<method>_analysis.json``, artifact ``method_analysis``) and the per-layer norm profile
  (artifact ``norm_profile``, ``LayerNormProfiler.to_dict()``) when the run has one;
* ``analysis/landscape-<2d|1d|interpolation>.{npz,json}``: Li et al. 2018 landscapes around the trained adapter, or
  the Goodfellow et al. 2015 line from the method's fresh initialisation at the run's seed (what
  ``engine.train.prepare`` builds before the first step) to the trained adapter, on the first examples of the
  run's eval split, batched over grid points with ``torch.vmap``.

Reuse: the JSON file records the validated parameters and the sha256 of the inputs (adapter files, method
analysis, norm profile). A later call with the same parameters on unchanged inputs returns the stored artifact
without recomputing; ``force=True`` recomputes. The JSON file is written last and removed before a recomputation
starts, so an interrupted computation is never mistaken for a finished one.

Landscapes can take minutes on real models, so any analysis can also run as a Ray job:
``submit_analysis(run_id, kind, params)`` starts ``python -m jobs.analysis --run-id ID --kind K --params JSON``,
whose ``main`` writes its progress as metric rows (key ``analysis_<kind>_progress``, value in [0, 1]) that
``analysis_job_status`` and the dashboard read.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from db import config, store

KINDS: tuple[str, ...] = ("spectra", "importance", "landscape")
ANALYSIS_DIR = "analysis"
LANDSCAPE_GRID_DEFAULTS = {"2d": 11, "1d": 21, "interpolation": 31}

Progress = Callable[[float], None]


class AnalysisError(ValueError):
    """An analysis that cannot be done as asked; the message names the argument or field and the fix."""


# --- parameters ------------------------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def key(self) -> dict[str, Any]:
        """The parameters that decide the result (what reuse compares and the artifact records)."""
        return self.model_dump(mode="json")


class SpectraParams(_Params):
    """Settings of ``engine.analysis.spectra`` (intruder dimensions: Shuttleworth et al. 2024, Def. 1)."""

    intruder_k: int = Field(10, ge=0, le=1000, description="top singular vectors checked for intruders (0: skip)")
    intruder_epsilon: float = Field(0.5, gt=0.0, le=1.0, description="a vector is an intruder below this |cos|")
    intruder_side: Literal["left", "right"] = Field(
        "left", description="compare output-space (left) or input-space (right) singular vectors"
    )
    use_factors: bool = Field(True, description="take σ(BA) from the low-rank factors when a layer exposes them")


class ImportanceParams(_Params):
    """Importance tables have no settings: they are read from what the method recorded during training."""


class LandscapeParams(_Params):
    """Settings of a loss landscape (Li et al. 2018, arXiv 1712.09913) or interpolation (Goodfellow et al. 2015)."""

    kind: Literal["2d", "1d", "interpolation"] = Field(
        "2d", description="2-D surface, 1-D slice along a random direction, or the init → trained line"
    )
    grid: int | None = Field(
        None,
        ge=2,
        le=401,
        validate_default=True,
        description="points per axis (default 11 for 2d, 21 for 1d, 31 for interpolation)",
    )
    span: float = Field(1.0, gt=0.0, description="2d/1d: coordinates range over [−span, span] (filter-normalised)")
    margin: float = Field(0.25, ge=0.0, le=10.0, description="interpolation: t ranges over [−margin, 1 + margin]")
    examples: int = Field(64, ge=1, description="evaluation examples: the first ones of the run's eval split")
    seed: int = Field(0, description="2d/1d: seed of the random directions")
    normalization: Literal["filter", "layer", "none"] = Field(
        "filter", description="2d/1d: rescale directions per filter (Li et al. sec. 4), per tensor, or not at all"
    )
    chunk_size: int = Field(32, ge=1, le=4096, description="grid points evaluated by one batched (vmap) forward")

    @field_validator("grid")
    @classmethod
    def _grid_for_kind(cls, grid: int | None, info: ValidationInfo) -> int:
        kind = info.data.get("kind", "2d")
        if grid is None:
            return LANDSCAPE_GRID_DEFAULTS[kind]
        if kind != "interpolation" and grid % 2 == 0:
            raise ValueError(
                f"{grid} is even: use an odd grid (e.g. {grid + 1}) so that the trained solution (coordinate 0) is a "
                "grid point"
            )
        return grid

    def key(self) -> dict[str, Any]:
        unused = {"span", "seed", "normalization"} if self.kind == "interpolation" else {"margin"}
        return self.model_dump(mode="json", exclude=unused | {"chunk_size"})


PARAMS: dict[str, type[_Params]] = {
    "spectra": SpectraParams,
    "importance": ImportanceParams,
    "landscape": LandscapeParams,
}


def parse_params(kind: str, params: dict[str, Any] | None) -> _Params:
    """Validate ``params`` for ``kind``; errors name the field (``landscape.grid: ...``)."""
    if kind not in PARAMS:
        raise AnalysisError(f"kind {kind!r} is not an analysis: choose from {', '.join(KINDS)}")
    try:
        return PARAMS[kind].model_validate(params or {})
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            parts.append(f"{kind}.{loc}: {message}" if loc else message)
        raise AnalysisError(f"invalid {kind} parameters: " + "; ".join(parts)) from None


# --- the run and its files -------------------------------------------------------------------------


def trained_run(run_id: str) -> tuple[dict[str, Any], Path]:
    """The run row and the directory holding its adapter, or an ``AnalysisError`` saying what is missing."""
    run = store.get_run(run_id)
    if run is None:
        raise AnalysisError(f"run id {run_id!r} does not exist: list the runs with `python -m app.cli ls`")
    adapters = store.list_artifacts(run_id, "adapter")
    if not adapters:
        raise AnalysisError(
            f"run {run_id} (status {run['status']}) has no adapter artifact: analyses and exports need a run that "
            "finished training; wait for it or pick a succeeded run"
        )
    directory = Path(adapters[-1]["path"]).parent
    if not directory.is_dir():
        raise AnalysisError(f"run {run_id}: its artifact directory {directory} is gone")
    return run, directory


def _artifact_sha(run_id: str, kind: str) -> str | None:
    rows = store.list_artifacts(run_id, kind)
    return rows[-1]["sha256"] if rows else None


def _inputs(run_id: str, kind: str) -> dict[str, str | None]:
    """sha256 of the files an analysis reads (as recorded in the database)."""
    kinds = ("method_analysis", "norm_profile") if kind == "importance" else ("adapter", "adapter_config")
    return {k: _artifact_sha(run_id, k) for k in kinds}


def artifact_files(run_id: str, kind: str, params: _Params) -> list[Path]:
    """The files an analysis writes, the JSON one (written last, the completion marker) last."""
    folder = config.run_dir(run_id) / ANALYSIS_DIR
    if kind == "importance":
        return [folder / "importance.json"]
    stem = "spectra" if kind == "spectra" else f"landscape-{params.kind}"
    return [folder / f"{stem}.npz", folder / f"{stem}.json"]


def _stored_record(kind: str, json_path: Path) -> dict[str, Any] | None:
    """The ``analysis`` record (params, inputs) a stored artifact was computed with, or None."""
    try:
        data = json.loads(json_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    holder = {"spectra": data.get("settings"), "landscape": data.get("meta"), "importance": data}[kind]
    return (holder or {}).get("analysis")


def _record_artifacts(run_id: str, kind: str, paths: list[Path], *, only_missing: bool) -> None:
    recorded = {a["path"] for a in store.list_artifacts(run_id, f"analysis:{kind}")}
    for path in paths:
        if not only_missing or str(path.resolve()) not in recorded:
            store.add_artifact(run_id, f"analysis:{kind}", path)


# --- computing -------------------------------------------------------------------------------------


def _load_trained(adapter_dir: Path):
    """(meta, model, method): the trained adapter applied to its freshly loaded base model."""
    from engine.export import apply_adapter, fresh_model, import_adapter

    imported = import_adapter(adapter_dir)
    model, method = apply_adapter(imported.meta, imported.tensors, fresh_model(imported.meta))
    return imported.meta, model, method


def _compute_spectra(run: dict, adapter_dir: Path, params: SpectraParams, record: dict, stem: Path, _progress):
    from engine.analysis.spectra import adapter_spectra, save_spectra, update_spectra
    from engine.export import fresh_model
    from engine.methods import Method

    meta, model, _method = _load_trained(adapter_dir)
    intruders = {"intruder_k": params.intruder_k, "intruder_epsilon": params.intruder_epsilon,
                 "intruder_side": params.intruder_side}  # fmt: skip
    if Method.adapted_layers(model):
        spectra = adapter_spectra(model, use_factors=params.use_factors, **intruders)
    else:  # every weight trained (or none): ΔW = W_trained − W_pretrained
        spectra = update_spectra(fresh_model(meta), model, **intruders)
    spectra.settings["analysis"] = record
    save_spectra(spectra, stem)


def _compute_importance(run: dict, _adapter_dir: Path, _params: ImportanceParams, record: dict, stem: Path, _progress):
    from engine.analysis.importance import artifact_tables, norm_profile_table

    run_id = run["id"]
    tables: dict[str, pd.DataFrame] = {}
    sources: dict[str, str] = {}
    for source in ("method_analysis", "norm_profile"):
        rows = store.list_artifacts(run_id, source)
        if not rows:
            continue
        path = Path(rows[-1]["path"])
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AnalysisError(f"run {run_id}: artifact {source} ({path}) cannot be read: {err}") from None
        sources[source] = str(path)
        if source == "method_analysis":
            tables |= artifact_tables(data)
        else:
            tables["norm_profile"] = norm_profile_table(data)
    save_importance(tables, stem, {"run_id": run_id, "method": run["method"], "sources": sources, "analysis": record})


def _compute_landscape(run: dict, adapter_dir: Path, params: LandscapeParams, record: dict, stem: Path, progress):
    from engine.analysis import landscape as ls
    from engine.data import iterate_batches
    from engine.export import check_adapter_fits, import_adapter
    from engine.spec import parse_spec
    from engine.train import classification_loss, prepare

    spec = parse_spec(run["spec"])
    prep = prepare(spec)  # the method's fresh initialisation at the run's seed, as training started from
    model, method = prep.model, prep.method
    init = ls.trainable_parameters(model)
    imported = import_adapter(adapter_dir)
    method.load_state(model, imported.meta.get("method_state") or {})
    check_adapter_fits(imported.meta, model, method, imported.tensors)
    method.load_adapter_state_dict(model, {k: v.to(prep.device) for k, v in imported.tensors.items()})
    model.eval()
    # The batches engine.train.evaluate uses, so the centre point reproduces the run's eval loss.
    batches = list(iterate_batches(prep.data.eval, spec.train.batch_size * 2, shuffle=False))
    common = {"model_loss": classification_loss, "max_examples": params.examples, "chunk_size": params.chunk_size,
              "progress": progress}  # fmt: skip
    if params.kind == "interpolation":
        trained = ls.trainable_parameters(model)
        start = {n: t for n, t in init.items() if n in trained and t.shape == trained[n].shape}
        result = ls.interpolation(model, batches, start, steps=params.grid, margin=params.margin, **common)
        result["meta"]["fixed_parameters"] = sorted(set(trained) - set(start))
    else:
        fn = ls.landscape_2d if params.kind == "2d" else ls.landscape_1d
        result = fn(model, batches, steps=params.grid, span=params.span, seed=params.seed,
                    normalization=params.normalization, **common)  # fmt: skip
    result["meta"]["analysis"] = record
    result["meta"]["device"] = str(prep.device)
    ls.save_landscape(result, stem)


COMPUTE = {"spectra": _compute_spectra, "importance": _compute_importance, "landscape": _compute_landscape}


def compute_analysis(
    run_id: str,
    kind: str,
    params: dict[str, Any] | None = None,
    progress: Progress | None = None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Compute (or reuse) one analysis of a trained run, store it as artifacts and return its summary.

    ``progress`` receives fractions in [0, 1); 1.0 is reported once the artifact is stored and recorded. The
    summary holds ``run_id``, ``kind``, ``params`` (validated, defaults filled), ``artifacts`` (paths),
    ``reused`` and ``headline`` (the scalars a table or CLI shows; see ``headline``).
    """
    parsed = parse_params(kind, params)
    run, adapter_dir = trained_run(run_id)
    record = {"params": parsed.key(), "inputs": _inputs(run_id, kind)}
    if kind == "importance" and not any(record["inputs"].values()):
        raise AnalysisError(
            f"run {run_id} (method {run['method']}) has no method_analysis or norm_profile artifact: importance "
            "tables come from what a method records during training (e.g. heat's head scores, pear's position "
            "scores, mola's router loads); pick a run of such a method"
        )
    paths = artifact_files(run_id, kind, parsed)
    json_path = paths[-1]
    stored = _stored_record(kind, json_path) or {}
    same = stored.get("params") == record["params"] and stored.get("inputs") == record["inputs"]
    reused = not force and same and all(p.is_file() for p in paths)
    if reused:
        _record_artifacts(run_id, kind, paths, only_missing=True)
    else:
        json_path.unlink(missing_ok=True)

        def fractions(fraction: float) -> None:
            if progress is not None and fraction < 1.0:  # 1.0 only once the artifact is recorded
                progress(fraction)

        COMPUTE[kind](run, adapter_dir, parsed, record | {"computed_at": time.time()}, json_path, fractions)
        if _stored_record(kind, json_path) is None:
            raise RuntimeError(f"{kind} analysis of run {run_id} wrote no readable {json_path}")
        _record_artifacts(run_id, kind, paths, only_missing=False)
    if progress is not None:
        progress(1.0)
    return {
        "run_id": run_id,
        "kind": kind,
        "params": parsed.key(),
        "artifacts": [str(p) for p in paths],
        "reused": reused,
        "headline": headline(kind, json_path),
    }


# --- importance artifact ---------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def save_importance(tables: dict[str, pd.DataFrame], path: str | Path, meta: dict[str, Any]) -> Path:
    """Write the tables (columns and records; NaN as null) and ``meta`` to one JSON file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "artifact": "importance",
        **meta,
        "tables": {
            name: {"columns": list(t.columns), "records": t.astype(object).where(t.notna(), None).to_dict("records")}
            for name, t in tables.items()
        },
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)
    return path


def load_importance(path: str | Path) -> dict[str, pd.DataFrame]:
    """The tables ``save_importance`` wrote."""
    data = json.loads(Path(path).read_text())
    if data.get("artifact") != "importance":
        raise ValueError(f"{path} is not an importance artifact (artifact = {data.get('artifact')!r})")
    return {name: pd.DataFrame(t["records"], columns=t["columns"]) for name, t in data["tables"].items()}


# --- headline scalars ------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _at(alphas: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The value at coordinate ``target`` if it is a grid point, else None."""
    hits = np.flatnonzero(np.isclose(alphas, target, rtol=0.0, atol=1e-9))
    return _finite(values[hits[0]]) if hits.size else None


def headline(kind: str, json_path: Path) -> dict[str, Any]:
    """The scalars of a stored analysis that a table row or the CLI shows.

    * spectra: per-layer ``effective_rank``, ``rank``, ``stable_rank`` and ``relative_update``, their mean
      effective rank, skipped layers (no dense ΔW);
    * landscape: ``min_loss``, ``max_loss``, ``center_loss`` and ``center_accuracy`` (at the trained solution;
      for interpolation t = 1), ``init_loss`` (interpolation, t = 0), points, examples, seconds;
    * importance: each table's rows and columns.
    """
    if kind == "spectra":
        from engine.analysis.spectra import load_spectra

        spectra = load_spectra(json_path)
        table = spectra.table.set_index("layer")
        out: dict[str, Any] = {"layers": len(table), "skipped": spectra.skipped, "source": spectra.settings["kind"]}
        for column in ("effective_rank", "rank", "stable_rank", "relative_update"):
            out[column] = {name: _finite(v) if column != "rank" else int(v) for name, v in table[column].items()}
        out["mean_effective_rank"] = _finite(table["effective_rank"].mean()) if len(table) else None
        return out
    if kind == "landscape":
        from engine.analysis.landscape import load_landscape

        result = load_landscape(json_path)
        losses, meta = np.asarray(result["losses"]), result["meta"]
        accs = np.asarray(result["accuracies"]) if "accuracies" in result else None
        out = {
            "landscape": result["kind"],
            "points": int(losses.size),
            "examples": meta.get("examples"),
            "min_loss": _finite(np.nanmin(losses)),
            "max_loss": _finite(np.nanmax(losses)),
            "seconds": meta.get("seconds"),
        }
        alphas = np.asarray(result["alphas"])
        if result["kind"] == "2d":
            i = j = int(np.argmin(np.abs(alphas)))  # odd grids: the exact centre
            out["center_loss"] = _finite(losses[i, j])
            out["center_accuracy"] = _finite(accs[i, j]) if accs is not None else None
        else:
            trained = 1.0 if result["kind"] == "interpolation" else 0.0
            out["center_loss"] = _at(alphas, losses, trained)
            out["center_accuracy"] = _at(alphas, accs, trained) if accs is not None else None
            if result["kind"] == "interpolation":
                out["init_loss"] = _at(alphas, losses, 0.0)
        return out
    tables = load_importance(json_path)
    return {"tables": {name: {"rows": len(t), "columns": list(t.columns)} for name, t in tables.items()}}


# --- Ray jobs --------------------------------------------------------------------------------------


def progress_key(kind: str) -> str:
    return f"analysis_{kind}_progress"


def _last_progress_step(run_id: str, kind: str) -> int:
    steps = store.get_metrics([run_id], keys=[progress_key(kind)])["step"]
    return int(steps.max()) if len(steps) else -1


def _entrypoint(run_id: str, kind: str, params: dict[str, Any]) -> str:
    from jobs.runs import worker_python

    python = worker_python()
    return (
        f"{python} -m jobs.analysis --run-id {shlex.quote(run_id)} --kind {shlex.quote(kind)} "
        f"--params {shlex.quote(json.dumps(params))}"
    )


def submit_analysis(run_id: str, kind: str, params: dict[str, Any] | None = None, *, force: bool = False) -> str:
    """Start the analysis as a Ray job with the run's resources; returns the job (submission) id.

    The run and the parameters are checked here, so a bad request fails at once rather than in the job.
    """
    from engine.spec import parse_spec
    from jobs.runs import runtime_env, submit_job

    parsed = parse_params(kind, params)
    run, _ = trained_run(run_id)
    resources = parse_spec(run["spec"]).resources
    job_id = f"analysis-{kind}-{run_id}-{secrets.token_hex(3)}"
    entrypoint = _entrypoint(run_id, kind, parsed.model_dump(mode="json"))
    if force:
        entrypoint += " --force"
    submit_job(
        entrypoint=entrypoint,
        submission_id=job_id,
        entrypoint_num_cpus=resources.num_cpus,
        entrypoint_num_gpus=resources.num_gpus,
        runtime_env=runtime_env(threads=resources.num_cpus),
        metadata={
            "peftlab_run_id": run_id,
            "peftlab_analysis": kind,
            # Progress rows of earlier jobs end at this step; this job's rows come after it.
            "peftlab_progress_after": str(_last_progress_step(run_id, kind)),
        },
    )
    return job_id


def analysis_job_status(job_id: str) -> dict[str, Any]:
    """Ray's status of an analysis job with its progress (from the metric rows) and, once done, its artifacts."""
    from jobs import cluster

    info = cluster.job_client().get_job_info(job_id)
    meta = info.metadata or {}
    run_id, kind = meta.get("peftlab_run_id"), meta.get("peftlab_analysis")
    if run_id is None or kind is None:
        raise AnalysisError(f"Ray job {job_id} is not an analysis job (no peftlab_run_id/peftlab_analysis metadata)")
    status = str(info.status)
    rows = store.get_metrics([run_id], keys=[progress_key(kind)])
    rows = rows[rows["step"] > int(meta.get("peftlab_progress_after", -1))]
    progress = float(rows.sort_values("step")["value"].iloc[-1]) if len(rows) else 0.0
    return {
        "job_id": job_id,
        "run_id": run_id,
        "kind": kind,
        "status": status,
        "message": info.message,
        "progress": progress,
        "artifacts": store.list_artifacts(run_id, f"analysis:{kind}") if status == "SUCCEEDED" else [],
    }


def main(argv: list[str] | None = None) -> int:
    """The job entrypoint: compute one analysis, writing progress rows; prints the summary as JSON last."""
    parser = argparse.ArgumentParser(prog="python -m jobs.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--params", default="{}", help="the analysis parameters as a JSON object")
    parser.add_argument("--force", action="store_true", help="recompute even if a stored artifact matches")
    args = parser.parse_args(argv)
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        print(f"error: --params is not valid JSON ({err}); pass an object such as '{{\"grid\": 11}}'", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print(f"error: --params must be a JSON object, not {type(params).__name__}", file=sys.stderr)
        return 2
    if store.get_run(args.run_id) is None:
        print(f"error: run id {args.run_id!r} does not exist", file=sys.stderr)
        return 2
    key, step = progress_key(args.kind), _last_progress_step(args.run_id, args.kind)

    def report(fraction: float) -> None:
        nonlocal step
        step += 1
        store.log_metrics(args.run_id, [(step, key, fraction)])

    report(0.0)
    try:
        summary = compute_analysis(args.run_id, args.kind, params, progress=report, force=args.force)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
