"""Studies on Ray: submit a study, cancel it, find its best trial, and keep its status true.

A study is one Ray job (submission id = study id) running ``jobs.study_driver``, which runs the search with Ray
Tune. Grid and random studies have every trial recorded as a queued run here, before the job starts; Optuna's
trials are recorded as Tune proposes them. Each trial is a run like any other (Run detail, analyses, export), with
its study id and the values of the searched fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError

from db import config, store
from db import studies as db_studies
from db.schema import ACTIVE_STATUSES, FINAL_STATUSES
from engine.errors import UserError
from engine.study import StudySpec, count_trials, expand, parse_study, trial_spec
from jobs import cluster
from jobs.runs import runtime_env, submit_job, worker_python

EXECUTOR = "tune"  # runs.executor of a study's trials


def _trial_name(study: StudySpec, index: int, params: dict[str, Any]) -> str:
    shown = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items() if k != "train.seed")
    return f"{study.name} #{index} {shown}".strip()[:200]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _create_trial(study_id: str, study: StudySpec, index: int, params: dict[str, Any], tags: Sequence[str]) -> str:
    """Insert trial ``index`` as a queued run (its spec: the base with ``params`` applied); IntegrityError if the
    number is taken."""
    assert study.spec is not None
    spec = trial_spec(study.spec, params).model_dump(mode="json")
    spec["name"] = _trial_name(study, index, params)
    spec["tags"] = [*spec.get("tags", []), f"study:{study_id}", *tags]
    run_id = db_studies.trial_id(study_id, index)
    return store.create_run(spec, executor=EXECUTOR, run_id=run_id, study_id=study_id, trial_params=params)


def record_trial(study_id: str, study: StudySpec, index: int, params: dict[str, Any]) -> str:
    """Record one trial as a queued run (or find it, if an earlier attempt of the driver did); returns its id."""
    run_id = db_studies.trial_id(study_id, index)
    return run_id if store.get_run(run_id) is not None else _create_trial(study_id, study, index, params, ())


def record_proposal(study_id: str, study: StudySpec, params: dict[str, Any], tune_trial_id: str) -> str:
    """A search algorithm's proposal (Optuna) as the study's next trial, numbered in the order proposals start; a
    retry of the same Tune trial finds the run recorded the first time (by its ``tune-trial:`` tag)."""
    tag = f"tune-trial:{tune_trial_id}"
    for _ in range(100):  # proposals starting at once race for the next number: the loser takes the one after
        trials = db_studies.trial_runs(study_id)
        mine = [t["id"] for t in trials if tag in (t["tags"] or [])]
        if mine:
            return mine[0]
        try:
            return _create_trial(study_id, study, len(trials), params, [tag])
        except IntegrityError:
            continue
    raise RuntimeError(f"study {study_id}: could not number the trial of Tune trial {tune_trial_id}")


# How long a reused trial actor waits for the previous trial to wind down (seconds, as Tune reads it).
TRIAL_THREAD_TIMEOUT_S = "300"


def _study_env() -> dict[str, Any]:
    """The runs' environment, plus: a reused trial actor waits up to ``TRIAL_THREAD_TIMEOUT_S`` (Tune's default:
    2 s) for the previous trial's thread to record its end (a stopped trial still writes its status and log), rather
    than giving up the actor and failing the next trial."""
    env = runtime_env()
    env["env_vars"]["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = TRIAL_THREAD_TIMEOUT_S
    return env


def record_study(study: StudySpec | dict[str, Any]) -> str:
    """Validate the study and record it, with its trials for grid and random searches, as queued; returns its id.
    ``jobs.study_driver.run_study`` runs it (``submit_study`` does both, the search as a Ray job)."""
    study = parse_study(study)
    study_id = db_studies.create_study(study.model_dump(mode="json"), count_trials(study))
    if study.search != "optuna":
        for index, params in enumerate(expand(study)):
            record_trial(study_id, study, index, params)
    return study_id


def submit_study(study: StudySpec | dict[str, Any]) -> str:
    """Validate the study, check its base run against the model, data and cluster, record it (and its trials for
    grid and random searches), then hand its driver to Ray. Returns the study id."""
    from jobs.preflight import preflight

    study = parse_study(study)
    preflight(study.base_spec())
    cluster.ensure_keeper()
    study_id = record_study(study)
    try:
        submit_job(
            entrypoint=f"exec {worker_python()} -m jobs.study_driver --study-id {study_id}",
            submission_id=study_id,
            entrypoint_num_cpus=0,  # the driver only schedules: the trials hold the CPUs
            runtime_env=_study_env(),
            metadata={"peftlab_study_id": study_id},
        )
    except Exception as err:  # noqa: BLE001 - keep the study and say why it failed
        fail_study(study_id, f"submission to Ray failed: {err}")
        raise
    return study_id


def _get(study_id: str) -> dict[str, Any]:
    study = db_studies.get_study(study_id)
    if study is None:
        raise UserError(
            f"no study {study_id} in the database at {config.db_location()}: list studies with "
            "python -m app.cli study ls"
        )
    return study


def _end_trials(study_id: str, status: str, reason: str) -> int:
    """Give every trial still queued or running (or lost) a final status; returns how many changed."""
    changed = 0
    for run in db_studies.trial_runs(study_id):
        if run["status"] in (*ACTIVE_STATUSES, "lost"):
            changed += store.finish_run(run["id"], status, error=reason)
    return changed


def cancel_study(study_id: str) -> int:
    """Cancel the study and its queued and running trials (their watchdogs stop them within a heartbeat); the
    driver sees the study cancelled and ends the search. Returns how many trials were cancelled."""
    _get(study_id)
    db_studies.set_study_status(study_id, "cancelled", error="cancelled by the user")
    return _end_trials(study_id, "cancelled", "its study was cancelled by the user")


def fail_study(study_id: str, reason: str) -> None:
    if db_studies.set_study_status(study_id, "failed", error=reason):
        _end_trials(study_id, "cancelled", f"its study failed: {reason}")


def best_trial(study_id: str) -> dict[str, Any] | None:
    """The trial with the best final value of the study's metric among those that trained to the end (among the
    stopped ones, at the value they were stopped at, only while none has): ``run_id``, ``metric``, ``value`` and
    ``params``, the searched fields' values."""
    study = StudySpec.model_validate(_get(study_id)["spec"])
    scored: dict[str, list] = {"succeeded": [], "stopped": []}
    for run in db_studies.trial_runs(study_id):
        value = (run["summary"] or {}).get("final_metrics", {}).get(study.metric)
        if run["status"] in scored and value is not None:
            scored[run["status"]].append((value, run))
    scored_list = scored["succeeded"] or scored["stopped"]
    if not scored_list:
        return None
    value, run = (max if study.mode == "max" else min)(scored_list, key=lambda vr: vr[0])
    return {"run_id": run["id"], "metric": study.metric, "value": value, "params": run["trial_params"] or {}}


