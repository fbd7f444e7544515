"""Schema migrations through alembic (db/migrations): a new database gets the model's schema, and databases of the
old hand-written migrations (schema_version 1 or 2) upgrade in place."""

from __future__ import annotations

import shutil

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from db import store
from db.schema import Base

# The schema the old migration 1 made (Base.metadata.create_all before runs had attempt and owner), as SQLite DDL.
OLD_SCHEMA_1 = [
    """CREATE TABLE schema_version (
        version INTEGER NOT NULL, applied_at DATETIME NOT NULL, PRIMARY KEY (version))""",
    """CREATE TABLE experiments (
        id INTEGER NOT NULL, name VARCHAR(200) NOT NULL, created_at DATETIME NOT NULL,
        PRIMARY KEY (id), UNIQUE (name))""",
    """CREATE TABLE runs (
        id VARCHAR(64) NOT NULL, experiment_id INTEGER NOT NULL, name VARCHAR(200), model VARCHAR(300) NOT NULL,
        dataset VARCHAR(300) NOT NULL, method VARCHAR(64) NOT NULL, seed INTEGER NOT NULL, tags JSON NOT NULL,
        spec JSON NOT NULL, status VARCHAR(16) NOT NULL, executor VARCHAR(16) NOT NULL, created_at DATETIME NOT NULL,
        started_at DATETIME, finished_at DATETIME, heartbeat_at DATETIME, progress FLOAT NOT NULL, error TEXT,
        device VARCHAR(100), trainable_params BIGINT, total_params BIGINT, summary JSON NOT NULL,
        PRIMARY KEY (id), FOREIGN KEY(experiment_id) REFERENCES experiments (id))""",
    "CREATE INDEX ix_runs_status ON runs (status)",
    "CREATE INDEX ix_runs_method ON runs (method)",
    "CREATE INDEX ix_runs_created_at ON runs (created_at)",
    """CREATE TABLE artifacts (
        id INTEGER NOT NULL, run_id VARCHAR(64) NOT NULL, kind VARCHAR(64) NOT NULL, path TEXT NOT NULL,
        sha256 VARCHAR(64) NOT NULL, bytes BIGINT NOT NULL, created_at DATETIME NOT NULL,
        PRIMARY KEY (id), FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)""",
    "CREATE INDEX ix_artifacts_run_id ON artifacts (run_id)",
    """CREATE TABLE metrics (
        id INTEGER NOT NULL, run_id VARCHAR(64) NOT NULL, step INTEGER NOT NULL, "key" VARCHAR(100) NOT NULL,
        value FLOAT NOT NULL, PRIMARY KEY (id), FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)""",
    'CREATE INDEX ix_metrics_run_key_step ON metrics (run_id, "key", step)',
    "INSERT INTO schema_version (version, applied_at) VALUES (1, '2025-01-01 00:00:00')",
    "INSERT INTO experiments (id, name, created_at) VALUES (1, 'default', '2025-01-01 00:00:00')",
    """INSERT INTO runs (id, experiment_id, model, dataset, method, seed, tags, spec, status, executor, created_at,
        progress, summary) VALUES ('run-old', 1, 'tiny-bert', 'digits', 'lora', 0, '[]', '{}', 'succeeded', 'inline',
        '2025-01-01 00:00:00', 1.0, '{}')""",
    "INSERT INTO metrics (run_id, step, \"key\", value) VALUES ('run-old', 1, 'train_loss', 0.5)",
]
# The old migration 2.
OLD_SCHEMA_2 = [
    "ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE runs ADD COLUMN owner VARCHAR(200)",
    "INSERT INTO schema_version (version, applied_at) VALUES (2, '2025-02-01 00:00:00')",
]


def _engine(tmp_path, statements=()):
    engine = store.new_engine(f"sqlite:///{tmp_path / 'lab.db'}")
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))
    return engine


