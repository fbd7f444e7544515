"""The study driver: ``python -m jobs.study_driver --study-id ID``, a study's Ray job, runs its search with Ray Tune.

- The **trainable** (``run_trial``) runs one trial through the same ``jobs.worker.execute`` as a single run, so a
  trial's row, heartbeats, metrics, checkpoints and artifacts are a run's. Each evaluation is also reported to Tune
  (``evals`` counts them: the scheduler's time axis); when the scheduler (ASHA) stops the trial, ``tune.report``
  ends its thread and the run ends ``stopped`` with the reason and its metrics so far.
- **Warm workers**: Tune reuses trial actors (``reuse_actors``), so torch and the model code stay imported and the
  tokenised data cached (``engine.data``) from one trial to the next.
- **Cancel**: a stopper ends the search once the study is cancelled in the database; the cancelled trials' own
  watchdogs stop them.
- **Failures**: a trial whose actor or node died is retried by Tune (``resources.max_retries`` of the base run) as
  the run's next attempt, resuming from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from ray.tune.stopper import Stopper

from db import config, store
from db import studies as db_studies
from db.schema import FINAL_STATUSES
from engine.spec import parse_spec
from engine.study import Domain, StudySpec
from jobs.studies import fail_study, record_proposal
from jobs.worker import StoppedEarly, execute


def run_trial(config_: dict[str, Any]) -> None:
    """One Tune trial: the run named by ``run_id`` (grid, random), or a new run for Optuna's proposal."""
    import ray
    from ray import tune

    started = time.time()  # the trial's start-up (``startup_s``) counts from here
    study_id = config_["study_id"]
    study = StudySpec.model_validate(db_studies.get_study(study_id)["spec"])  # type: ignore[index]
    if "run_id" in config_:
        run_id = config_["run_id"]
    else:  # Optuna: the searched values are the config; the trial is numbered when it starts
        params = {k: v for k, v in config_.items() if k != "study_id"}
        run_id = record_proposal(study_id, study, params, tune.get_context().get_trial_id())
    run = store.get_run(run_id)
    if run is None or run["status"] in FINAL_STATUSES:
        return  # cancelled before it started, or finished by an earlier attempt
    if run["status"] == "running":  # Tune retries a trial whose actor died: that attempt is lost
        store.transition(run_id, "lost", of_attempt=run["attempt"], only_from=("running",),
                         error="its Tune trial actor died (node lost?)")  # fmt: skip
        run = store.get_run(run_id) or run
    attempt: int | None = run["attempt"]
    if run["status"] == "lost":
        attempt = store.requeue(run_id, reason=f"retried by Tune: {run['error']}", only_from=("lost",))
        if attempt is None:
            return
    asha = study.asha
    evals, stopped_by_tune = 0, False

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        nonlocal evals, stopped_by_tune
        evals += 1
        try:
            tune.report({"evals": evals, "step": step, **metrics})
        except SystemExit:  # Tune ends a stopped trial's thread this way
            stopped_by_tune = True
            metric = asha.metric if asha and asha.metric else study.metric
            shown = f"{metric} {metrics[metric]:.4f}" if metric in metrics else "no metric"
            raise StoppedEarly(
                f"stopped early by ASHA after {evals} evaluation(s) ({shown} at step {step}): below the "
                "cut of its rung", metrics,
            ) from None  # fmt: skip

    threads = parse_spec(run["spec"]).resources.num_cpus
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(threads)))
    node_id = ray.get_runtime_context().get_node_id()
    execute(run_id, attempt=attempt, echo=False, on_eval=on_eval, node_id=node_id, started=started)
    if stopped_by_tune:
        # End the thread as Tune asked. Returning instead would make Tune's wrapper report once more and wait for a
        # reply that never comes to a stopped trial: the thread would hang, and its actor could not be reused.
        raise SystemExit(0)


class _CancelStopper(Stopper):
    """Ends the whole search once the study is no longer running in the database (cancelled, failed)."""

    def __init__(self, study_id: str, every_s: float = 2.0):
        self.study_id, self.every_s = study_id, every_s
        self._checked, self._stop = 0.0, False

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if not self._stop and time.monotonic() - self._checked >= self.every_s:
            self._checked = time.monotonic()
            study = db_studies.get_study(self.study_id)
            self._stop = study is None or study["status"] != "running"
        return self._stop


