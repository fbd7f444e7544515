"""Submit, cancel, inspect and reconcile runs on Ray. The database is the source of truth; Ray runs the jobs.

A run's Ray submission id *is* its run id, so the two can always be matched up.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from db import config, store
from engine.spec import RunSpec, parse_spec
from jobs import cluster

# Code shipped to remote clusters with the job (the local head imports it from the project root).
UPLOAD_EXCLUDES = [".venv", ".git", ".peftlab", "tests/artifacts", "**/__pycache__", "docs/*.png", "*.safetensors"]


def runtime_env(threads: float | None = None) -> dict[str, Any]:
    """Environment of every PEFT Lab job: where the database and artifacts are, and the code.

    ``threads`` caps the job's CPU threads (OpenMP, MKL, torch) at the CPUs Ray reserved for it, so jobs sharing a
    node do not oversubscribe its cores.
    """
    env_vars = {
        "PEFTLAB_DB_URL": config.db_url(),
        "PEFTLAB_ARTIFACTS": str(config.artifacts_root()),
        "PEFTLAB_HOME": str(config.home()),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads:
        env_vars["OMP_NUM_THREADS"] = env_vars["MKL_NUM_THREADS"] = str(max(1, int(threads)))
    if cluster.is_local():
        env_vars["PYTHONPATH"] = str(config.PROJECT_ROOT)
        return {"env_vars": env_vars}
    return {"working_dir": str(config.PROJECT_ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}


def worker_python() -> str:
    """The interpreter jobs run with: this one on the local head, the cluster's ``python`` elsewhere."""
    return sys.executable if cluster.is_local() else os.environ.get("PEFTLAB_WORKER_PYTHON", "python")


def submit_job(retry_s: float = 60.0, **kwargs: Any) -> str:
    """``JobSubmissionClient.submit_job``, retried while a just-started head has no job agent yet."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return cluster.job_client().submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit_run(spec: RunSpec | dict) -> str:
    """Record a queued run, then hand it to Ray. If Ray refuses, the run is failed with Ray's reason."""
    spec = parse_spec(spec)
    run_id = store.create_run(spec.model_dump(mode="json"), executor="ray")
    try:
        submit_job(
            entrypoint=f"{worker_python()} -m jobs.worker --run-id {run_id}",
            submission_id=run_id,
            entrypoint_num_cpus=spec.resources.num_cpus,
            entrypoint_num_gpus=spec.resources.num_gpus,
            runtime_env=runtime_env(threads=spec.train.num_threads or spec.resources.num_cpus),
            metadata={"peftlab_method": spec.method.name, "peftlab_model": spec.model},
        )
    except Exception as err:  # noqa: BLE001 - whatever Ray says, keep the run and say why it failed
        store.finish_run(run_id, "failed", error=f"submission to Ray failed: {err}")
        raise
    return run_id


def submit_seeds(spec: RunSpec | dict, seeds: list[int]) -> list[str]:
    """One run per seed (several seeds -> several runs)."""
    spec = parse_spec(spec)
    return [submit_run(spec.with_seed(s)) for s in seeds]


def cancel_run(run_id: str) -> bool:
    """Mark the run cancelled (first final status wins) and stop its Ray job if there is one."""
    run = store.get_run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id}")
    changed = store.finish_run(run_id, "cancelled", error="cancelled by the user")
    if run["executor"] == "ray":
        try:
            cluster.job_client().stop_job(run_id)
        except Exception:  # noqa: BLE001 - the job may already be gone; the database says cancelled
            pass
    return changed


def job_logs(run_id: str, tail: int = 200) -> str:
    """The run's log: the worker's own log file, else what Ray kept."""
    path = config.artifacts_root() / run_id / "worker.log"
    if path.exists():
        text = path.read_text(errors="replace")
    else:
        try:
            text = cluster.job_client().get_job_logs(run_id)
        except Exception:  # noqa: BLE001
            return ""
    return "\n".join(text.splitlines()[-tail:])


def reconcile() -> dict[str, str]:
    """Make the database agree with Ray for every active Ray run; returns {run_id: new status}.

    A run whose job Ray does not know (the cluster was restarted) or whose job ended without the worker
    writing a final status is failed with that reason.
    """
    active = [r for r in store.list_runs(status=("queued", "running"), limit=None) if r["executor"] == "ray"]
    if not active:
        return {}
    try:
        client = cluster.job_client()
        known = {j.submission_id: j for j in client.list_jobs()}
    except Exception:  # noqa: BLE001 - Ray unreachable: change nothing, the UI says so
        return {}
    changes = {}
    for run in active:
        job = known.get(run["id"])
        if job is None:
            reason, status = "Ray no longer knows this job (was the cluster restarted?)", "failed"
        elif job.status.is_terminal():
            status = "cancelled" if str(job.status) == "STOPPED" else "failed"
            tail = job_logs(run["id"], tail=20)
            reason = f"Ray job ended ({job.status}) without a final status from the worker: {job.message or ''}"
            reason += f"\n{tail}" if tail else ""
        else:
            continue
        if store.finish_run(run["id"], status, error=reason):
            changes[run["id"]] = status
    return changes
