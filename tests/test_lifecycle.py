"""The life of a run without Ray: the status lattice, attempts, the liveness rule, checkpoints and resume,
divergence, and a metric store that never loses a batch. Real SQLite files and real worker processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch

from db import schema, store
from db.schema import LOST_AFTER_S, TRANSITIONS, utcnow
from engine.spec import parse_spec
from engine.train import CHECKPOINT_FILE, Cancelled, Diverged, MemoryReporter, train
from jobs.worker import execute
from tests.conftest import ROOT, tiny_spec, wait_for


def _run(**overrides) -> str:
    return store.create_run(parse_spec(tiny_spec(**overrides)).model_dump(mode="json"), executor="inline")


def _set(run_id: str, **fields) -> None:
    """Put a run in a state directly (test set-up only; the code under test moves statuses by transition)."""
    from sqlalchemy import update

    with store.session_scope() as s:
        s.execute(update(schema.Run).where(schema.Run.id == run_id).values(**fields))


# --- the lattice -----------------------------------------------------------------------------------


def test_only_legal_transitions_happen(lab_env):
    for source, targets in TRANSITIONS.items():
        for target in schema.STATUSES:
            run_id = _run()
            _set(run_id, status=source)
            moved = store.transition(run_id, target)
            assert moved == (target in targets), (source, target)
            assert store.get_run(run_id)["status"] == (target if moved else source)


def test_a_taken_over_attempt_writes_nothing(lab_env):
    run_id = _run()
    assert store.claim(run_id, 1, "host:1", "cpu")
    assert store.log_metrics(run_id, [(1, "train_loss", 1.0)], attempt=1) == 1
    assert store.transition(run_id, "lost", of_attempt=1, error="test")
    assert store.requeue(run_id, reason="retry", only_from=("lost",)) == 2
    assert store.requeue(run_id, reason="again", only_from=("lost",)) is None  # one retry per loss, never two
    assert store.claim(run_id, 2, "host:2", "cpu")
    # The first attempt comes back: none of its writes land.
    assert store.log_metrics(run_id, [(2, "train_loss", 9.0)], attempt=1) == 0
    assert not store.heartbeat(run_id, 0.5, attempt=1)
    assert not store.finish_run(run_id, "succeeded", attempt=1)
    assert not store.claim(run_id, 1, "host:1", "cpu")
    run = store.get_run(run_id)
    assert (run["status"], run["attempt"], run["owner"]) == ("running", 2, "host:2")
    assert store.get_metrics([run_id]).value.tolist() == [1.0]
    assert store.finish_run(run_id, "succeeded", attempt=2)


def test_a_lost_attempt_that_finishes_records_its_result_if_no_other_owns_the_run(lab_env):
    run_id = _run()
    assert store.claim(run_id, 1, "host:1", "cpu")
    assert store.transition(run_id, "lost", of_attempt=1, error="no heartbeat")
    assert store.finish_run(run_id, "succeeded", summary={"final_metrics": {"eval_accuracy": 0.5}}, attempt=1)
    assert store.get_run(run_id)["status"] == "succeeded"
    assert store.requeue(run_id, reason="resume") is None  # succeeded is final


# --- liveness --------------------------------------------------------------------------------------


def test_readers_apply_the_heartbeat_rule(lab_env):
    fresh, stale = _run(), _run()
    for run_id in (fresh, stale):
        assert store.claim(run_id, 1, "host:1", "cpu")
    _set(stale, heartbeat_at=utcnow() - timedelta(seconds=LOST_AFTER_S + 1))
    assert store.get_run(fresh)["status"] == "running"
    run = store.get_run(stale)
    assert run["status"] == "lost" and "no heartbeat" in run["error"]
    assert {r["id"]: r["status"] for r in store.list_runs()} == {fresh: "running", stale: "lost"}


STEPS = 400  # long enough that the kill lands mid-run on a fast, warm machine too


def test_killed_in_process_run_is_lost_and_resumes_without_duplicate_metrics(lab_env):
    """``app.cli run`` killed with SIGKILL: the next reader sees it lost (the heartbeat rule), ``resume --inline``
    continues from its last checkpoint and the curve has each step once."""
    spec_file = lab_env.parent / "spec.json"
    spec = tiny_spec(dataset={"max_train": 16 * STEPS}, train={"checkpoint_every_steps": 5, "log_every": 1})
    spec_file.write_text(json.dumps(spec))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "run", str(spec_file)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        run_id = wait_for(lambda: next((r["id"] for r in store.list_runs()), None), timeout=120)
        wait_for(lambda: (store.get_metrics([run_id], keys=["train_loss"])["step"].max() or 0) >= 12, timeout=180,
                 every=0.05)  # fmt: skip
        run = store.get_run(run_id)
        assert run["status"] == "running" and run["owner"].endswith(f":{proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    wait_for(lambda: store.get_run(run_id)["status"] == "lost", timeout=LOST_AFTER_S + 15, every=0.5)
    assert time.monotonic() - killed_at <= LOST_AFTER_S + 10
    logged = store.get_metrics([run_id], keys=["train_loss"])["step"].tolist()
    assert logged == list(range(1, len(logged) + 1))  # flushed as logged: nothing buffered was lost

    out = subprocess.run([sys.executable, "-m", "app.cli", "resume", run_id, "--inline", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["attempt"] == 2
    steps = store.get_metrics([run_id], keys=["train_loss"])["step"].tolist()
    assert steps == list(range(1, STEPS + 1))  # each step once
    log = (lab_env / "artifacts" / run_id / "worker.log").read_text()
    assert "resumed from checkpoint at step" in log


# --- numbers that go wrong -------------------------------------------------------------------------


def test_metric_store_keeps_the_batch_around_nan_and_inf(lab_env):
    run_id = _run()
    stored = store.log_metrics(run_id, [(1, "train_loss", float("nan")), (1, "lr", 0.1), (1, "eval_loss", math.inf)])
    assert stored == 2
    df = store.get_metrics([run_id])
    assert dict(zip(df.key, df.value)) == {"lr": 0.1, "eval_loss": math.inf}


def test_nan_weights_fail_the_run_at_once_with_the_step(lab_env):
    """A checkpoint whose adapter went NaN (a corrupted file): the resumed run fails at its first step with
    ``diverged at step N (loss nan)``, keeps the metrics logged until then, and is not retried."""
    run_id = _run(train={"checkpoint_every_steps": 2, "log_every": 1})
    out_dir = lab_env / "artifacts" / run_id
    with pytest.raises(Cancelled):
        train(parse_spec(store.get_run(run_id)["spec"]), MemoryReporter(stop_after_step=2), out_dir)
    ckpt = torch.load(out_dir / CHECKPOINT_FILE, weights_only=True)
    ckpt["trainable"] = {k: torch.full_like(v, math.nan) if "lora" in k else v for k, v in ckpt["trainable"].items()}
    torch.save(ckpt, out_dir / CHECKPOINT_FILE)
    store.log_metrics(run_id, [(1, "train_loss", 1.1), (2, "train_loss", 1.0)])

    final = execute(run_id, echo=False)
    assert final["status"] == "failed"
    assert final["error"].startswith("diverged at step 3 (loss nan)")
    assert store.get_metrics([run_id], keys=["train_loss"]).value.tolist() == [1.1, 1.0]


def test_train_raises_diverged_not_a_crash(tmp_path):
    spec = parse_spec(tiny_spec(train={"checkpoint_every_steps": 1}))
    with pytest.raises(Cancelled):
        train(spec, MemoryReporter(stop_after_step=1), tmp_path)
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    ckpt["trainable"] = {k: v * math.inf if "classifier" in k else v for k, v in ckpt["trainable"].items()}
    torch.save(ckpt, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(Diverged, match=r"diverged at step 2 \((loss|gradient norm) (nan|inf)"):
        train(spec, MemoryReporter(), tmp_path)


# --- checkpoints -----------------------------------------------------------------------------------


def test_checkpoints_every_n_steps_and_resume_exactly(tmp_path):
    spec = parse_spec(tiny_spec(dataset={"max_train": 160}, train={"checkpoint_every_steps": 3, "log_every": 1}))
    straight = MemoryReporter()
    expected = train(spec, straight, tmp_path / "a", resume=False)
    first = MemoryReporter(stop_after_step=5)
    with pytest.raises(Cancelled):
        train(spec, first, tmp_path / "b")
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    resumed = MemoryReporter(metrics=list(first.metrics))  # the store's view: what the first attempt had logged
    result = train(spec, resumed, tmp_path / "b")
    assert [s for s, _ in resumed.series("train_loss")] == list(range(1, 11))
    values = lambda r: [v for _, v in r.series("train_loss")]  # noqa: E731
    assert values(resumed) == pytest.approx(values(straight), abs=1e-6)
    assert result.final_metrics["eval_loss"] == pytest.approx(expected.final_metrics["eval_loss"], abs=1e-6)
    assert not list((tmp_path / "b").glob("*.tmp"))  # written by rename: no half-written file stays behind


def test_spec_bounds_refuse_meaningless_training(lab_env):
    from engine.spec import SpecError

    for field, value in (("weight_decay", 5.0), ("grad_clip", 1e9), ("checkpoint_every_s", 0.1), ("lr", 0.0)):
        with pytest.raises(SpecError, match=f"train.{field}"):
            parse_spec(tiny_spec(train={field: value}))
    with pytest.raises(SpecError, match="resources.max_retries"):
        parse_spec(tiny_spec(resources={"max_retries": -1}))
