"""Database access: engine creation, versioned schema, and every query the app, CLI and workers use.

Pages, the CLI and the worker never write SQL themselves; they call these functions.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, insert, inspect, make_url, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from db import config
from db.schema import ACTIVE_STATUSES, Artifact, Base, Experiment, Metric, Run, SchemaVersion, utcnow

# --- engine and schema ---------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (UI reads while workers log)
    cur.execute("PRAGMA busy_timeout=30000")  # several workers write: wait instead of failing
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; much faster commits
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _migration_1(conn) -> None:
    Base.metadata.create_all(conn)


# Versioned schema: append a function for each change; never edit one that has shipped.
MIGRATIONS = [_migration_1]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(engine: Engine) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    with engine.begin() as conn:
        if not inspect(conn).has_table("schema_version"):
            SchemaVersion.__table__.create(conn)
        current = conn.execute(select(func.max(SchemaVersion.version))).scalar() or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {current} is newer than this code ({SCHEMA_VERSION}): update PEFT Lab"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(insert(SchemaVersion).values(version=version, applied_at=utcnow()))
    return current


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    url = url or config.db_url()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    migrate(engine)
    return engine


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


# --- runs ----------------------------------------------------------------------------------------


def new_run_id() -> str:
    return f"run-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _experiment_id(session: Session, name: str) -> int:
    exp_id = session.scalar(select(Experiment.id).where(Experiment.name == name))
    if exp_id is None:
        exp = Experiment(name=name)
        session.add(exp)
        session.flush()
        exp_id = exp.id
    return exp_id


def create_run(
    spec: dict[str, Any], *, executor: str = "ray", run_id: str | None = None, status: str = "queued"
) -> str:
    """Insert a run row for a validated RunSpec (as a JSON-able dict) and return its id."""
    run_id = run_id or new_run_id()
    with session_scope() as s:
        s.add(
            Run(
                id=run_id,
                experiment_id=_experiment_id(s, spec.get("experiment", "default")),
                name=spec.get("name"),
                model=spec["model"],
                dataset=spec["dataset"]["name"],
                method=spec["method"]["name"],
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
    with session_scope() as s:
        run = s.get(Run, run_id)
        return run_to_dict(run) if run else None


def list_runs(
    *,
    status: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    experiment: str | None = None,
    limit: int | None = 500,
) -> list[dict[str, Any]]:
    with session_scope() as s:
        q = select(Run).order_by(Run.created_at.desc())
        if status:
            q = q.where(Run.status.in_(list(status)))
        if methods:
            q = q.where(Run.method.in_(list(methods)))
        if experiment:
            q = q.join(Experiment).where(Experiment.name == experiment)
        if limit:
            q = q.limit(limit)
        return [run_to_dict(r) for r in s.scalars(q)]


def update_run(run_id: str, *, only_if_status: Iterable[str] | None = None, **fields: Any) -> bool:
    """Update columns of a run; with ``only_if_status`` only while the run is in one of those states.

    The conditional form is what keeps final states final: a worker finishing after a cancel
    cannot turn ``cancelled`` back into ``succeeded``.
    """
    stmt = update(Run).where(Run.id == run_id).values(**fields)
    if only_if_status is not None:
        stmt = stmt.where(Run.status.in_(list(only_if_status)))
    with session_scope() as s:
        return s.execute(stmt).rowcount > 0


def mark_running(run_id: str, device: str) -> bool:
    now = utcnow()
    return update_run(
        run_id, only_if_status=("queued",), status="running", started_at=now, heartbeat_at=now, device=device
    )


def finish_run(run_id: str, status: str, *, error: str | None = None, summary: dict | None = None) -> bool:
    """Set a final status unless the run already has one (first final status wins)."""
    fields: dict[str, Any] = {"status": status, "finished_at": utcnow()}
    if error is not None:
        fields["error"] = error
    if summary is not None:
        fields["summary"] = summary
    if status == "succeeded":
        fields["progress"] = 1.0
    return update_run(run_id, only_if_status=ACTIVE_STATUSES, **fields)


def heartbeat(run_id: str, progress: float | None = None) -> None:
    fields: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        fields["progress"] = float(progress)
    update_run(run_id, only_if_status=ACTIVE_STATUSES, **fields)


def delete_run(run_id: str) -> None:
    with session_scope() as s:
        s.execute(delete(Metric).where(Metric.run_id == run_id))
        run = s.get(Run, run_id)
        if run:
            s.delete(run)


# --- metrics -------------------------------------------------------------------------------------


def log_metrics(run_id: str, rows: Iterable[tuple[int, str, float]]) -> int:
    """Insert (step, key, value) rows in one transaction (executemany); returns the count."""
    payload = [{"run_id": run_id, "step": int(st), "key": k, "value": float(v)} for st, k, v in rows]
    if payload:
        with session_scope() as s:
            s.execute(insert(Metric), payload)
    return len(payload)


def get_metrics(run_ids: Sequence[str], keys: Sequence[str] | None = None):
    """Metrics of several runs as a pandas DataFrame (run_id, step, key, value), ordered by step."""
    import pandas as pd

    q = select(Metric.run_id, Metric.step, Metric.key, Metric.value).where(Metric.run_id.in_(list(run_ids)))
    if keys:
        q = q.where(Metric.key.in_(list(keys)))
    q = q.order_by(Metric.run_id, Metric.key, Metric.step)
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        q = select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.created_at)
        if kind:
            q = q.where(Artifact.kind == kind)
        return [
            {"kind": a.kind, "path": a.path, "sha256": a.sha256, "bytes": a.bytes, "created_at": a.created_at}
            for a in s.scalars(q)
        ]


def ping() -> bool:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT 1")).scalar() == 1
