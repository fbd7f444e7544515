"""Study benchmarks: what running trials as one Ray Tune study saves, on a local Ray head (2 CPUs, 1 per trial).

* **study vs separate runs**: the same 6 tiny-bert configurations as one grid study (``max_concurrent`` 2), and as
  6 runs submitted one after another from this process (each a Ray job of 1 CPU, so 2 run at once): wall time from
  the first submission to the last run's end. The study pays one driver start and then reuses its trial actors; the
  separate runs each start a Python process (imports, model, data).
* **ASHA vs FIFO**: the same 12 MiniLM configurations on the bundled tweets (a random search with a fixed
  ``sample_seed``), with ASHA on ``eval_loss`` and without a scheduler: wall time, and the best trial's
  ``eval_accuracy`` in each.
* **trial start-up on a reused actor**: each trial's ``startup_s`` (its summary: from the trainable's call to its
  first training step) for trials that ran on an actor an earlier trial had used; and, for reference, a single
  run's from its worker process's start.

The two studies alternate with their references when ``reps`` > 1 (ASHA and FIFO once each by default: they take
minutes). Figures are ratios of wall times measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.bench_infra import temporary_lab, tiny_run_spec, wait_for_final
from bench.common import Figure
from db import store
from db import studies as db_studies

FINAL = ("succeeded", "failed", "cancelled", "stopped", "lost")


def _wait_study(study_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = db_studies.get_study(study_id)
        if row and row["status"] not in ("queued", "running"):
            if row["status"] != "succeeded":
                raise RuntimeError(f"study {study_id} {row['status']}: {row['error']}")
            return row
        time.sleep(0.2)
    raise TimeoutError(f"study {study_id} did not finish in {timeout_s:.0f} s")


def tiny_grid_study() -> dict[str, Any]:
    spec = tiny_run_spec(max_steps=20) | {"name": "bench-study"}
    return {"name": "bench-6", "spec": spec, "space": {"train.lr": {"grid": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}},
            "max_concurrent": 2}  # fmt: skip


def minilm_study(scheduler: str) -> dict[str, Any]:
    """12 MiniLM trials on tweets: learning rate (log-uniform) × rank, 6 evaluations each, every step logged (so
    ``startup_s`` ends at the first step)."""
    spec = {
        "name": f"bench-{scheduler}",
        "model": "minilm-l6",
        "dataset": {"name": "tweets-sentiment", "max_train": 960, "max_eval": 192, "max_length": 32},
        "method": {"name": "lora", "rank": 8},
        "train": {"epochs": 1, "batch_size": 16, "log_every": 1, "evals_per_epoch": 6, "num_threads": 1,
                  "device": "cpu"},
        "resources": {"num_cpus": 1},
    }  # fmt: skip
    # ASHA cuts on the evaluation loss, which separates learning rates from the first evaluation on, when every
    # trial still predicts the majority class (equal accuracies); the best trial is judged by accuracy.
    asha = {"asha": {"metric": "eval_loss", "mode": "min", "grace_evals": 1, "reduction_factor": 3}}
    return {
        "name": f"bench-12-{scheduler}", "spec": spec, "search": "random", "num_samples": 12, "sample_seed": 7,
        "space": {"train.lr": {"loguniform": [1e-5, 3e-2]}, "method.rank": {"choice": [4, 8, 16]}},
        "metric": "eval_accuracy", "mode": "max", "scheduler": asha if scheduler == "asha" else "fifo",
        "max_concurrent": 2,
    }  # fmt: skip


def run_study_timed(study: dict[str, Any], timeout_s: float) -> tuple[float, str]:
    from jobs.studies import submit_study

    t0 = time.perf_counter()
    study_id = submit_study(study)
    _wait_study(study_id, timeout_s)
    return time.perf_counter() - t0, study_id


def run_separately(study: dict[str, Any], timeout_s: float) -> float:
    """The study's configurations as separate runs, submitted from this process at once (Ray queues them)."""
    from engine.study import expand, parse_study, trial_spec
    from jobs.runs import submit_run

    parsed = parse_study(study)
    assert parsed.spec is not None
    specs = [trial_spec(parsed.spec, params).model_dump(mode="json") for params in expand(parsed)]
    t0 = time.perf_counter()
    run_ids = [submit_run(spec) for spec in specs]
    for run_id in run_ids:
        run = wait_for_final(run_id, timeout_s)
        if run["status"] != "succeeded":
            raise RuntimeError(f"run {run_id} {run['status']}: {run['error']}")
    return time.perf_counter() - t0


