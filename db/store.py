"""Database access: engine creation, schema migrations (alembic, db/migrations), and every query the app, CLI
and workers use.

Pages, the CLI and the worker never write SQL themselves; they call these functions. Every query is portable
SQLAlchemy (tested on SQLite and PostgreSQL): no dialect's SQL, no value one database stores and another refuses
(non-finite numbers in JSON, NUL characters in text).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, delete, event, func, insert, inspect, make_url, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import config
from db.schema import (
    LOST_AFTER_S,
    STATUSES,
    Artifact,
    Experiment,
    Metric,
    Run,
    sources_of,
    utcnow,
)

# --- engine and schema ---------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # several workers write: wait instead of failing
    # Readers never block the writer (UI reads while workers log). WAL is a property of the file, set once; the
    # switch needs the file to itself, and SQLite answers "locked" at once (no waiting) when connections opening
    # a new database together all try it: whoever loses finds it done, or tries again.
    for attempt in range(50):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.1)
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; much faster commits
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The PostgreSQL advisory lock that one migrator holds while the others wait (any constant key; ours spells "PEFT").
PG_MIGRATION_LOCK = 7065667416
# A database made before alembic has the old hand-written list's schema_version table: its version -> revision.
LEGACY_REVISIONS = {1: "0001", 2: "0002"}


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic's configuration, in code (no alembic.ini): the revisions in db/migrations, run on ``connection``."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest schema revision this code knows."""
    return cast(str, ScriptDirectory.from_config(alembic_config()).get_current_head())


def _newer(found: object, head: str) -> RuntimeError:
    return RuntimeError(f"database schema version {found} is newer than this code ({head}): update PEFT Lab")


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the head revision through alembic; returns the revision found before (None: a new
    database). A database of the old hand-written migrations is stamped at its matching revision first (and its
    schema_version table dropped); one at a revision this code does not know is refused."""
    script = ScriptDirectory.from_config(alembic_config())
    head = cast(str, script.get_current_head())
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return head  # the common case, for every new engine: nothing to do
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # SQLite alters most things by copying the table (batch mode); with foreign keys on, dropping the old
            # copy would delete the rows that reference it (ON DELETE CASCADE). Off while migrating, checked before
            # the commit (sqlite.org/lang_altertable.html); a pragma that cannot change inside a transaction.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                before = _upgrade(conn, script, head)
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the schema migration left rows whose foreign keys match nothing")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    return before


def _upgrade(conn: Connection, script: ScriptDirectory, head: str) -> str | None:
    # One migrator at a time: the others wait here, then find the schema current.
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
    before = MigrationContext.configure(conn).get_current_revision()
    if before is None and inspect(conn).has_table("schema_version"):
        legacy = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
        if legacy is not None and legacy not in LEGACY_REVISIONS:
            raise _newer(legacy, head)
        if legacy is not None:
            before = LEGACY_REVISIONS[legacy]
            command.stamp(alembic_config(conn), before)
        conn.execute(text("DROP TABLE schema_version"))
    if before is not None and before not in {s.revision for s in script.walk_revisions()}:
        raise _newer(before, head)
    command.upgrade(alembic_config(conn), "head")
    return before


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity inside it (dicts, lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """The JSON columns' serializer: NaN and infinities are written as null. Standard JSON has no such numbers and
    PostgreSQL refuses them; SQLite would keep them, so every database stores null and reads back None."""
    return json.dumps(_finite(value), allow_nan=False)


def new_engine(url: str) -> Engine:
    """An engine for ``url`` with PEFT Lab's settings (SQLite: a private file, WAL, busy timeout, foreign keys;
    a server: connections checked before use, so one the server closed is replaced), its schema left as it is."""
    kwargs: dict[str, Any] = {"json_serializer": json_dumps}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            # Readable by the owner only: create the file 0600 before SQLite opens it (SQLite gives its -wal and
            # -shm files the database file's mode) and tighten an existing database and its -wal/-shm files.
            path = Path(database)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if file.exists() and file.stat().st_uid == os.getuid() and file.stat().st_mode & 0o777 != 0o600:
                    file.chmod(0o600)
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


# Threads of one process asking for the first engine at once would each open and migrate the database.
_ENGINE_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The engine of ``url`` (default: ``PEFTLAB_DB_URL``), its schema migrated to the head revision.

    A URL that cannot be parsed, a missing driver or a server that does not answer raise ``config.DatabaseError``:
    one line naming PEFTLAB_DB_URL, its password hidden.
    """
    url = url or config.db_url()
    with _ENGINE_LOCK:
        try:
            engine = new_engine(url)
            migrate(engine)
        except (ArgumentError, ImportError, OperationalError, InterfaceError) as err:
            raise _unusable(url, err) from err
    return engine


