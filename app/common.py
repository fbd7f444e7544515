"""Helpers shared by the pages: database and cluster status, run labels, and forms built from configs."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Any

import streamlit as st
from pydantic import BaseModel

from db import schema, store

STATUS_ICONS = {  # Streamlit's Material icons: they render without an emoji font
    "queued": ":material/schedule:",
    "running": ":material/play_circle:",
    "succeeded": ":material/check_circle:",
    "failed": ":material/error:",
    "cancelled": ":material/block:",
    "stopped": ":material/content_cut:",
    "lost": ":material/help:",
}


def resume_button(run: dict, key: str) -> None:
    """A Resume button for a failed, lost or cancelled run: its next attempt continues from the last checkpoint."""
    from db.schema import RESUMABLE_STATUSES
    from engine.errors import UserError

    if run["status"] not in RESUMABLE_STATUSES:
        return
    if st.button("Resume", key=key, help="Queue the next attempt; it continues from the run's last checkpoint"):
        from jobs.runs import resume_run

        try:
            attempt = resume_run(run["id"])
        except UserError as err:
            st.error(str(err))
        else:
            st.toast(f"{run['id']}: attempt {attempt} queued")


def run_label(run: dict) -> str:
    name = run.get("name") or run["method"]
    return f"{run['id']} · {name} · seed {run['seed']} · {run['status']}"


def elapsed_s(run: dict) -> float | None:
    if not run.get("started_at"):
        return None
    end = run.get("finished_at") or schema.utcnow()
    return (end - run["started_at"]).total_seconds()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def final_accuracy(run: dict) -> float | None:
    return ((run.get("summary") or {}).get("final_metrics") or {}).get("eval_accuracy")


def cluster_status() -> tuple[bool, str]:
    """(reachable, address or reason) of the Ray cluster runs are submitted to."""
    from jobs import cluster

    try:
        address = cluster.dashboard_address()
        cluster.job_client()
        return True, address
    except Exception as err:  # noqa: BLE001 - shown to the user as is
        return False, str(err)


def selected_run_id(runs: list[dict], key: str = "run") -> str | None:
    """A run chosen in a selectbox, defaulting to the ``?run=`` query parameter."""
    if not runs:
        return None
    ids = [r["id"] for r in runs]
    wanted = st.query_params.get("run")
    index = ids.index(wanted) if wanted in ids else 0
    labels = {r["id"]: run_label(r) for r in runs}
    run_id = st.selectbox("Run", ids, index=index, format_func=labels.get, key=key)
    if run_id != wanted:
        st.query_params["run"] = run_id
    return run_id


# --- forms from pydantic configs -----------------------------------------------------------------


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def config_form(config_cls: type[BaseModel], key_prefix: str, initial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Widgets for every field of a method's config (defaults and help from the config, or from ``initial``, e.g. a
    cloned run's parameters); returns the values."""
    start = dict(initial or {})
    from engine.models import ROLES

    values: dict[str, Any] = {}
    for name, field in config_cls.model_fields.items():
        ann, optional = _unwrap_optional(field.annotation)
        default = start[name] if name in start else field.get_default(call_default_factory=True)
        label, help_, key = name.replace("_", " "), field.description, f"{key_prefix}.{name}"
        origin = typing.get_origin(ann)
        if ann is bool:
            values[name] = st.checkbox(label, value=bool(default), help=help_, key=key)
        elif origin is typing.Literal:
            options = list(typing.get_args(ann))
            values[name] = st.selectbox(label, options, index=options.index(default), help=help_, key=key)
        elif name == "target_roles" or (
            origin is list and typing.get_args(ann) == (str,) and set(default or []) <= set(ROLES)
        ):
            values[name] = st.multiselect(label, list(ROLES), default=default, help=help_, key=key)
        elif ann is int and not optional:
            values[name] = int(st.number_input(label, value=int(default), step=1, help=help_, key=key))
        elif ann is float and not optional:
            values[name] = float(st.number_input(label, value=float(default), format="%.6g", help=help_, key=key))
        else:  # optional numbers, lists, strings: typed as text, parsed by the config
            text = st.text_input(label, value="" if default is None else _to_text(default), help=help_, key=key)
            values[name] = _from_text(text, ann, optional)
    return values


def _to_text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _from_text(text: str, ann, optional: bool) -> Any:
    text = text.strip()
    if text == "" and optional:
        return None
    if typing.get_origin(ann) is list:
        item = (typing.get_args(ann) or (str,))[0]
        return [item(t.strip()) if item in (int, float) else t.strip() for t in text.split(",") if t.strip()]
    return text


def parse_seeds(text: str) -> list[int]:
    """'0, 1, 2' or '0-4' -> a list of seeds."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"train.seeds: {part!r} is not a seed; write e.g. '0' or '0, 1, 2' or '0-4'") from None
    if not seeds:
        raise ValueError("train.seeds: give at least one seed, e.g. '0' or '0, 1, 2' or '0-4'")
    return seeds


def now() -> datetime:
    return schema.utcnow()


__all__ = ["store"]
