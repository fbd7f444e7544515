"""The database is any SQLAlchemy URL: every query of db.store and db.studies, on SQLite and on a real PostgreSQL
server (``db_lab``), gives the same answers; migrations run on PostgreSQL, one process at a time; a database that
cannot be opened is one line naming PEFTLAB_DB_URL."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import inspect, text

from db import config, store
from db import studies as db_studies
from db.schema import Base, utcnow
from engine.spec import SpecError, parse_spec
from tests.conftest import ROOT, tiny_spec, wait_for


def _spec(**overrides) -> dict:
    return parse_spec(tiny_spec(**overrides)).model_dump(mode="json")


def test_migrations_bring_a_fresh_postgresql_database_to_head(postgres_url):
    engine = store.new_engine(postgres_url)
    try:
        assert store.migrate(engine) is None  # a new database
        assert store.migrate(engine) == store.head_revision()  # then current: nothing to do
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == store.head_revision()
    finally:
        engine.dispose()


def test_a_run_lives_the_same_on_every_database(db_lab, tmp_path):
    run_id = store.create_run(_spec(experiment="exp-a", name="first"), executor="inline")
    run = store.get_run(run_id)
    assert (run["status"], run["attempt"], run["experiment"], run["model"], run["seed"]) == (
        "queued", 1, "exp-a", "tiny-bert", 0,
    )  # fmt: skip
    assert store.mark_running(run_id, "cpu") and not store.mark_running(run_id, "cpu")  # one claim wins
    assert store.heartbeat(run_id, 0.5, attempt=1) and not store.heartbeat(run_id, attempt=2)

    # NaN is skipped, infinities are kept, as they always were on SQLite.
    rows = [(1, "train_loss", 0.5), (2, "train_loss", math.nan), (3, "train_loss", math.inf), (3, "lr", -math.inf)]
    assert store.log_metrics(run_id, rows, attempt=1) == 3
    metrics = store.get_metrics([run_id])
    assert list(zip(metrics.step, metrics.key, metrics.value)) == [
        (3, "lr", -math.inf), (1, "train_loss", 0.5), (3, "train_loss", math.inf),
    ]  # fmt: skip
    assert store.latest_metrics([run_id]) == {run_id: {"lr": -math.inf, "train_loss": math.inf}}
    assert store.truncate_metrics(run_id, after_step=1) == 2

    assert store.finish_run(run_id, "succeeded", summary={"final_metrics": {"eval_accuracy": 0.75}}, attempt=1)
    assert not store.transition(run_id, "running")  # succeeded is final
    run = store.get_run(run_id)
    assert (run["status"], run["progress"], run["summary"]) == (
        "succeeded",
        1.0,
        {"final_metrics": {"eval_accuracy": 0.75}},
    )

    # A running attempt that stops heartbeating is lost; the keeper's retry queues attempt 2.
    other = store.create_run(_spec(experiment="exp-b"), executor="inline")
    assert store.mark_running(other, "cpu")
    store.update_run(other, heartbeat_at=utcnow() - timedelta(minutes=5))
    assert store.get_run(other)["status"] == "lost"
    assert store.requeue(other, reason="retry") == 2 and store.get_run(other)["attempt"] == 2

    assert [r["id"] for r in store.list_runs()] == [other, run_id]  # newest first
    assert [r["id"] for r in store.list_runs(status=["succeeded"])] == [run_id]
    assert [r["id"] for r in store.list_runs(experiment="exp-b")] == [other]
    assert store.list_runs(methods=["neat"]) == [] and len(store.list_runs(methods=["lora"], limit=1)) == 1

    file = tmp_path / "adapter.bin"
    file.write_bytes(b"weights")
    store.add_artifact(run_id, "adapter", file)
    store.add_artifact(run_id, "adapter", file)  # the same path again replaces the row
    assert [(a["kind"], a["bytes"]) for a in store.list_artifacts(run_id)] == [("adapter", 7)]
    store.delete_run(run_id)
    assert store.get_run(run_id) is None and store.list_artifacts(run_id) == [] and store.get_metrics([run_id]).empty


def test_values_postgresql_refuses_are_stored_as_sqlite_reads_them(db_lab):
    """Non-finite numbers in a JSON column become null and NUL characters leave text, on every database alike."""
    run_id = store.create_run(_spec(name="nul\x00name"), executor="inline", trial_params={"train.lr": math.inf})
    assert store.mark_running(run_id, "cpu")
    summary = {"final_metrics": {"eval_loss": math.nan, "eval_accuracy": 0.5}, "curve": [1.0, -math.inf]}
    assert store.finish_run(run_id, "failed", error="diverged\x00 at step 3", summary=summary)
    run = store.get_run(run_id)
    assert run["summary"] == {"final_metrics": {"eval_loss": None, "eval_accuracy": 0.5}, "curve": [1.0, None]}
    assert (run["error"], run["name"], run["trial_params"]) == ("diverged at step 3", "nulname", {"train.lr": None})


def test_names_and_seeds_at_the_columns_limits_are_stored_and_longer_ones_refused(db_lab):
    spec = _spec(name="n" * 200, experiment="e" * 200, train={"seed": 2**31 - 1})
    run = store.get_run(store.create_run(spec, executor="inline"))
    assert (len(run["name"]), len(run["experiment"]), run["seed"]) == (200, 200, 2**31 - 1)
    for field, overrides in [
        ("experiment", {"experiment": "e" * 201}),
        ("name", {"name": "n" * 201}),
        ("model", {"model": "m" * 301}),
        ("dataset.name", {"dataset": {"name": "d" * 301}}),
        ("train.seed", {"train": {"seed": -(2**31) - 1}}),
    ]:
        with pytest.raises(SpecError, match=rf"^invalid run spec: {field} .*: (shorten it|use one from 0 to \d+)$"):
            parse_spec(tiny_spec(**overrides))


def test_writers_racing_to_add_one_experiment_all_succeed(db_lab):
    barrier = threading.Barrier(4)
    made: list[str] = []

    def create() -> None:
        barrier.wait()
        made.append(store.create_run(_spec(experiment="raced"), executor="inline"))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 4 and {r["experiment"] for r in store.list_runs(experiment="raced")} == {"raced"}
    with store.get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM experiments WHERE name = 'raced'")).scalar() == 1


def test_studies_count_their_trials_on_every_database(db_lab):
    study_id = db_studies.create_study({"name": "lr-search"}, n_trials=3)
    empty = db_studies.create_study({"name": "empty\x00"}, n_trials=1)
    trials = [db_studies.trial_id(study_id, i) for i in range(3)]
    for i, trial in enumerate(reversed(trials)):
        store.create_run(_spec(), executor="inline", run_id=trial, study_id=study_id, trial_params={"train.lr": i})
    store.mark_running(trials[0], "cpu")
    assert db_studies.set_study_status(study_id, "running") and not db_studies.set_study_status(study_id, "queued")

    listed = {s["id"]: s for s in db_studies.list_studies()}
    assert listed[study_id]["counts"] == {"running": 1, "queued": 2} and listed[study_id]["status"] == "running"
    assert listed[empty]["counts"] == {} and listed[empty]["name"] == "empty"
    assert [s["id"] for s in db_studies.list_studies(limit=1)] == [empty]  # newest first
    assert [t["id"] for t in db_studies.trial_runs(study_id)] == trials
    assert [r["id"] for r in store.list_runs(study=study_id)] == trials  # made last to first
    assert db_studies.set_study_status(study_id, "failed", error="driver\x00 died")
    assert db_studies.get_study(study_id)["error"] == "driver died"


MIGRATE = "import sys\nfrom db import store\nprint(store.migrate(store.new_engine(sys.argv[1])))\n"


def test_two_processes_migrating_at_once_take_turns(postgres_url):
    """Both processes find a new database; the advisory lock lets one make the schema while the other waits,
    then finds it current. Held here first, the lock keeps both waiting until it is released."""
    engine = store.new_engine(postgres_url)
    try:
        with engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": store.PG_MIGRATION_LOCK})
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", MIGRATE, postgres_url],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                for _ in range(2)
            ]
            waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            with engine.connect() as probe:
                wait_for(lambda: probe.execute(waiting).scalar() == 2, timeout=60, every=0.2)
                assert not inspect(probe).has_table("alembic_version")  # neither got past the lock
            holder.rollback()  # releases the lock
        outputs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert sorted(out.strip() for out, _ in outputs) == sorted(["None", store.head_revision()])
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                store.head_revision()
            ]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://lab:s3cret@127.0.0.1:9/lab",  # nothing listens
        "postgresql+psycopg://lab:s3cret@/lab?host=/no/such/socket/folder",
        "postgres://lab:s3cret@db.example/lab",  # SQLAlchemy's name is postgresql
        "postgresql+nosuchdriver://lab:s3cret@db.example/lab",
        "lab:s3cret@db.example/lab",  # not a URL
    ],
)
def test_a_database_that_cannot_be_opened_is_one_line_naming_the_variable(lab_env, monkeypatch, url):
    monkeypatch.setenv("PEFTLAB_DB_URL", url)
    store.get_engine.cache_clear()
    with pytest.raises(config.DatabaseError) as err:
        store.list_runs()
    message = str(err.value)
    assert message.startswith("cannot open the database PEFTLAB_DB_URL=") and "\n" not in message
    assert "s3cret" not in message and "***" in message and message.endswith("@host/peftlab")