def _unusable(url: str, err: Exception) -> config.DatabaseError:
    cause = getattr(err, "orig", None) or err  # the driver's own error, without SQLAlchemy's SQL and links
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    reason = lines[0].strip()
    password = _password(url)
    if password:
        reason = reason.replace(password, "***")
    return config.DatabaseError(
        f"cannot open the database PEFTLAB_DB_URL={config.db_location(url)} ({reason}): set PEFTLAB_DB_URL to a "
        "reachable SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host/peftlab"
    )


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except ArgumentError:
        return None


@contextmanager
def using_home(path: Path) -> Iterator[Path]:
    """Point PEFT Lab at a home of its own (``config.home_env``) for the block, on the local Ray head rather than
    any ``RAY_ADDRESS``, and restore the previous environment and database engine afterwards."""
    env = config.home_env(path)
    saved = {k: os.environ.get(k) for k in [*env, "RAY_ADDRESS"]}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    get_engine.cache_clear()
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_engine.cache_clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    maker = sessionmaker(get_engine(url), expire_on_commit=False)
    with maker.begin() as session:
        yield session


def without_nul(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with NUL characters removed from its strings: PostgreSQL refuses them in text (an error message
    of a crashed worker may carry one) and no column of ours has a use for them."""
    return {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in fields.items()}


def insert_ignoring_duplicates(session: Session, table: Any, values: dict[str, Any]) -> None:
    """Insert a row unless one with the same unique key exists, in the dialect's own way (ON CONFLICT DO NOTHING);
    another database gets a savepoint that swallows the duplicate. Two writers racing to add it both succeed."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing())
        return
    if dialect == "sqlite":
        session.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing())
        return
    try:
        with session.begin_nested():
            session.execute(insert(table).values(**values))
    except IntegrityError:
        pass


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. ``Session.execute`` types its result as Result; for those statements it is
    a CursorResult, which has ``rowcount``."""
    return cast(CursorResult[Any], result).rowcount


# --- runs ----------------------------------------------------------------------------------------


def new_run_id() -> str:
    return f"run-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _experiment_id(session: Session, name: str) -> int:
    query = select(Experiment.id).where(Experiment.name == name)
    exp_id = session.scalar(query)
    if exp_id is None:  # a new experiment, which another writer may be adding at the same moment
        insert_ignoring_duplicates(session, Experiment, {"name": name, "created_at": utcnow()})
        exp_id = session.scalar(query)
    return cast(int, exp_id)


def create_run(
    spec: dict[str, Any], *, executor: str = "ray", run_id: str | None = None, status: str = "queued",
    study_id: str | None = None, trial_params: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """Insert a run row for a validated RunSpec (as a JSON-able dict) and return its id; a study's trial also
    records its study and the searched fields' values."""
    run_id = run_id or new_run_id()
    columns = without_nul(
        {"experiment": spec.get("experiment", "default"), "name": spec.get("name"), "model": spec["model"],
         "dataset": spec["dataset"]["name"], "method": spec["method"]["name"]}
    )  # fmt: skip
    experiment = columns.pop("experiment")
    with session_scope() as s:
        s.add(
            Run(
                id=run_id,
                study_id=study_id,
                trial_params=trial_params,
                experiment_id=_experiment_id(s, experiment),
                **columns,
                seed=spec["train"]["seed"],
                tags=list(spec.get("tags", [])),
                spec=spec,
                status=status,
                executor=executor,
                created_at=utcnow(),
                summary={},
            )
        )
    return run_id


def run_to_dict(run: Run) -> dict[str, Any]:
    return {c.key: getattr(run, c.key) for c in inspect(Run).mapper.column_attrs} | {
        "experiment": run.experiment.name if run.experiment else None
    }


def get_run(run_id: str) -> dict[str, Any] | None:
    expire_stale()
    with session_scope() as s:
        run = s.get(Run, run_id)
        return run_to_dict(run) if run else None


