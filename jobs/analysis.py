"""Analyses of a trained run as stored, reusable artifacts: a generic cache and Ray runner over registered kinds.

Each kind (``spectra``, ``importance``, ``landscape``, ...) is one module of ``engine.analysis.kinds`` declaring
its params class, the run artifacts it needs, compute, its files, load and headline (see
``engine.analysis.kinds.base``). ``compute_analysis(run_id, kind, params)`` hands the kind what it needs from the
run's artifact directory, saves the result beside the run's adapter (``analysis/<stem>.<suffix>``) and records
every file with ``db.store.add_artifact`` (kind ``analysis:<kind>``).

Reuse: the JSON file records the validated parameters and the sha256 of the inputs (the artifacts the kind
needs). A later call with the same parameters on unchanged inputs returns the stored artifact without
recomputing; ``force=True`` recomputes. The JSON file is written last and removed before a recomputation starts,
so an interrupted computation is never mistaken for a finished one.

Landscapes can take minutes on real models, so any analysis can also run as a Ray job:
``submit_analysis(run_id, kind, params)`` starts ``python -m jobs.analysis --run-id ID --kind K --params JSON
--progress-file PATH``, whose ``main`` writes its progress (fraction in [0, 1] and the fractions so far) to that
small JSON file under the run's ``analysis/jobs/``; ``analysis_job_status`` reads it with Ray's job status.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from db import config, store
from engine.analysis.kinds import (
    AnalysisError,
    AnalysisInputs,
    AnalysisParams,
    Progress,
    analysis_kinds,
    get_analysis,
)
from engine.analysis.kinds.importance import ImportanceParams, load_importance, save_importance
from engine.analysis.kinds.landscape import LANDSCAPE_GRID_DEFAULTS, LandscapeParams
from engine.analysis.kinds.spectra import SpectraParams

__all__ = [
    "LANDSCAPE_GRID_DEFAULTS",
    "AnalysisError",
    "ImportanceParams",
    "LandscapeParams",
    "SpectraParams",
    "analysis_job_status",
    "analysis_kinds",
    "compute_analysis",
    "headline",
    "load_importance",
    "parse_params",
    "save_importance",
    "submit_analysis",
    "trained_run",
]

ANALYSIS_DIR = "analysis"
JOBS_DIR = "jobs"  # under ANALYSIS_DIR: the progress files of Ray jobs


# --- parameters ------------------------------------------------------------------------------------


def parse_params(kind: str, params: dict[str, Any] | None) -> AnalysisParams:
    """Validate ``params`` for ``kind``; errors name the field (``landscape.grid: ...``)."""
    analysis = get_analysis(kind)
    try:
        return analysis.params_cls.model_validate(params or {})
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
        where = config.db_location()
        raise AnalysisError(f"no run {run_id} in the database at {where}: list runs with python -m app.cli ls")
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


def _latest(run_id: str, kind: str) -> dict[str, Any] | None:
    rows = store.list_artifacts(run_id, kind)
    return rows[-1] if rows else None


def artifact_files(run_id: str, kind: str, params: AnalysisParams) -> list[Path]:
    """The files an analysis writes, the JSON one (written last, the completion marker) last."""
    return get_analysis(kind).files(config.run_dir(run_id) / ANALYSIS_DIR, params)


def _record_artifacts(run_id: str, kind: str, paths: list[Path], *, only_missing: bool) -> None:
    recorded = {a["path"] for a in store.list_artifacts(run_id, f"analysis:{kind}")}
    for path in paths:
        if not only_missing or str(path.resolve()) not in recorded:
            store.add_artifact(run_id, f"analysis:{kind}", path)


# --- computing -------------------------------------------------------------------------------------


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
    analysis = get_analysis(kind)
    parsed = parse_params(kind, params)
    run, adapter_dir = trained_run(run_id)
    rows = {need: _latest(run_id, need) for need in analysis.needs}
    inputs = AnalysisInputs(run, adapter_dir, {k: Path(r["path"]) if r else None for k, r in rows.items()})
    record = {"params": parsed.key(), "inputs": {k: r["sha256"] if r else None for k, r in rows.items()}}
    analysis.check(inputs)
    paths = artifact_files(run_id, kind, parsed)
    json_path = paths[-1]
    stored = analysis.stored_record(json_path) or {}
    same = stored.get("params") == record["params"] and stored.get("inputs") == record["inputs"]
    reused = not force and same and all(p.is_file() for p in paths)
    if reused:
        _record_artifacts(run_id, kind, paths, only_missing=True)
    else:
        json_path.unlink(missing_ok=True)

        def fractions(fraction: float) -> None:
            if progress is not None and fraction < 1.0:  # 1.0 only once the artifact is recorded
                progress(fraction)

        analysis.compute(inputs, parsed, record | {"computed_at": time.time()}, json_path, fractions)
        if analysis.stored_record(json_path) is None:
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
        "headline": analysis.headline(json_path),
    }


def headline(kind: str, json_path: Path) -> dict[str, Any]:
    """The scalars of a stored analysis that a table row or the CLI shows (the kind's ``headline``)."""
    return get_analysis(kind).headline(json_path)


# --- Ray jobs --------------------------------------------------------------------------------------


def progress_file(run_id: str, job_id: str) -> Path:
    """Where the Ray job ``job_id`` writes its progress: ``analysis/jobs/<job_id>.progress.json`` of the run."""
    return config.run_dir(run_id) / ANALYSIS_DIR / JOBS_DIR / f"{job_id}.progress.json"


def read_progress(path: str | Path | None) -> dict[str, Any]:
    """The progress file's content (``progress``, ``history``), or progress 0 when there is none yet."""
    try:
        data = json.loads(Path(path).read_text()) if path else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        data = {}
    return data if isinstance(data, dict) and "progress" in data else {"progress": 0.0, "history": []}


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
    progress_path = progress_file(run_id, job_id)
    entrypoint = _entrypoint(run_id, kind, parsed.model_dump(mode="json"))
    entrypoint += f" --progress-file {shlex.quote(str(progress_path))}"
    if force:
        entrypoint += " --force"
    submit_job(
        entrypoint=entrypoint,
        submission_id=job_id,
        entrypoint_num_cpus=resources.num_cpus,
        entrypoint_num_gpus=resources.num_gpus,
        runtime_env=runtime_env(threads=resources.num_cpus),
        metadata={"peftlab_run_id": run_id, "peftlab_analysis": kind, "peftlab_progress_file": str(progress_path)},
    )
    return job_id


def analysis_job_status(job_id: str) -> dict[str, Any]:
    """Ray's status of an analysis job with its progress (from its progress file) and, once done, its artifacts."""
    from jobs import cluster

    info = cluster.job_client().get_job_info(job_id)
    meta = info.metadata or {}
    run_id, kind = meta.get("peftlab_run_id"), meta.get("peftlab_analysis")
    if run_id is None or kind is None:
        raise AnalysisError(f"Ray job {job_id} is not an analysis job (no peftlab_run_id/peftlab_analysis metadata)")
    status = str(info.status)
    return {
        "job_id": job_id,
        "run_id": run_id,
        "kind": kind,
        "status": status,
        "message": info.message,
        "progress": float(read_progress(meta.get("peftlab_progress_file"))["progress"]),
        "artifacts": store.list_artifacts(run_id, f"analysis:{kind}") if status == "SUCCEEDED" else [],
    }


def _progress_writer(path: Path | None, run_id: str, kind: str) -> Progress:
    """A progress callback that rewrites ``path`` (atomically) with the latest fraction and those before it."""
    history: list[float] = []

    def report(fraction: float) -> None:
        history.append(float(fraction))
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"run_id": run_id, "kind": kind, "progress": history[-1], "history": history,
                "updated_at": time.time()}  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    return report


def main(argv: list[str] | None = None) -> int:
    """The job entrypoint: compute one analysis, writing its progress file; prints the summary as JSON last."""
    parser = argparse.ArgumentParser(prog="python -m jobs.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--kind", required=True, choices=analysis_kinds())
    parser.add_argument("--params", default="{}", help="the analysis parameters as a JSON object")
    parser.add_argument("--progress-file", type=Path, help="JSON file to keep the progress in (Ray jobs)")
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
    report = _progress_writer(args.progress_file, args.run_id, args.kind)
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
