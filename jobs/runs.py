"""Submit, cancel, resume and retry runs on Ray. The database is the source of truth; Ray runs the jobs.

Each attempt of a run is one Ray job. Attempt 1's submission id is the run id; attempt k's is ``RUNID.k``
(``job_id``), so a run and its jobs can always be matched up. ``sweep`` is the one place that turns what Ray
says into run statuses and retries lost runs; the keeper (``jobs.keeper``) calls it every few seconds on the
cluster, so nobody has to look at a page for a dead run to be noticed.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any

from db import config, store
from db.schema import RESUMABLE_STATUSES, utcnow
from engine.errors import UserError
from engine.spec import RunSpec, parse_spec
from jobs import cluster, warm_client

# Code shipped to remote clusters with the job (the local head imports it from the project root).
UPLOAD_EXCLUDES = [".venv", ".git", ".peftlab", "tests/artifacts", "**/__pycache__", "docs/*.png", "*.safetensors"]
SUBMIT_GRACE_S = 60.0  # a queued run whose job Ray does not know yet may still be being submitted


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
    if os.environ.get("PEFTLAB_DATA_CACHE"):  # the encoded-data cache switched off (engine.datacache)
        env_vars["PEFTLAB_DATA_CACHE"] = os.environ["PEFTLAB_DATA_CACHE"]
    if threads:
        env_vars["OMP_NUM_THREADS"] = env_vars["MKL_NUM_THREADS"] = str(max(1, int(threads)))
    if cluster.is_local():
        env_vars["PYTHONPATH"] = str(config.PROJECT_ROOT)
        return {"env_vars": env_vars}
    return {"working_dir": str(config.PROJECT_ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}


def worker_python() -> str:
    """The interpreter jobs run with: this one on the local head, the cluster's ``python`` elsewhere."""
    return sys.executable if cluster.is_local() else os.environ.get("PEFTLAB_WORKER_PYTHON", "python")


def job_id(run_id: str, attempt: int) -> str:
    """The Ray submission id of one attempt of a run."""
    return run_id if attempt == 1 else f"{run_id}.{attempt}"


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


def entrypoint_module() -> str:
    """What a run's Ray job runs: on the local head the warm client (``jobs.warm_client``: a worker forked from a
    server with torch already imported, else the cold worker), elsewhere the worker itself."""
    return "jobs.warm_client" if cluster.is_local() and warm_client.enabled() else "jobs.worker"


def _submit_attempt(run_id: str, attempt: int, spec: RunSpec) -> None:
    """Hand one attempt to Ray. ``exec`` makes the entrypoint the direct child of Ray's job supervisor, so the
    worker's watchdog sees the supervisor go (the warm client exits then, and its forked worker sees that)."""
    submit_job(
        entrypoint=f"exec {worker_python()} -m {entrypoint_module()} --run-id {run_id} --attempt {attempt}",
        submission_id=job_id(run_id, attempt),
        entrypoint_num_cpus=spec.resources.num_cpus,
        entrypoint_num_gpus=spec.resources.num_gpus,
        runtime_env=runtime_env(threads=spec.train.num_threads or spec.resources.num_cpus),
        metadata={
            "peftlab_run_id": run_id,
            "peftlab_attempt": str(attempt),
            "peftlab_method": spec.method.name,
            "peftlab_model": spec.model,
        },  # fmt: skip
    )


def submit_run(spec: RunSpec | dict) -> str:
    """Check the spec against the model, the data and the cluster, record a queued run, then hand it to Ray.

    Nothing is recorded when the checks fail (``UserError``). If Ray refuses the job, the run is failed with
    Ray's reason.
    """
    from jobs.preflight import preflight

    spec = parse_spec(spec)
    preflight(spec)
    cluster.ensure_keeper()
    run_id = store.create_run(spec.model_dump(mode="json"), executor="ray")
    try:
        _submit_attempt(run_id, 1, spec)
    except Exception as err:  # noqa: BLE001 - whatever Ray says, keep the run and say why it failed
        store.finish_run(run_id, "failed", error=f"submission to Ray failed: {err}")
        raise
    return run_id


def submit_seeds(spec: RunSpec | dict, seeds: list[int]) -> list[str]:
    """One run per seed (several seeds -> several runs)."""
    spec = parse_spec(spec)
    return [submit_run(spec.with_seed(s)) for s in seeds]