def list_runs(
    *,
    status: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    experiment: str | None = None,
    study: str | None = None,
    limit: int | None = 500,
) -> list[dict[str, Any]]:
    expire_stale()
    with session_scope() as s:
        q = select(Run).order_by(Run.created_at.desc(), Run.id.desc())  # the id breaks ties the same everywhere
        if study:
            q = q.where(Run.study_id == study)
        if status:
            q = q.where(Run.status.in_(list(status)))
        if methods:
            q = q.where(Run.method.in_(list(methods)))
        if experiment:
            q = q.join(Experiment).where(Experiment.name == experiment)
        if limit:
            q = q.limit(limit)
        return [run_to_dict(r) for r in s.scalars(q)]


def update_run(run_id: str, **fields: Any) -> bool:
    """Update columns of a run other than its status (statuses change only through ``transition``)."""
    if "status" in fields:
        raise ValueError("update_run does not change a status: use transition()")
    with session_scope() as s:
        return _rowcount(s.execute(update(Run).where(Run.id == run_id).values(**without_nul(fields)))) > 0


def transition(
    run_id: str, to: str, *, of_attempt: int | None = None, only_from: Iterable[str] | None = None, **fields: Any
) -> bool:
    """Move a run to status ``to`` in one conditional UPDATE; True if it moved.

    It moves only from a status that may reach ``to`` (``db.schema.TRANSITIONS``), narrowed to ``only_from`` if
    given, and, with ``of_attempt``, only while that attempt is the run's current one, so a worker whose attempt was
    taken over can write nothing.
    """
    if to not in STATUSES:
        raise ValueError(f"unknown run status {to!r}")
    allowed = [s for s in sources_of(to) if only_from is None or s in set(only_from)]
    stmt = update(Run).where(Run.id == run_id, Run.status.in_(allowed))
    if of_attempt is not None:
        stmt = stmt.where(Run.attempt == of_attempt)
    with session_scope() as s:
        return _rowcount(s.execute(stmt.values(status=to, **without_nul(fields)))) > 0


def claim(run_id: str, attempt: int, owner: str, device: str) -> bool:
    """A worker takes its attempt of a queued run: running, owned by ``owner`` (host:pid)."""
    now = utcnow()
    return transition(
        run_id, "running", of_attempt=attempt, only_from=("queued",), owner=owner, device=device,
        started_at=func.coalesce(Run.started_at, now), heartbeat_at=now, finished_at=None, error=None,
    )  # fmt: skip


def mark_running(run_id: str, device: str) -> bool:
    """Claim attempt 1 of a queued run for this process (tests and simple callers)."""
    return claim(run_id, 1, owner_id(), device)


def owner_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def finish_run(
    run_id: str, status: str, *, error: str | None = None, summary: dict | None = None, attempt: int | None = None
) -> bool:
    """Set a final status, only from a status that may reach it (a cancelled run stays cancelled)."""
    fields: dict[str, Any] = {"finished_at": utcnow()}
    if error is not None:
        fields["error"] = error
    if summary is not None:
        fields["summary"] = summary
    if status == "succeeded":
        fields["progress"] = 1.0
    return transition(run_id, status, of_attempt=attempt, **fields)


def heartbeat(run_id: str, progress: float | None = None, *, attempt: int | None = None) -> bool:
    """The live attempt says it is alive; False if the run is no longer running this attempt."""
    fields: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        fields["progress"] = float(progress)
    stmt = update(Run).where(Run.id == run_id, Run.status == "running").values(**fields)
    if attempt is not None:
        stmt = stmt.where(Run.attempt == attempt)
    with session_scope() as s:
        return _rowcount(s.execute(stmt)) > 0