def reused_startups(study_id: str, concurrency: int) -> tuple[list[float], list[float]]:
    """Start-up times of a study's trials: (first trial on each actor, trials on a reused actor), by start order."""
    trials = sorted(db_studies.trial_runs(study_id), key=lambda t: t["started_at"])
    times = [t["summary"].get("startup_s") for t in trials]
    cold = [x for x in times[:concurrency] if x is not None]
    warm = [x for x in times[concurrency:] if x is not None]
    return cold, warm


def best_accuracy(study_id: str) -> float:
    return max(
        (t["summary"].get("final_metrics") or {}).get("eval_accuracy", float("-inf"))
        for t in db_studies.trial_runs(study_id)
    )


@contextmanager
def study_lab() -> Iterator[Path]:
    """A temporary PEFT Lab home, or ``PEFTLAB_BENCH_HOME`` when set: kept afterwards, so its studies can be opened
    on the Studies page (``PEFTLAB_HOME=… ./run_app.sh``)."""
    keep = os.environ.get("PEFTLAB_BENCH_HOME")
    if keep:
        with store.using_home(Path(keep)) as home:
            yield home
    else:
        with temporary_lab() as home:
            yield home


def bench_study(reps: int = 1, quick: bool = False) -> list[Figure]:
    from jobs import cluster
    from jobs.runs import submit_run

    group = "study"
    figures: list[Figure] = []
    with study_lab():
        cluster.start_local_head(num_cpus=2)
        try:
            warm = wait_for_final(submit_run(tiny_run_spec(max_steps=1)), timeout_s=300)  # the head's own warm-up
            if warm["status"] != "succeeded":
                raise RuntimeError(f"the warm-up job {warm['status']}: {warm['error']}")
            single_startup = warm["summary"].get("startup_s")

            ratios, study_s, separate_s, cold, reused = [], [], [], [], []
            for _ in range(reps):
                wall, study_id = run_study_timed(tiny_grid_study(), timeout_s=900)
                separate = run_separately(tiny_grid_study(), timeout_s=900)
                ratios.append(wall / separate)
                study_s.append(wall)
                separate_s.append(separate)
                c, w = reused_startups(study_id, concurrency=2)
                cold += c
                reused += w
            figures.append(Figure(
                group, "6-trial study / the same 6 runs submitted separately (tiny-bert, 2 at a time)",
                statistics.median(ratios), "×", 0.6, spread=(min(ratios), max(ratios)), reps=reps,
                detail=f"study {statistics.median(study_s):.1f} s, separate runs {statistics.median(separate_s):.1f} s",
            ))  # fmt: skip
            if reused:
                figures.append(Figure(
                    group, "trial start → first training step, reused actor", statistics.median(reused), "s", 1.5,
                    spread=(min(reused), max(reused)), reps=len(reused),
                    detail=f"first trial on a new actor: median {statistics.median(cold):.2f} s" if cold else "",
                ))  # fmt: skip
            if single_startup is not None:
                figures.append(Figure(
                    group, "single run: worker process start → first training step", single_startup, "s",
                    detail="imports, model and data in a new process (the rest of submit → first step is Ray's)",
                ))  # fmt: skip

            if not quick:
                fifo_s, fifo_id = run_study_timed(minilm_study("fifo"), timeout_s=3600)
                asha_s, asha_id = run_study_timed(minilm_study("asha"), timeout_s=3600)
                fifo_best, asha_best = best_accuracy(fifo_id), best_accuracy(asha_id)
                _, minilm_reused = reused_startups(asha_id, concurrency=2)
                counts = db_studies.list_studies()
                stopped = next((s["counts"].get("stopped", 0) for s in counts if s["id"] == asha_id), 0)
                figures.append(Figure(
                    group, "ASHA study / FIFO study, 12 MiniLM trials on tweets", asha_s / fifo_s, "×", 0.5, reps=1,
                    detail=f"ASHA {asha_s:.0f} s ({stopped} of 12 stopped early), FIFO {fifo_s:.0f} s",
                ))  # fmt: skip
                if minilm_reused:
                    figures.append(Figure(
                        group, "MiniLM trial start → first training step, reused actor",
                        statistics.median(minilm_reused), "s", 1.5, spread=(min(minilm_reused), max(minilm_reused)),
                        reps=len(minilm_reused),
                    ))  # fmt: skip
                figures.append(Figure(
                    group, "best eval_accuracy: FIFO − ASHA", fifo_best - asha_best, "", 0.01, reps=1,
                    detail=f"FIFO best {fifo_best:.4f}, ASHA best {asha_best:.4f}",
                ))  # fmt: skip
        finally:
            cluster.stop_local_head()
            store.get_engine.cache_clear()
    return figures
