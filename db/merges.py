"""Merged runs in the database: the ``merge_sources`` rows that link a merged run (executor ``merge``) to the runs and
kept checkpoints it was merged from, with each one's loss (or step) and weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from db.schema import MergeSource, Run
from db.store import expire_stale, run_to_dict, session_scope

SOURCE_FIELDS = ("source_run_id", "step", "loss", "weight")


def record_sources(run_id: str, sources: Sequence[dict[str, Any]]) -> None:
    """Link ``run_id`` to its sources, in order; each a dict with ``source_run_id``, ``step`` (None: the final
    adapter), ``loss`` and ``weight``."""
    with session_scope() as s:
        for position, source in enumerate(sources):
            s.add(MergeSource(run_id=run_id, position=position, **{k: source[k] for k in SOURCE_FIELDS}))


def sources_of(run_id: str) -> list[dict[str, Any]]:
    """The sources of a merged run, in order (empty for any other run)."""
    with session_scope() as s:
        rows = s.scalars(select(MergeSource).where(MergeSource.run_id == run_id).order_by(MergeSource.position))
        return [{"run_id": r.source_run_id, "step": r.step, "loss": r.loss, "weight": r.weight} for r in rows]


def merges_of(source_run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The merged runs made from exactly these source runs (as a set), oldest first, each with its ``sources``."""
    expire_stale()
    wanted = set(source_run_ids)
    with session_scope() as s:
        candidates = s.scalars(
            select(Run).where(Run.id.in_(select(MergeSource.run_id).where(MergeSource.source_run_id.in_(wanted))))
            .order_by(Run.created_at)
        )  # fmt: skip
        runs = [run_to_dict(r) for r in candidates]
    out = []
    for run in runs:
        sources = sources_of(run["id"])
        if {src["run_id"] for src in sources} == wanted:
            out.append(run | {"sources": sources})
    return out