def expire_stale(now: datetime | None = None) -> int:
    """The liveness rule, applied by every reader: a running attempt whose heartbeat is older than
    ``LOST_AFTER_S`` is lost. One UPDATE; returns how many runs it marked."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=LOST_AFTER_S)
    stmt = (
        update(Run)
        .where(Run.status == "running", Run.heartbeat_at < cutoff)
        .values(status="lost", error=f"no heartbeat for more than {LOST_AFTER_S:.0f} s: the worker or its node died")
    )
    with session_scope() as s:
        return _rowcount(s.execute(stmt))


def requeue(run_id: str, *, reason: str, only_from: Iterable[str] | None = None) -> int | None:
    """Queue the run's next attempt (a retry or a resume) in one UPDATE; returns the new attempt number, or None if
    the run is not in a status that can be queued again (or another caller queued it first). ``heartbeat_at`` is
    set to when it was queued, so a sweep gives its submission the same grace as a new run's."""
    with session_scope() as s:
        attempt = s.scalar(select(Run.attempt).where(Run.id == run_id))
    if attempt is None:
        return None
    moved = transition(
        run_id, "queued", of_attempt=attempt, only_from=only_from, attempt=attempt + 1, owner=None,
        finished_at=None, heartbeat_at=utcnow(), error=reason,
    )  # fmt: skip
    return attempt + 1 if moved else None


def delete_run(run_id: str) -> None:
    with session_scope() as s:
        s.execute(delete(Metric).where(Metric.run_id == run_id))
        run = s.get(Run, run_id)
        if run:
            s.delete(run)


# --- metrics -------------------------------------------------------------------------------------


def log_metrics(run_id: str, rows: Iterable[tuple[int, str, float]], *, attempt: int | None = None) -> int:
    """Insert (step, key, value) rows in one transaction (executemany); returns how many were stored.

    A NaN value is skipped (SQL has no NaN in every database; the run's error says what diverged), infinities are
    stored as such, and the rest of the batch is always kept. With ``attempt``, the rows are written only while
    that attempt owns the running run (checked in the same transaction, which also counts as a heartbeat).
    """
    payload = [
        {"run_id": run_id, "step": int(st), "key": k, "value": float(v)} for st, k, v in rows if not math.isnan(v)
    ]
    if not payload:
        return 0
    with session_scope() as s:
        if attempt is not None:
            owned = update(Run).where(Run.id == run_id, Run.attempt == attempt, Run.status == "running")
            if _rowcount(s.execute(owned.values(heartbeat_at=utcnow()))) == 0:
                return 0
        s.execute(insert(Metric), payload)
    return len(payload)


def truncate_metrics(run_id: str, after_step: int) -> int:
    """Delete the run's metrics logged after ``after_step`` (a resumed attempt restarts from its checkpoint there,
    so the curves join without duplicates); returns how many rows went."""
    with session_scope() as s:
        return _rowcount(s.execute(delete(Metric).where(Metric.run_id == run_id, Metric.step > after_step)))


def get_metrics(run_ids: Sequence[str], keys: Sequence[str] | None = None):
    """Metrics of several runs as a pandas DataFrame (run_id, step, key, value), ordered by step."""
    import pandas as pd

    q = select(Metric.run_id, Metric.step, Metric.key, Metric.value).where(Metric.run_id.in_(list(run_ids)))
    if keys:
        q = q.where(Metric.key.in_(list(keys)))
    q = q.order_by(Metric.run_id, Metric.key, Metric.step, Metric.id)
    with get_engine().connect() as conn:
        rows = conn.execute(q).all()
    return pd.DataFrame(rows, columns=["run_id", "step", "key", "value"])


def latest_metrics(run_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """The last value of each key for each run (for tables)."""
    df = get_metrics(run_ids)
    out: dict[str, dict[str, float]] = {rid: {} for rid in run_ids}
    if not df.empty:
        last = df.groupby(["run_id", "key"]).tail(1)
        for rid, key, value in zip(last.run_id, last.key, last.value):
            out[rid][key] = value
    return out


# --- artifacts -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file (``hashlib.file_digest`` reads it in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def add_artifact(run_id: str, kind: str, path: str | Path) -> dict[str, Any]:
    """Record a file written for a run (replacing an earlier artifact of the same kind and path)."""
    path = Path(path).resolve()
    row = {"run_id": run_id, "kind": kind, "path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    with session_scope() as s:
        s.execute(delete(Artifact).where(Artifact.run_id == run_id, Artifact.path == str(path)))
        s.add(Artifact(**row, created_at=utcnow()))
    return row


def list_artifacts(run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    with session_scope() as s:
        q = select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.created_at, Artifact.id)
        if kind:
            q = q.where(Artifact.kind == kind)
        return [
            {"kind": a.kind, "path": a.path, "sha256": a.sha256, "bytes": a.bytes, "created_at": a.created_at}
            for a in s.scalars(q)
        ]


def ping() -> bool:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT 1")).scalar() == 1
