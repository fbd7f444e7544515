"""End to end on a real local Ray head and a real SQLite file: submit, train, cancel, refuse, sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from db import store
from engine.errors import UserError
from jobs import cluster
from jobs.runs import cancel_run, job_id, submit_run, submit_seeds, sweep
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.slow


def test_submit_cancel_fail_and_reconcile(ray_lab):
    ok_runs = submit_seeds(tiny_spec(), [0, 1])
    long_run = submit_run(tiny_spec(dataset={"max_train": 2000}, train={"epochs": 200}))
    runs_before = len(store.list_runs(limit=None))
    with pytest.raises(UserError, match="dataset.name.*no_such_file.csv"):  # refused before any run row exists
        submit_run(tiny_spec(dataset={"name": "no_such_file.csv"}))
    assert len(store.list_runs(limit=None)) == runs_before

    # Cancel the long run once it is really training (it has logged a metric).
    wait_for(lambda: not store.get_metrics([long_run]).empty)
    assert store.get_run(long_run)["status"] == "running"
    assert cancel_run(long_run)

    final = {rid: wait_for(lambda rid=rid: _final(rid)) for rid in [*ok_runs, long_run]}
    for rid in ok_runs:
        run = final[rid]
        assert run["status"] == "succeeded", run["error"]
        assert run["trainable_params"] > 0 and run["total_params"] > run["trainable_params"]
        metrics = store.get_metrics([rid])
        assert {"train_loss", "eval_accuracy", "eval_loss"} <= set(metrics["key"])
        assert metrics[metrics.key == "train_loss"]["step"].tolist() == [1, 2, 3, 4]
        kinds = {a["kind"]: a for a in store.list_artifacts(rid)}
        assert {"adapter", "adapter_config", "log"} <= set(kinds)
        assert Path(kinds["adapter"]["path"]).stat().st_size == kinds["adapter"]["bytes"]
        assert store.sha256_file(Path(kinds["adapter"]["path"])) == kinds["adapter"]["sha256"]
    # Different seeds, different results.
    assert store.get_metrics([ok_runs[0]]).value.tolist() != store.get_metrics([ok_runs[1]]).value.tolist()

    assert final[long_run]["status"] == "cancelled"
    assert not store.get_metrics([long_run]).empty  # what it logged before the cancel is kept

    # Ray agrees with the database.
    client = cluster.job_client()
    ray_status = lambda rid: str(wait_for(lambda: _terminal_job(client, rid)))  # noqa: E731
    assert [ray_status(r) for r in ok_runs] == ["SUCCEEDED", "SUCCEEDED"]
    assert ray_status(long_run) == "STOPPED"
    assert sweep() == {}
    # Each job's CPU threads are capped at the CPUs Ray reserved for it (num_cpus 1 in tiny_spec).
    assert client.get_job_info(ok_runs[0]).runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_sweep_retries_a_run_whose_job_ray_lost(ray_lab):
    """A queued run that Ray does not know (its submission was lost with a restarted head) is lost after the
    submission grace, then retried as attempt 2, which trains it to the end."""
    from datetime import timedelta

    from db.schema import utcnow
    from tests.test_lifecycle import _set

    run_id = store.create_run(_spec_dict(), executor="ray")
    assert sweep() == {}  # within the grace: it may still be being submitted
    _set(run_id, created_at=utcnow() - timedelta(minutes=5))
    # This sweep or the keeper's (every 5 s on the cluster) retries it, exactly once.
    assert sweep().get(run_id, "unchanged") in ("retried as attempt 2", "unchanged")
    run = wait_for(lambda: _final(run_id))
    assert (run["status"], run["attempt"]) == ("succeeded", 2), run["error"]
    assert str(cluster.job_client().get_job_status(job_id(run_id, 2))) in ("SUCCEEDED", "RUNNING")


def test_local_head_requires_the_token(ray_lab):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="(?i)auth|token|401|403"):
        JobSubmissionClient(cluster.dashboard_address()).list_jobs()
    assert isinstance(cluster.job_client().list_jobs(), list)


def test_local_head_lets_runs_queue_longer_than_rays_default(ray_lab):
    """Ray fails a job that waits more than 15 min for resources; the local head raises that to a week, so runs
    submitted behind others wait their turn. The dashboard (Ray's job manager) inherits the head's environment."""
    import json

    import psutil

    def command_line(process: psutil.Process) -> list[str]:
        try:
            return process.cmdline()
        except psutil.Error:  # a worker that exited meanwhile (or a zombie not yet reaped)
            return []

    head = psutil.Process(json.loads(cluster.state_file().read_text())["pid"])
    processes = [head, *head.children(recursive=True)]
    dashboards = [p for p in processes if any("dashboard.py" in part for part in command_line(p))]
    assert dashboards, [command_line(p)[:3] for p in processes]
    for process in dashboards:
        assert process.environ().get("RAY_JOB_START_TIMEOUT_SECONDS") == str(cluster.QUEUE_TIMEOUT_S)


def _spec_dict() -> dict:
    from engine.spec import parse_spec

    return parse_spec(tiny_spec()).model_dump(mode="json")


def _final(run_id: str):
    run = store.get_run(run_id)
    return run if run["status"] in ("succeeded", "failed", "cancelled") else None


def _terminal_job(client, run_id):
    status = client.get_job_status(run_id)
    return status if status.is_terminal() else None


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_local_head_listens_on_loopback_only_and_keeps_its_files_private(ray_lab):
    """Every socket that the head and its processes (GCS, raylet, dashboard, agents, metrics exporters, workers,
    the keeper) listen on is on loopback; Ray's temp folder sits in a folder of the owner's only."""
    import json
    import stat

    import psutil

    head = psutil.Process(json.loads(cluster.state_file().read_text())["pid"])
    pids = {head.pid} | {p.pid for p in head.children(recursive=True)}
    listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]  # fmt: skip
    assert len(listening) >= 5, listening  # GCS, raylet, dashboard, agents: the check did see the head
    outside = [entry for entry in listening if entry[0] not in LOOPBACK]
    assert not outside, outside
    temp_dirs = {Path(arg.split("=", 1)[1]) for arg in head.cmdline() if arg.startswith("--temp-dir=")}
    assert len(temp_dirs) == 1
    private = next(iter(temp_dirs)).parent
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE(cluster.ray_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(cluster.token_file().stat().st_mode) == 0o600