def _domain(domain: Domain):
    from ray import tune

    if domain.uniform is not None:
        return tune.uniform(*domain.uniform)
    if domain.loguniform is not None:
        return tune.loguniform(*domain.loguniform)
    if domain.randint is not None:
        return tune.randint(domain.randint[0], domain.randint[1] + 1)  # Tune's high is exclusive
    return tune.choice(domain.choice or domain.grid or [])


def build_tuner(study_id: str, study: StudySpec):
    """The Ray Tune ``Tuner`` of a study: its search algorithm, scheduler, concurrency and stopper."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert study.spec is not None
    base = parse_spec(study.spec)
    trainable = tune.with_resources(run_trial, {"cpu": base.resources.num_cpus, "gpu": base.resources.num_gpus})
    search_alg = None
    if study.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        space = {path: _domain(d) for path, d in study.space.items()} | {"train.seed": tune.choice(study.seeds)}
        param_space: dict[str, Any] = {"study_id": study_id, **space}
        search_alg = ConcurrencyLimiter(
            OptunaSearch(metric=study.metric, mode=study.mode, seed=study.sample_seed),
            max_concurrent=study.max_concurrent,
        )
        num_samples = study.num_samples
    else:
        run_ids = [r["id"] for r in db_studies.trial_runs(study_id)]
        param_space = {"study_id": study_id, "run_id": tune.grid_search(run_ids)}
        num_samples = 1
    asha = study.asha
    scheduler = (
        ASHAScheduler(time_attr="evals", metric=asha.metric or study.metric, mode=asha.mode or study.mode,
                      grace_period=asha.grace_evals, reduction_factor=asha.reduction_factor, max_t=10**6)
        if asha else FIFOScheduler()
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_samples,
            search_alg=search_alg,
            scheduler=scheduler,
            max_concurrent_trials=study.max_concurrent,
            reuse_actors=True,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=study_id,
            storage_path=str(config.artifacts_root() / "studies"),
            stop=_CancelStopper(study_id),
            failure_config=tune.FailureConfig(max_failures=base.resources.max_retries),
            verbose=0,
        ),
    )


def run_study(study_id: str) -> str:
    """Run the study's search to its end (this process must be connected to Ray); returns the study's status."""
    row = db_studies.get_study(study_id)
    if row is None:
        raise SystemExit(f"no study {study_id} in the database at {config.db_location()}")
    study = StudySpec.model_validate(row["spec"])
    if not db_studies.set_study_status(study_id, "running", only_from=("queued",)):
        return row["status"]  # cancelled before it started, or a second driver
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # a cancelled trial reports no metric
    try:
        results = build_tuner(study_id, study).fit()
    except Exception as err:  # noqa: BLE001 - the study says why, then the job fails
        fail_study(study_id, f"the search failed: {type(err).__name__}: {err}")
        raise
    errors = {r.config.get("run_id"): r.error for r in results if r.error is not None and r.config}
    for run in db_studies.trial_runs(study_id):  # trials the search ended without finishing
        if run["status"] not in ("queued", "running"):
            continue
        error = errors.get(run["id"])
        if error is not None:  # Tune gave up on it (retries spent, or its actor could not be reused)
            reason = f"its Tune trial failed: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            store.finish_run(run["id"], "failed", error=reason)
        elif run["status"] == "queued":
            store.finish_run(run["id"], "cancelled", error="the study's search ended before this trial started")
        else:
            store.finish_run(run["id"], "failed", error="the study's search ended while this trial was running")
    db_studies.set_study_status(study_id, "succeeded", only_from=("running",))
    return (db_studies.get_study(study_id) or {}).get("status", "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.study_driver")
    parser.add_argument("--study-id", required=True)
    args = parser.parse_args(argv)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    status = run_study(args.study_id)
    print(f"study {args.study_id}: {status}", flush=True)
    return 0 if status in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
