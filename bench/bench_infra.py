"""Infrastructure benchmarks: Ray submission latency, metric ingestion into SQLite, the Runs page render.

Each works in a temporary PEFT Lab home (``PEFTLAB_HOME``, its own SQLite file and artifact root), so the
user's database is never touched; the environment is restored afterwards.

* ``ray``: a local Ray head (``jobs.cluster.start_local_head``), warmed by one tiny job; then the time from
  ``jobs.runs.submit_run`` to the run's first ``train_loss`` row in the database (tiny-bert, ``log_every`` 1),
  split into submit → worker running (the run's ``started_at``) and worker running → first step; and, in the
  same repetitions, the same run started as a plain ``python -m jobs.worker`` process, to separate what Ray
  adds from the worker's own start-up (Python imports, model and data). On the local head runs start warm (a
  worker forked by ``jobs.warm``), so Ray's figure can be below the plain process's; ``PEFTLAB_WARM_START=0``
  measures cold starts. The head is stopped at the end.
* ``ui``: 1,000 runs × 1,000 metric points; those of the first runs (all of them in full mode) go through
  ``db.store.log_metrics`` in batches of 500 (the worker's ``DBReporter`` flushes about that many at a time):
  the ingestion rate. Then the Runs page (``app/views/runs.py``) executed server-side by
  ``streamlit.testing.v1.AppTest`` against that database.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import Figure
from db import config, store
from db.schema import utcnow

RUNS_PAGE = config.PROJECT_ROOT / "app" / "views" / "runs.py"


@contextmanager
def temporary_lab() -> Iterator[Path]:
    """A fresh PEFT Lab home for the block, with the previous environment restored afterwards."""
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp, store.using_home(Path(tmp)) as home:
        yield home


# --- submit → first training step on a warm local Ray -------------------------------------------


def tiny_run_spec(max_steps: int) -> dict[str, Any]:
    return {
        "name": "bench-submit-latency",
        "model": "tiny-bert",
        "dataset": {"name": "tweets-sentiment", "max_train": 64, "max_eval": 16, "max_length": 16},
        "method": {"name": "lora", "rank": 4},
        "train": {"max_steps": max_steps, "batch_size": 16, "log_every": 1, "num_threads": 1, "device": "cpu"},
        "resources": {"num_cpus": 1},
    }


def wait_for_final(run_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run and run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} did not finish in {timeout_s:.0f} s")


def wait_first_step(run_id: str, submitted: float, timeout_s: float, poll_s: float = 0.02) -> dict[str, float]:
    """Poll the database until the run's first ``train_loss`` row appears; then wait for the run to end."""
    deadline = submitted + timeout_s
    while time.perf_counter() < deadline:
        if not store.get_metrics([run_id], keys=["train_loss"]).empty:
            seen_at, latency = utcnow(), time.perf_counter() - submitted
            break
        run = store.get_run(run_id)
        if run["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"run {run_id} {run['status']} before its first step: {run['error']}")
        time.sleep(poll_s)
    else:
        raise TimeoutError(f"run {run_id}: no training step within {timeout_s:.0f} s")
    run = wait_for_final(run_id, timeout_s)  # the next submission must not overlap this one
    if run["status"] != "succeeded":
        raise RuntimeError(f"run {run_id} {run['status']}: {run['error']}")
    return {
        "submit_to_first_step_s": latency,
        "submit_to_worker_s": (run["started_at"] - run["created_at"]).total_seconds(),
        "worker_to_first_step_s": (seen_at - run["started_at"]).total_seconds(),
    }


def ray_first_step(timeout_s: float = 180.0) -> dict[str, float]:
    """Submit one run to Ray and time it to its first training step."""
    from jobs.runs import submit_run

    submitted = time.perf_counter()
    run_id = submit_run(tiny_run_spec(max_steps=2))
    return wait_first_step(run_id, submitted, timeout_s)


def direct_first_step(timeout_s: float = 180.0) -> dict[str, float]:
    """The same run started as a plain ``python -m jobs.worker`` process, without Ray: the floor Ray adds to."""
    from engine.spec import parse_spec

    submitted = time.perf_counter()
    run_id = store.create_run(parse_spec(tiny_run_spec(max_steps=2)).model_dump(mode="json"), executor="inline")
    worker = subprocess.Popen(
        [sys.executable, "-m", "jobs.worker", "--run-id", run_id], cwd=config.PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONPATH": str(config.PROJECT_ROOT), "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    try:
        return wait_first_step(run_id, submitted, timeout_s)
    finally:
        worker.wait(timeout=timeout_s)


def bench_ray(reps: int) -> list[Figure]:
    from jobs import cluster
    from jobs.runs import submit_run

    group = "ray"
    with temporary_lab():
        t0 = time.perf_counter()
        cluster.start_local_head(num_cpus=os.cpu_count() or 1)
        head_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            warm = wait_for_final(submit_run(tiny_run_spec(max_steps=1)), timeout_s=300)
            if warm["status"] != "succeeded":
                raise RuntimeError(f"the warm-up job {warm['status']}: {warm['error']}")
            warm_s = time.perf_counter() - t0
            ray_samples, direct_samples = [], []
            for _ in range(reps):  # interleaved, so a burst of load hits both
                ray_samples.append(ray_first_step())
                direct_samples.append(direct_first_step())
        finally:
            cluster.stop_local_head()

    def stats(samples: list[dict[str, float]], key: str) -> tuple[float, tuple[float, float]]:
        values = [s[key] for s in samples]
        return statistics.median(values), (min(values), max(values))

    ray_s, ray_spread = stats(ray_samples, "submit_to_first_step_s")
    direct_s, direct_spread = stats(direct_samples, "submit_to_first_step_s")
    to_worker = stats(ray_samples, "submit_to_worker_s")[0]
    to_step = stats(ray_samples, "worker_to_first_step_s")[0]
    direct_to_worker = stats(direct_samples, "submit_to_worker_s")[0]
    return [
        Figure(group, "submit → first training step (warm local Ray)", ray_s, "s", 5.0, spread=ray_spread, reps=reps,
               detail=f"medians: submit → worker running {to_worker:.2f} s, worker running → first step "
                      f"{to_step:.2f} s; tiny-bert, log_every 1",
               extra={"samples": ray_samples}),
        Figure(group, "same run as a plain worker process (no Ray)", direct_s, "s", spread=direct_spread,
               reps=reps, detail=f"medians: start → worker running {direct_to_worker:.2f} s (Python imports); "
                                 f"Ray (warm start unless PEFTLAB_WARM_START=0) "
                                 f"{ray_s - direct_s:+.2f} s",
               extra={"samples": direct_samples}),
        Figure(group, "local Ray head start", head_s, "s",
               detail=f"then the warm-up job, submit → succeeded, {warm_s:.1f} s", extra={"warm_job_s": warm_s}),
    ]  # fmt: skip


# --- metric ingestion and the Runs page ------------------------------------------------------------

STATUS_MIX = ["succeeded"] * 80 + ["failed"] * 10 + ["cancelled"] * 5 + ["running"] * 5


def metric_rows(rng: random.Random, points: int) -> list[tuple[int, str, float]]:
    """``points`` rows shaped like a run's log: per step train_loss and lr; every 4th step eval loss/accuracy."""
    rows: list[tuple[int, str, float]] = []
    step = 0
    while len(rows) < points:
        step += 1
        rows += [(step, "train_loss", 1.1 * 0.999**step + 0.05 * rng.random()), (step, "lr", 5e-4 * (1 - step / 1e4))]
        if step % 4 == 0:
            rows += [(step, "eval_loss", 0.9 * 0.999**step), (step, "eval_accuracy", min(0.95, 0.4 + step / 1e3))]
    return rows[:points]


def bulk_insert_metrics(run_id: str, rows: list[tuple[int, str, float]]) -> None:
    """Seeding shortcut for runs whose ingestion is not timed: one driver-level executemany (SQLite's ``?``)."""
    with store.get_engine().begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO metrics (run_id, step, key, value) VALUES (?, ?, ?, ?)",
            [(run_id, step, key, value) for step, key, value in rows],
        )


def seed_lab(runs: int, points: int, timed_runs: int, batch: int = 500, segments: int = 10) -> list[float]:
    """Fill the current lab's database with ``runs`` runs (mostly finished) of ``points`` metric rows each.

    The metrics of the first ``timed_runs`` runs go through ``store.log_metrics`` in batches of ``batch``, as
    the worker writes them; the ingestion rate (points/s) of each of ``segments`` consecutive slices of those
    runs is returned (only the ``log_metrics`` calls are timed). The other runs are filled by a bulk insert.
    """
    from engine.methods import method_names
    from engine.spec import RunSpec

    rng = random.Random(0)
    specs = [RunSpec.model_validate({"method": {"name": m}}).model_dump(mode="json") for m in method_names()]
    per_segment = max(1, timed_runs // segments)
    rates, seg_points, seg_time = [], 0, 0.0
    started = utcnow() - timedelta(days=2)
    for i in range(runs):
        spec = dict(specs[i % len(specs)])
        spec["train"] = spec["train"] | {"seed": i // len(specs)}
        status = STATUS_MIX[i % len(STATUS_MIX)]
        run_id = store.create_run(spec, executor="inline", status="queued")
        begin = started + timedelta(minutes=2 * i)
        final = status != "running"
        store.update_run(
            run_id, status=status, started_at=begin, heartbeat_at=begin + timedelta(minutes=3),
            finished_at=begin + timedelta(minutes=3) if final else None, progress=1.0 if final else 0.5,
            trainable_params=74_883, total_params=22_714_563,
            error="bench: seeded failure" if status == "failed" else None,
            summary={"final_metrics": {"eval_accuracy": 0.5 + 0.4 * rng.random()}} if status == "succeeded" else {},
        )  # fmt: skip
        rows = metric_rows(rng, points)
        if i >= timed_runs:
            bulk_insert_metrics(run_id, rows)
            continue
        t0 = time.perf_counter()
        for start in range(0, len(rows), batch):
            store.log_metrics(run_id, rows[start : start + batch])
        seg_time += time.perf_counter() - t0
        seg_points += len(rows)
        if (i + 1) % per_segment == 0:
            rates.append(seg_points / seg_time)
            seg_points, seg_time = 0, 0.0
    return rates


def render_runs_page(reps: int, limit: int | None = None) -> list[float]:
    """Seconds of each of ``reps`` server-side runs of the Runs page (``AppTest``), after an untimed first run.

    The first run of a fresh ``AppTest`` also pays for Streamlit's one-off start-up work (scanning installed
    packages for components), which a running server does once, not per page view; so the timed runs are
    reruns of the same session, each executing the whole page script again.
    """
    from streamlit.testing.v1 import AppTest

    page = AppTest.from_file(str(RUNS_PAGE), default_timeout=120)
    page.run()
    if limit is not None:
        page.number_input[0].set_value(limit)
        page.run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        page.run()
        times.append(time.perf_counter() - t0)
        if page.exception:
            raise RuntimeError(f"the Runs page raised: {page.exception[0].message}")
    return times


def bench_ui(runs: int, points: int, timed_runs: int, reps: int) -> list[Figure]:
    group = "ui"
    with temporary_lab():
        t0 = time.perf_counter()
        rates = seed_lab(runs, points, timed_runs)
        seed_s = time.perf_counter() - t0
        figures = [
            Figure(group, "metric ingestion into SQLite (log_metrics, batches of 500)", statistics.median(rates),
                   "points/s", 50_000, higher_is_better=True, spread=(min(rates), max(rates)), reps=len(rates),
                   detail=f"{timed_runs * points:,} points over {timed_runs:,} runs into a table growing to "
                          f"{runs * points:,}; seeding all {runs:,} runs {seed_s:.1f} s")
        ]  # fmt: skip
        size = f"{runs:,} runs × {points:,} points"
        times = render_runs_page(reps)
        all_runs = render_runs_page(max(1, reps // 2), limit=runs)
        figures += [
            Figure(group, "Runs page server render (AppTest, default view)", statistics.median(times), "s", 1.0,
                   spread=(min(times), max(times)), reps=reps, detail=f"{size}; table of 200 runs + curves of 8"),
            Figure(group, "Runs page server render, all runs in the table", statistics.median(all_runs), "s",
                   spread=(min(all_runs), max(all_runs)), reps=len(all_runs), detail=f"{size}; 'Show at most' {runs}"),
        ]  # fmt: skip
    return figures
