"""Fault injection on real components: a local Ray head, real worker processes, the real dashboard.

Each fault is injected for real (SIGKILL of a worker, of the dashboard, of the whole head; the head stopped on
purpose; a checkpoint whose weights went NaN). What each test measured is appended to
``tests/artifacts/faults.jsonl`` (fault, seconds to detect, final status, metrics kept), the table in the notes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from db import config, store
from db.schema import LOST_AFTER_S
from engine.train import CHECKPOINT_FILE
from jobs import cluster
from jobs.runs import cancel_run, resume_run, submit_run
from tests.conftest import ROOT, final, gone, last_step, long_spec, wait_for, worker_pid

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "tests" / "artifacts"
DETECT_S = 30.0  # the bound: a dead worker is noticed within this
STEPS = 600  # tiny-bert runs ~100 steps/s on an idle core: long enough that a fault lands mid-run


def record(fault: str, **facts) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "faults.jsonl", "a") as f:
        f.write(json.dumps({"fault": fault} | facts) + "\n")


def assert_curve_joins(run_id: str, steps: int) -> None:
    """Every step's training loss exactly once, from 1 to the end: nothing lost, nothing duplicated."""
    logged = store.get_metrics([run_id], keys=["train_loss"])["step"].tolist()
    assert logged == list(range(1, steps + 1)), (len(logged), logged[:5], logged[-5:])


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=120)  # fmt: skip


# --- a worker dies ---------------------------------------------------------------------------------


def test_two_workers_killed_at_once_are_detected_retried_and_resumed(ray_lab):
    runs = [submit_run(long_spec(steps=STEPS, seed=seed)) for seed in (0, 1)]
    wait_for(lambda: all(last_step(r) >= 60 for r in runs), timeout=400, every=0.1)
    pids = [worker_pid(r) for r in runs]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    detected = {}
    while len(detected) < len(runs):
        for r in runs:
            row = store.get_run(r)  # what every reader sees: show, ls, the pages
            if r not in detected and (row["status"] != "running" or row["attempt"] > 1):
                detected[r] = time.monotonic() - killed
        assert time.monotonic() - killed < DETECT_S, f"not detected within {DETECT_S} s: {detected}"
        time.sleep(0.25)
    shown = json.loads(cli("show", runs[0], "--json").stdout)  # a state that is true now: the retry may be done
    assert (
        shown["attempt"] in (1, 2)
        and shown["status"] in ("lost", "queued", "running")
        or (
            shown["attempt"],
            shown["status"],
        )
        == (2, "succeeded")
    )

    for r in runs:
        row = wait_for(lambda r=r: final(r), timeout=600)
        assert (row["status"], row["attempt"]) == ("succeeded", 2), row["error"]
        assert_curve_joins(r, STEPS)
        assert "resumed from checkpoint at step" in (config.artifacts_root() / r / "worker.log").read_text()
        record("kill -9 of a worker (two at once)", detect_s=round(detected[r], 1), final=row["status"],
               attempts=row["attempt"], metrics_kept=f"{last_step(r)}/{STEPS} steps, each once")  # fmt: skip
    assert all(gone(pid) for pid in pids)


def test_nan_after_resume_fails_at_once_and_is_not_retried(ray_lab):
    """Cancel a run, corrupt its checkpoint (weights NaN), resume it: attempt 2 fails with the step and the loss,
    keeps every metric up to the checkpoint, and the keeper does not retry a run that failed by its own error."""
    run_id = submit_run(long_spec(steps=2000))
    wait_for(lambda: last_step(run_id) >= 30, timeout=300)
    assert cancel_run(run_id)
    wait_for(lambda: gone(worker_pid(run_id)) or None, timeout=60)
    ckpt_path = config.artifacts_root() / run_id / CHECKPOINT_FILE
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["trainable"] = {k: torch.full_like(v, math.nan) if "lora" in k else v for k, v in ckpt["trainable"].items()}
    torch.save(ckpt, ckpt_path)

    started = time.monotonic()
    assert resume_run(run_id) == 2
    run = wait_for(lambda: final(run_id), timeout=300)
    assert run["status"] == "failed" and run["attempt"] == 2
    assert run["error"].startswith(f"diverged at step {ckpt['step'] + 1} (loss nan)"), run["error"]
    assert_curve_joins(run_id, ckpt["step"])
    time.sleep(12)  # two keeper sweeps
    after = store.get_run(run_id)
    assert (after["status"], after["attempt"]) == ("failed", 2)
    record("NaN loss (NaN weights in the checkpoint it resumed from)", detect_s=round(time.monotonic() - started, 1),
           final=run["status"], attempts=2, metrics_kept=f"{ckpt['step']} steps up to the checkpoint",
           error=run["error"])  # fmt: skip


# --- the head dies, or is stopped ------------------------------------------------------------------


@pytest.fixture()
def own_head(tmp_path):
    """A local Ray head of this test's own (it gets killed), with its own PEFT Lab home."""
    with store.using_home(tmp_path / "home"):
        yield tmp_path / "home"
        cluster.stop_local_head()


def _head_pid() -> int:
    return json.loads(cluster.state_file().read_text())["pid"]


