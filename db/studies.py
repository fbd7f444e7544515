"""Studies in the database: the study rows and the queries over their trials (which are runs, in db.store).

A study's status is the search's: queued (submitted), running (its driver runs the search), then succeeded (every
trial reached a final status), failed (the driver failed) or cancelled. Each change is one conditional UPDATE, as
for runs.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import inspect, select, update

from db.schema import Run, Study, utcnow
from db.store import _rowcount, expire_stale, run_to_dict, session_scope, without_nul

STUDY_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("running", "failed", "cancelled"),
    "running": ("succeeded", "failed", "cancelled"),
    "succeeded": (),
    "failed": (),
    "cancelled": (),
}


def new_study_id() -> str:
    return f"study-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def trial_id(study_id: str, index: int) -> str:
    """The run id of a study's trial ``index`` (0-based): the study id and the trial's number."""
    return f"{study_id}-t{index:03d}"


def create_study(spec: dict[str, Any], n_trials: int, *, study_id: str | None = None) -> str:
    study_id = study_id or new_study_id()
    with session_scope() as s:
        name = without_nul({"name": spec.get("name", "study")})["name"]
        s.add(Study(id=study_id, name=name, spec=spec, status="queued", n_trials=n_trials, created_at=utcnow()))
    return study_id


def _to_dict(study: Study) -> dict[str, Any]:
    return {c.key: getattr(study, c.key) for c in inspect(Study).mapper.column_attrs}


def get_study(study_id: str) -> dict[str, Any] | None:
    with session_scope() as s:
        study = s.get(Study, study_id)
        return _to_dict(study) if study else None


def list_studies(limit: int | None = 200) -> list[dict[str, Any]]:
    """Studies, newest first, each with ``counts``: its trials per run status."""
    expire_stale()
    with session_scope() as s:
        q = select(Study).order_by(Study.created_at.desc(), Study.id.desc())  # the id breaks ties everywhere
        studies = [_to_dict(st) for st in s.scalars(q.limit(limit) if limit else q)]
        rows = s.execute(select(Run.study_id, Run.status).where(Run.study_id.in_([st["id"] for st in studies])))
        counts: dict[str, Counter] = {st["id"]: Counter() for st in studies}
        for study_id, status in rows:
            if study_id is not None:
                counts[study_id][status] += 1
    return [st | {"counts": dict(counts[st["id"]])} for st in studies]


def set_study_status(study_id: str, to: str, *, only_from: Iterable[str] | None = None, **fields: Any) -> bool:
    """Move a study to ``to`` in one conditional UPDATE (``STUDY_TRANSITIONS``); True if it moved."""
    if to not in STUDY_TRANSITIONS:
        raise ValueError(f"unknown study status {to!r}")
    allowed = [s for s, nxt in STUDY_TRANSITIONS.items() if to in nxt and (only_from is None or s in set(only_from))]
    if to in ("succeeded", "failed", "cancelled"):
        fields.setdefault("finished_at", utcnow())
    if to == "running":
        fields.setdefault("started_at", utcnow())
    with session_scope() as s:
        stmt = (
            update(Study)
            .where(Study.id == study_id, Study.status.in_(allowed))
            .values(status=to, **without_nul(fields))
        )
        return _rowcount(s.execute(stmt)) > 0


def trial_runs(study_id: str) -> list[dict[str, Any]]:
    """The study's trials (runs), in trial order."""
    expire_stale()
    with session_scope() as s:
        return [run_to_dict(r) for r in s.scalars(select(Run).where(Run.study_id == study_id).order_by(Run.id))]
