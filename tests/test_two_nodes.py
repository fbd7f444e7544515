"""A study on two Ray nodes with the database on a real PostgreSQL server and one shared artifact folder.

Both nodes run on this machine on 127.0.0.1 (``ray.cluster_utils.Cluster``, as Ray tests several nodes; a head
started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every listener on loopback), with token authentication.
Each node has one CPU, so two concurrent trials must use both. Then the worker node is killed mid-study: no trial
may stay running; Tune retries the trials it had on the remaining node, where they resume from their checkpoints.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from contextlib import contextmanager

import pytest

from db import store
from db import studies as db_studies
from db.schema import FINAL_STATUSES
from jobs.runs import runtime_env
from jobs.studies import TRIAL_THREAD_TIMEOUT_S, record_study
from jobs.study_driver import run_study
from tests.conftest import ROOT, tiny_spec, wait_for

ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = pytest.mark.slow


@contextmanager
def token_auth():
    """Token authentication for this process's Ray client and the nodes it starts, undone afterwards. Ray reads
    its auth mode once per process, so the cached config and token are reloaded on both edges."""
    from ray._raylet import AuthenticationTokenLoader, Config

    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture()
def two_nodes(pg_lab, monkeypatch):
    from ray._private import ray_constants

    # Both nodes on 127.0.0.1: Ray resolves a loopback node address to the machine's own unless clustering on one
    # machine is "disabled" (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the nodes it starts; this constant for the
    # addresses this process computes, read when Ray was first imported).
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    with token_auth():
        yield from _two_nodes()


def _two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})  # fmt: skip
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    env = runtime_env()["env_vars"] | {"TUNE_FUNCTION_THREAD_TIMEOUT_S": TRIAL_THREAD_TIMEOUT_S}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def _study(space_lrs, spec) -> str:
    return record_study({"name": "two-nodes", "spec": spec, "space": {"train.lr": {"grid": space_lrs}},
                         "max_concurrent": 2})  # fmt: skip


def test_a_study_spreads_over_both_nodes_and_survives_losing_one(two_nodes):
    cluster, worker = two_nodes
    assert store.get_engine().dialect.name == "postgresql"

    study_id = _study([1e-3, 2e-3, 3e-3, 4e-3], tiny_spec(dataset={"max_train": 16 * 40}))
    assert run_study(study_id) == "succeeded"
    trials = db_studies.trial_runs(study_id)
    assert [t["status"] for t in trials] == ["succeeded"] * 4
    assert len({t["node_id"] for t in trials}) == 2, [t["node_id"] for t in trials]  # both nodes trained
    per_node = sorted(Counter(t["node_id"] for t in trials).values())

    # The worker node dies while it trains a trial: Tune retries it on the head, from its last checkpoint.
    long = tiny_spec(dataset={"max_train": 16 * 400}, train={"checkpoint_every_steps": 20})
    study_id = _study([1e-3, 2e-3, 3e-3], long)
    result: dict[str, str] = {}
    driver = threading.Thread(target=lambda: result.update(status=run_study(study_id)), daemon=True)
    driver.start()

    def on_worker():
        for t in db_studies.trial_runs(study_id):
            if t["status"] == "running" and t["node_id"] == worker.node_id:
                steps = store.get_metrics([t["id"]], keys=["train_loss"])["step"]
                if len(steps) and steps.max() >= 30:
                    return t["id"]
        return None

    victim = wait_for(on_worker, timeout=300)
    cluster.remove_node(worker)
    killed = time.monotonic()
    driver.join(timeout=900)
    assert not driver.is_alive() and result["status"] == "succeeded"
    trials = {t["id"]: t for t in db_studies.trial_runs(study_id)}
    assert all(t["status"] in FINAL_STATUSES for t in trials.values()), {i: t["status"] for i, t in trials.items()}
    retried = trials[victim]
    assert (retried["status"], retried["attempt"]) == ("succeeded", 2), (retried["status"], retried["error"])
    steps = store.get_metrics([victim], keys=["train_loss"])["step"].tolist()
    assert steps == list(range(1, 401)), (len(steps), steps[:3], steps[-3:])  # resumed: every step exactly once
    assert retried["node_id"] != worker.node_id
    facts = {
        "database": store.get_engine().dialect.name, "trials_per_node_first_study": per_node,
        "victim": victim, "victim_attempts": retried["attempt"], "victim_steps_logged_once": len(steps),
        "study_finished_s_after_node_killed": round(time.monotonic() - killed, 1),
        "statuses_second_study": sorted(t["status"] for t in trials.values()),
    }  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "two_nodes.jsonl", "a") as f:  # what the notes report
        f.write(json.dumps(facts) + "\n")