def test_head_killed_then_restarted_resumes_the_run_and_stop_leaves_no_worker(own_head):
    cluster.start_local_head(num_cpus=2)
    run_id = submit_run(long_spec(steps=STEPS))
    wait_for(lambda: last_step(run_id) >= 40, timeout=400, every=0.1)
    pid = worker_pid(run_id)
    os.killpg(os.getpgid(_head_pid()), signal.SIGKILL)  # the whole head: GCS, raylet, dashboard, job supervisors
    killed = time.monotonic()
    wait_for(lambda: gone(pid), timeout=DETECT_S)
    worker_exit_s = time.monotonic() - killed
    row = wait_for(lambda: (r := store.get_run(run_id))["status"] != "running" and r, timeout=LOST_AFTER_S + 10)
    detect_s = time.monotonic() - killed
    assert row["status"] == "lost", (row["status"], row["error"])
    assert detect_s <= DETECT_S

    cluster.start_local_head(num_cpus=2)  # a new head; its keeper retries what the old one lost
    run = wait_for(lambda: final(run_id), timeout=600)
    assert (run["status"], run["attempt"]) == ("succeeded", 2), run["error"]
    assert_curve_joins(run_id, STEPS)
    record("kill -9 of the Ray head, then a new head", detect_s=round(detect_s, 1),
           worker_exit_s=round(worker_exit_s, 1), final=run["status"], attempts=2,
           metrics_kept=f"{STEPS}/{STEPS} steps, each once")  # fmt: skip

    # Stopping the head on purpose cancels its active run first, with the reason, and leaves no worker behind.
    second = submit_run(long_spec(steps=2000))
    wait_for(lambda: last_step(second) >= 10, timeout=300)
    pid = worker_pid(second)
    out = subprocess.run([sys.executable, "-m", "jobs.cluster", "stop"], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ.copy(), timeout=120)  # fmt: skip
    stopped = time.monotonic()
    assert out.returncode == 0 and "1 active run(s) cancelled" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: gone(pid), timeout=DETECT_S)
    run = store.get_run(second)
    assert run["status"] == "cancelled" and "jobs.cluster stop" in run["error"]
    kept = last_step(second)
    assert kept >= 10
    record("python -m jobs.cluster stop mid-run", detect_s=0.0, worker_exit_s=round(time.monotonic() - stopped, 1),
           final=run["status"], metrics_kept=f"{kept} steps logged before the stop", error=run["error"])  # fmt: skip


# --- the dashboard dies ----------------------------------------------------------------------------


def _start_app(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", "run_app.sh"], cwd=ROOT, env=env, stdout=open(log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _streamlit_of(app: subprocess.Popen) -> psutil.Process:
    def find():
        for child in psutil.Process(app.pid).children(recursive=True):
            if "streamlit" in " ".join(child.cmdline()):
                return child
        return None

    return wait_for(find, timeout=120)


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no Chromium (install Debian's chromium)")
def test_dashboard_killed_mid_run_the_run_succeeds_and_shows_after_restart(ray_lab, tmp_path):
    from tests.test_browser import CHROMIUM_ARGS, _free_port, _healthy

    port = _free_port()
    env = os.environ | ray_lab | {"PEFTLAB_PORT": str(port)}
    app = _start_app(env, tmp_path / "app1.log")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(f"{url}/_stcore/health"), timeout=180)
    run_id = submit_run(long_spec(steps=300))
    wait_for(lambda: last_step(run_id) >= 20, timeout=300)
    _streamlit_of(app).kill()  # SIGKILL: no clean-up of any kind in the dashboard
    app.wait(timeout=60)
    said = (tmp_path / "app1.log").read_text()
    assert "keeps running" in said and "jobs.cluster stop" in said, said[-2000:]
    assert cluster.job_client().list_jobs() is not None  # the head is up

    run = wait_for(lambda: final(run_id), timeout=600)
    assert (run["status"], run["attempt"]) == ("succeeded", 1), run["error"]
    assert_curve_joins(run_id, 300)

    app = _start_app(env, tmp_path / "app2.log")
    try:
        wait_for(lambda: _healthy(f"{url}/_stcore/health"), timeout=180)
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                                 args=CHROMIUM_ARGS)  # fmt: skip
            try:
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                page.goto(f"{url}/run_detail?run={run_id}")
                # The page shows this run as the database has it: succeeded.
                status = page.locator('[data-testid="stMetric"]').filter(has_text="status")
                expect(status).to_contain_text("succeeded", timeout=120_000)
                # Clone into Launch opens the form on this run's spec (Launch is the home page: "/?clone=ID").
                page.get_by_role("link", name="Clone into Launch").click()
                expect(page.get_by_text(f"Cloned from run {run_id}")).to_be_visible(timeout=60_000)
                assert f"clone={run_id}" in page.url, page.url
            finally:
                browser.close()
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=60)
    record("kill -9 of the dashboard (Streamlit) mid-run", detect_s=None, final=run["status"], attempts=1,
           metrics_kept="300/300 steps, each once; shown on Run detail after the restart")  # fmt: skip