def study_report(study_id: str) -> dict[str, Any]:
    """What ``study show`` prints: the study row, its trials' counts by status, their ids, and the best trial."""
    study = _get(study_id)
    trials = db_studies.trial_runs(study_id)
    counts: dict[str, int] = {}
    for run in trials:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    return {
        "study_id": study_id,
        "name": study["name"],
        "status": study["status"],
        "error": study["error"],
        "n_trials": study["n_trials"],
        "counts": counts,
        "runs": [r["id"] for r in trials],
        "best": best_trial(study_id),
    }


def sweep_studies() -> dict[str, str]:
    """Make studies agree with Ray (the keeper calls this with ``jobs.runs.sweep``): a running or queued study whose
    driver job ended or vanished is failed (its unfinished trials cancelled); a study whose trials are all final
    is succeeded. Returns {study_id: what happened}."""
    changes: dict[str, str] = {}
    live = [s for s in db_studies.list_studies(limit=None) if s["status"] in ("queued", "running")]
    if not live:
        return changes
    try:
        jobs = {j.submission_id: j for j in cluster.job_client().list_jobs()}
    except Exception:  # noqa: BLE001 - Ray unreachable: the next sweep tries again
        return changes
    for study in live:
        job = jobs.get(study["id"])
        if job is not None and not job.status.is_terminal():
            continue
        trials = db_studies.trial_runs(study["id"])
        if job is not None and trials and all(t["status"] in FINAL_STATUSES for t in trials):
            if db_studies.set_study_status(study["id"], "succeeded"):
                changes[study["id"]] = "succeeded"
            continue
        if job is None and study["status"] == "queued":
            continue  # may still be being submitted
        what = "Ray does not know its driver job" if job is None else f"its driver job ended ({job.status})"
        fail_study(study["id"], f"{what} before every trial finished")
        changes[study["id"]] = "failed"
    return changes
