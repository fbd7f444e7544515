"""End to end on a real local Ray head and a real SQLite file: submit, train, cancel, fail, reconcile."""

from __future__ import annotations

from pathlib import Path

import pytest

from db import store
from jobs import cluster
from jobs.runs import cancel_run, reconcile, submit_run, submit_seeds
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.slow


def test_submit_cancel_fail_and_reconcile(ray_lab):
    ok_runs = submit_seeds(tiny_spec(), [0, 1])
    long_run = submit_run(tiny_spec(dataset={"max_train": 2000}, train={"epochs": 200}))
    bad_run = submit_run(tiny_spec(dataset={"name": "no_such_file.csv"}))

    # Cancel the long run once it is really training (it has logged a metric).
    wait_for(lambda: not store.get_metrics([long_run]).empty)
    assert store.get_run(long_run)["status"] == "running"
    assert cancel_run(long_run)

    final = {rid: wait_for(lambda rid=rid: _final(rid)) for rid in [*ok_runs, long_run, bad_run]}
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
    assert final[bad_run]["status"] == "failed"
    assert "dataset.name" in final[bad_run]["error"] and "no_such_file.csv" in final[bad_run]["error"]

    # Ray agrees with the database.
    client = cluster.job_client()
    ray_status = lambda rid: str(wait_for(lambda: _terminal_job(client, rid)))  # noqa: E731
    assert [ray_status(r) for r in ok_runs] == ["SUCCEEDED", "SUCCEEDED"]
    assert ray_status(long_run) == "STOPPED"
    assert ray_status(bad_run) == "FAILED"
    assert reconcile() == {}
    # Each job's CPU threads are capped at the CPUs Ray reserved for it (num_cpus 1 in tiny_spec).
    assert client.get_job_info(ok_runs[0]).runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_reconcile_fails_runs_ray_does_not_know(ray_lab):
    run_id = store.create_run(_spec_dict(), executor="ray")
    assert reconcile() == {run_id: "failed"}
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "Ray no longer knows" in run["error"]


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