def _assert_schema_is_the_model(engine) -> None:
    """Exactly the model's tables and columns, alembic's bookkeeping aside, and no autogenerate difference."""
    with engine.connect() as conn:
        insp = inspect(conn)
        assert set(insp.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
        for name, table in Base.metadata.tables.items():
            assert {c["name"] for c in insp.get_columns(name)} == {c.name for c in table.columns}, name
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert MigrationContext.configure(conn).get_current_revision() == store.head_revision() == "0005"


def test_new_database_is_made_by_the_revisions(db_lab):
    engine = store.get_engine()
    _assert_schema_is_the_model(engine)
    assert store.migrate(engine) == "0005"  # already at head: nothing to do
    with engine.connect() as conn:
        runs = {c["name"]: c for c in inspect(conn).get_columns("runs")}
    assert not runs["attempt"]["nullable"] and runs["owner"]["nullable"]


def test_new_database_returns_no_revision_before(tmp_path):
    engine = _engine(tmp_path)
    assert store.migrate(engine) is None
    _assert_schema_is_the_model(engine)


@pytest.mark.parametrize("old", [1, 2])
def test_old_database_upgrades_in_place(tmp_path, old):
    engine = _engine(tmp_path, OLD_SCHEMA_1 + (OLD_SCHEMA_2 if old == 2 else []))
    assert store.migrate(engine) == f"000{old}"  # stamped at the matching revision, then upgraded
    _assert_schema_is_the_model(engine)  # the old schema_version table is gone too
    with engine.connect() as conn:
        run = conn.execute(text("SELECT id, status, attempt, owner FROM runs")).one()
        assert tuple(run) == ("run-old", "succeeded", 1, None)
        assert conn.execute(text("SELECT count(*) FROM metrics WHERE run_id = 'run-old'")).scalar() == 1
    assert store.migrate(engine) == "0005"


def test_database_of_the_previous_revision_gains_studies_and_keeps_its_runs(tmp_path):
    """A database made by revision 0002 (before studies) upgrades in place: its runs are kept, outside any study."""
    from alembic import command

    engine = _engine(tmp_path)
    with engine.begin() as conn:
        command.upgrade(store.alembic_config(conn), "0002")
        for sql in OLD_SCHEMA_1[-3:-1]:  # an experiment and a run
            conn.execute(text(sql))
    assert store.migrate(engine) == "0002"
    _assert_schema_is_the_model(engine)
    with engine.connect() as conn:
        run = conn.execute(text("SELECT id, status, attempt, study_id, trial_params FROM runs")).one()
        assert tuple(run) == ("run-old", "succeeded", 1, None, None)
        assert conn.execute(text("SELECT count(*) FROM studies")).scalar() == 0


def test_database_of_the_previous_revision_gets_64_bit_metric_ids(db_lab):
    """Revision 0004 widens metrics.id (and, on PostgreSQL, the sequence numbering it) and keeps the rows; after it a
    metric id past 2**31 is stored and the next row is numbered after it."""
    from alembic import command

    from db import config

    engine = store.new_engine(config.db_url())
    with engine.begin() as conn:
        command.upgrade(store.alembic_config(conn), "0003")
        for sql in OLD_SCHEMA_1[-3:]:  # an experiment, a run and its metric
            conn.execute(text(sql))
    assert store.migrate(engine) == "0003"
    _assert_schema_is_the_model(engine)
    big = 2**31 + 10
    with engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO metrics (id, run_id, step, \"key\", value) VALUES ({big}, 'run-old', 2, 'a', 1)")
        )
        if engine.dialect.name == "postgresql":  # an explicit id leaves the sequence behind: move it on
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('metrics', 'id'), {big})"))
    store.get_engine.cache_clear()
    assert store.log_metrics("run-old", [(3, "a", 2.0)]) == 1
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM metrics WHERE run_id = 'run-old' ORDER BY id")).scalars().all()
        assert ids == [1, big, big + 1]
        if engine.dialect.name == "postgresql":
            sequence = text("SELECT data_type FROM information_schema.sequences WHERE sequence_name = 'metrics_id_seq'")
            assert conn.execute(sequence).scalar() == "bigint"
    engine.dispose()


def test_newer_database_is_refused(tmp_path):
    engine = _engine(tmp_path)
    store.migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(RuntimeError, match=r"^database schema version 0099 is newer than this code \(0005\): update"):
        store.migrate(engine)


def test_newer_old_style_database_is_refused(tmp_path):
    engine = _engine(tmp_path, [*OLD_SCHEMA_1, *OLD_SCHEMA_2, "INSERT INTO schema_version VALUES (3, '2025-03-01')"])
    with pytest.raises(RuntimeError, match=r"^database schema version 3 is newer than this code \(0005\): update"):
        store.migrate(engine)
    with engine.connect() as conn:
        assert inspect(conn).has_table("schema_version") and not inspect(conn).has_table("alembic_version")


def test_a_revision_that_copies_a_table_keeps_the_rows_referencing_it(tmp_path, monkeypatch):
    """SQLite batch mode copies a table and drops the old one: with foreign keys on, that would cascade to metrics
    and artifacts. ``migrate`` turns them off for the migration (and on again after)."""
    engine = _engine(tmp_path, OLD_SCHEMA_1 + OLD_SCHEMA_2)
    store.migrate(engine)
    migrations = shutil.copytree(
        store.MIGRATIONS_DIR, tmp_path / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    (migrations / "versions" / "0006_copy_runs.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\n\nrevision = '0006'\ndown_revision = '0005'\n\n\n"
        "def upgrade():\n    with op.batch_alter_table('runs', recreate='always') as batch:\n"
        "        batch.alter_column('name', existing_type=sa.String(200), type_=sa.String(250))\n"
    )
    monkeypatch.setattr(store, "MIGRATIONS_DIR", migrations)
    assert store.migrate(engine) == "0005"
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0006"
        assert conn.execute(text("SELECT count(*) FROM metrics WHERE run_id = 'run-old'")).scalar() == 1
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