def _get(run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    if run is None:
        raise UserError(
            f"no run {run_id} in the database at {config.db_location()}: list runs with python -m app.cli ls"
        )
    return run


def cancel_run(run_id: str) -> bool:
    """Mark the run cancelled (if it may still be cancelled) and stop its current Ray job if there is one."""
    run = _get(run_id)
    changed = store.finish_run(run_id, "cancelled", error="cancelled by the user")
    if run["executor"] == "ray":
        try:
            cluster.job_client().stop_job(job_id(run_id, run["attempt"]))
        except Exception:  # noqa: BLE001 - the job may already be gone; the database says cancelled
            pass
    return changed


def resume_run(run_id: str, *, reason: str = "resumed by the user") -> int:
    """Queue the next attempt of a failed, lost or cancelled run and submit it to Ray; it continues from the run's
    last checkpoint. Returns the new attempt number."""
    run = _get(run_id)
    if run["executor"] == "merge":
        raise UserError(f"run {run_id} is a merge, which has nothing to resume: merge again (python -m app.cli merge)")
    if run["status"] not in RESUMABLE_STATUSES:
        raise UserError(
            f"run {run_id} is {run['status']}: only a {', '.join(RESUMABLE_STATUSES)} run can be resumed"
            + (" (clone it to train again)" if run["status"] == "succeeded" else "")
        )
    spec = parse_spec(run["spec"])
    from jobs.preflight import check_resources

    check_resources(spec)
    cluster.ensure_keeper()
    attempt = store.requeue(run_id, reason=reason, only_from=RESUMABLE_STATUSES)
    if attempt is None:
        raise UserError(f"run {run_id} changed status while resuming it: look at it again (python -m app.cli show)")
    store.update_run(run_id, executor="ray")
    try:
        _submit_attempt(run_id, attempt, spec)
    except Exception as err:  # noqa: BLE001
        store.finish_run(run_id, "failed", error=f"submission to Ray failed: {err}", attempt=attempt)
        raise
    return attempt


def job_logs(run_id: str, tail: int = 200) -> str:
    """The run's log: the worker's own log file (all attempts), else what Ray kept."""
    run = _get(run_id)
    path = config.artifacts_root() / run_id / "worker.log"
    if path.exists():
        text = path.read_text(errors="replace")
    else:
        try:
            text = cluster.job_client().get_job_logs(job_id(run_id, run["attempt"]))
        except Exception:  # noqa: BLE001
            return ""
    return "\n".join(text.splitlines()[-tail:])


def sweep() -> dict[str, str]:
    """Make the database agree with Ray and retry lost runs; returns {run_id: what happened}.

    - the liveness rule (``store.expire_stale``): a running attempt without a heartbeat for LOST_AFTER_S is lost;
    - a running or queued attempt whose Ray job ended, or that Ray does not know (after the submission grace),
      without a final status from its worker is lost;
    - a lost Ray run with retries left is queued again as attempt k+1 and resubmitted (it resumes from its last
      checkpoint); one without is failed, with the reason and how to resume it by hand.
    A run that failed by its own error (bad input, divergence) is failed by its worker, never lost, so it is not
    retried. Every change is one conditional UPDATE, so several sweepers can never double a retry.
    """
    changes: dict[str, str] = {}
    store.expire_stale()
    runs = [r for r in store.list_runs(status=("queued", "running", "lost"), limit=None) if r["executor"] == "ray"]
    if not runs:
        return changes
    try:
        jobs = {j.submission_id: j for j in cluster.job_client().list_jobs()}
    except Exception:  # noqa: BLE001 - Ray unreachable: change nothing now, the next sweep tries again
        return changes
    now = utcnow()
    for run in runs:
        if run["status"] == "lost":
            continue
        job = jobs.get(job_id(run["id"], run["attempt"]))
        if job is None:
            since = run["heartbeat_at"] or run["created_at"]
            if run["status"] == "running" or now - since < timedelta(seconds=SUBMIT_GRACE_S):
                continue  # running: the heartbeat rule decides; queued: may still be being submitted
            reason = "Ray does not know this run's job (was the cluster restarted?)"
        elif job.status.is_terminal():
            reason = f"its Ray job ended ({job.status}) without a final status from the worker"
            if job.message:
                reason += f": {job.message.strip().splitlines()[0]}"
        else:
            continue
        if store.transition(run["id"], "lost", of_attempt=run["attempt"], only_from=("queued", "running"),
                            error=reason):  # fmt: skip
            changes[run["id"]] = "lost"
    for run in store.list_runs(status=("lost",), limit=None):
        if run["executor"] != "ray":
            continue  # an in-process run stays lost until someone resumes it
        job = jobs.get(job_id(run["id"], run["attempt"]))
        if job is not None and str(job.status) == "STOPPED":  # someone stopped it through Ray itself: no retry
            store.transition(
                run["id"],
                "cancelled",
                of_attempt=run["attempt"],
                only_from=("lost",),
                error="its Ray job was stopped through Ray (ray job stop)",
                finished_at=utcnow(),
            )
            changes[run["id"]] = "cancelled"
            continue
        changes[run["id"]] = _retry(run)
    return changes


def _retry(run: dict[str, Any]) -> str:
    """Retry a lost run if it has retries left, else fail it; returns what happened."""
    spec = parse_spec(run["spec"])
    reason = run["error"] or "lost"
    if run["attempt"] > spec.resources.max_retries:
        error = (f"lost at attempt {run['attempt']} ({reason}); retries used up (resources.max_retries = "
                 f"{spec.resources.max_retries}): resume it with python -m app.cli resume {run['id']}")  # fmt: skip
        store.transition(run["id"], "failed", of_attempt=run["attempt"], only_from=("lost",), error=error,
                         finished_at=utcnow())  # fmt: skip
        return "failed"
    attempt = store.requeue(run["id"], reason=f"retrying: attempt {run['attempt']} was lost ({reason})",
                            only_from=("lost",))  # fmt: skip
    if attempt is None:
        return "unchanged"  # another sweeper, or the stalled attempt itself, got there first
    try:
        _submit_attempt(run["id"], attempt, spec)
    except Exception as err:  # noqa: BLE001
        store.finish_run(run["id"], "failed", error=f"retry submission to Ray failed: {err}", attempt=attempt)
        return "failed"
    return f"retried as attempt {attempt}"
