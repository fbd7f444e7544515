"""SQLAlchemy 2 ORM: experiments, studies, runs, metrics, artifacts (history: the revisions in db/migrations)."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


# The life of a run, in one place. Every status change is one conditional UPDATE (db.store.transition) from
# a status listed here to one it may reach, so two writers can never both win.
#
#   queued ──> running(attempt k) ──> succeeded | failed | cancelled | stopped (a study's scheduler ended it early)
#                 │ no heartbeat for LOST_AFTER_S, or its Ray job ended without a word
#                 └──> lost ──> queued (attempt k+1, the keeper's retry; resumes from the last checkpoint)
#                           ├─> running (the same attempt was only stalled and heartbeats again)
#                           ├─> succeeded | failed (the same attempt finishes after all; no other attempt owns it)
#                           └─> failed (retries used up) | cancelled
#   failed | cancelled | stopped | lost ──> queued (attempt k+1: the user's resume)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("running", "failed", "cancelled", "lost"),
    "running": ("succeeded", "failed", "cancelled", "stopped", "lost"),
    "lost": ("queued", "running", "succeeded", "failed", "cancelled", "stopped"),
    "failed": ("queued",),
    "cancelled": ("queued",),
    "stopped": ("queued",),
    "succeeded": (),
}
STATUSES = tuple(TRANSITIONS)
ACTIVE_STATUSES = ("queued", "running")  # a worker is (or will be) on it
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "stopped")
RESUMABLE_STATUSES = tuple(s for s, nxt in TRANSITIONS.items() if "queued" in nxt)  # lost, failed, cancelled
HEARTBEAT_S = 5.0  # a live attempt writes its heartbeat this often (from a thread, whatever the loop is doing)
LOST_AFTER_S = 20.0  # a running attempt whose heartbeat is older than this is lost


def sources_of(status: str) -> tuple[str, ...]:
    """The statuses from which a run may move to ``status``."""
    return tuple(s for s, nxt in TRANSITIONS.items() if status in nxt)


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    runs: Mapped[list[Run]] = relationship(back_populates="experiment")


# A study: one search (a space of RunSpec fields, a search algorithm, a scheduler) whose trials are runs.
STUDY_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)  # the validated StudySpec, its base RunSpec inlined
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    n_trials: Mapped[int] = mapped_column(Integer)  # how many trials the search will run
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    name: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(300))
    dataset: Mapped[str] = mapped_column(String(300))
    method: Mapped[str] = mapped_column(String(64), index=True)
    seed: Mapped[int] = mapped_column(Integer)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    spec: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    executor: Mapped[str] = mapped_column(String(16), default="ray")  # ray | inline | import | merge
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # 1-based; +1 per retry/resume
    owner: Mapped[str | None] = mapped_column(String(200))  # the live attempt's process: host:pid (node)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(100))
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    total_params: Mapped[int | None] = mapped_column(BigInteger)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    study_id: Mapped[str | None] = mapped_column(String(64), index=True)  # studies.id for a study's trials
    trial_params: Mapped[dict | None] = mapped_column(JSON)  # the searched fields' values, by dotted path
    node_id: Mapped[str | None] = mapped_column(String(64))  # the Ray node of the live attempt

    experiment: Mapped[Experiment] = relationship(back_populates="runs")
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    # 64-bit: a busy lab logs billions of rows. On SQLite an INTEGER primary key is the 64-bit rowid already (and
    # only INTEGER, not BIGINT, makes it the rowid that numbers new rows), so SQLite keeps INTEGER (revision 0004).
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_metrics_run_key_step", "run_id", "key", "step"),)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    run: Mapped[Run] = relationship(back_populates="artifacts")


class MergeSource(Base):
    """One source of a merged run (executor ``merge``): a run's kept checkpoint (``step``) or its final adapter
    (``step`` null), with the loss or step its weight was computed from and the weight (db/merges.py)."""

    __tablename__ = "merge_sources"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)  # the merged run
    position: Mapped[int] = mapped_column(Integer)
    source_run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    weight: Mapped[float] = mapped_column(Float)
