"""Merging as a job: ``python -m jobs.merge --run-id ID``, the entrypoint of a merged run.

``submit_merge(run_ids, settings)`` checks the sources, records a queued run (executor ``merge``) linked to them
(``db.merges``), and hands it to Ray when a cluster answers (the local head, or ``RAY_ADDRESS``), else runs it in
this process. One run id merges that run's kept checkpoints (``train.keep_checkpoints``); several merge their final
adapters, which must come from one method on one base model and dataset. The job loads the sources through the
artifact layer, merges them (``engine.adapter_merge``: low-rank layers by ΔW, re-factorised), evaluates the result
on the sources' held-out split and stores it as the run's adapter, so the merged run is analysed and exported like
any run. It heartbeats and obeys the run row through the worker's watchdog, and ends with one status and its reason.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from db import config, merges, store
from engine.adapter_merge import (
    MergeError,
    MergeSettings,
    evaluate_merged,
    merge_adapters,
    merge_weights,
    write_adapter,
)
from engine.artifacts import read_adapter, run_trusts_remote_code
from engine.errors import UserError
from engine.spec import NAME_MAX_CHARS, parse_spec
from engine.train import pick_device
from engine.trajectory import checkpoint_dir, read_trajectory
from jobs import cluster
from jobs.analysis import trained_run
from jobs.worker import DBReporter, Watchdog, _ray_head


@dataclass
class Source:
    """One adapter to merge: a run's kept checkpoint (``step`` of it) or its final adapter."""

    run_id: str
    step: int
    loss: float
    eval_loss: float | None
    eval_accuracy: float | None
    directory: str
    final: bool  # the run's final adapter (several runs merged), not one of its kept checkpoints

    def row(self, weight: float) -> dict[str, Any]:
        return {"source_run_id": self.run_id, "step": None if self.final else self.step, "loss": self.loss,
                "weight": weight}  # fmt: skip


def _final_loss(run: dict[str, Any], run_dir: Path) -> float:
    """The training loss of a run's final adapter: its last kept checkpoint's average, else its last logged one."""
    kept = read_trajectory(run_dir)
    if kept:
        return kept[-1].train_loss
    losses = store.get_metrics([run["id"]], ["train_loss"])
    if losses.empty:
        raise MergeError(f"run {run['id']} logged no training loss: MWA by loss cannot weigh it; use --metric step")
    return float(losses["value"].iloc[-1])


def plan_sources(run_ids: list[str]) -> tuple[list[Source], dict[str, Any]]:
    """The adapters to merge and the spec of the first run (the merged run's spec and evaluation split).

    One run: its kept checkpoints. Several: their final adapters, refused unless they share method, base model and
    dataset (the merged run is evaluated on their one split)."""
    run_ids = list(dict.fromkeys(run_ids))
    if not run_ids:
        raise MergeError("nothing to merge: give a run id (its kept checkpoints) or several (their final adapters)")
    runs = [trained_run(run_id) for run_id in run_ids]  # each exists and has an adapter, or a one-line error
    if len(runs) == 1:
        run, directory = runs[0]
        kept = read_trajectory(directory)
        if not kept:
            raise MergeError(
                f"run {run['id']} kept no checkpoints: train with train.keep_checkpoints K (or "
                "train.checkpoint_every N), or merge the final adapters of several runs"
            )
        sources = [Source(run["id"], c.step, c.train_loss, c.eval_loss, c.eval_accuracy,
                          str(checkpoint_dir(directory, c)), final=False) for c in kept]  # fmt: skip
        return sources, run["spec"]
    first = runs[0][0]
    for run, _ in runs[1:]:
        for what, key in (("method", "method"), ("base model", "model")):
            if run[key] != first[key]:
                raise MergeError(
                    f"run {run['id']} has {what} {run[key]} but run {first['id']} has {first[key]}: merge runs of one "
                    "method and base model"
                )
        if run["spec"]["dataset"] != first["spec"]["dataset"]:
            raise MergeError(
                f"run {run['id']} was trained on other data (dataset settings) than run {first['id']}: merge runs of "
                "one dataset, so the merge is evaluated on their common split"
            )
    sources = []
    for run, directory in runs:
        metrics = (run["summary"] or {}).get("final_metrics", {})
        steps = int((run["summary"] or {}).get("steps") or 0)
        sources.append(Source(run["id"], steps, _final_loss(run, directory), metrics.get("eval_loss"),
                              metrics.get("eval_accuracy"), str(directory), final=True))  # fmt: skip
    return sources, first["spec"]


def source_values(sources: list[Source], settings: MergeSettings) -> list[float]:
    """What MWA's weights are computed from: each source's training loss, or its step."""
    return [float(s.loss if settings.metric == "loss" else s.step) for s in sources]


def preview(run_ids: list[str], settings: MergeSettings) -> list[dict[str, Any]]:
    """The sources and the weights a merge would give them, without merging (the Merge page's bar chart)."""
    sources, _ = plan_sources(run_ids)
    weights = merge_weights(source_values(sources, settings), settings)
    return [asdict(s) | {"weight": w} for s, w in zip(sources, weights, strict=True)]


def _merged_spec(spec: dict[str, Any], settings: MergeSettings, run_ids: list[str]) -> dict[str, Any]:
    what = run_ids[0] if len(run_ids) == 1 else f"{len(run_ids)} runs"
    name = f"{settings.label()} of {what}"[:NAME_MAX_CHARS]
    return spec | {"name": name, "tags": list(dict.fromkeys([*spec.get("tags", []), "merge"]))}


def cluster_is_up() -> bool:
    """Whether a Ray cluster answers where the CLI submits runs (the local head, or ``RAY_ADDRESS``)."""
    try:
        cluster.job_client().list_jobs()
    except Exception:  # noqa: BLE001 - down, not started, or unreachable: merge in this process
        return False
    return True


def submit_merge(run_ids: list[str], settings: MergeSettings, *, inline: bool | None = None) -> str:
    """Check the sources, record the merged run (queued, linked to its sources) and start its job: on Ray when a
    cluster answers (``inline=None``), else (or with ``inline=True``) in this process. Returns the run id."""
    sources, spec = plan_sources(run_ids)
    weights = merge_weights(source_values(sources, settings), settings)
    spec = parse_spec(_merged_spec(spec, settings, run_ids)).model_dump(mode="json")
    run_id = store.create_run(spec, executor="merge")
    store.update_run(run_id, summary={"merge": {"settings": settings.model_dump(mode="json")}})
    merges.record_sources(run_id, [s.row(w) for s, w in zip(sources, weights, strict=True)])
    if inline is None:
        inline = not cluster_is_up()
    if inline:
        execute_merge(run_id, echo=False)
        return run_id
    from jobs.runs import runtime_env, submit_job, worker_python

    resources = parse_spec(spec).resources
    try:
        submit_job(
            entrypoint=f"exec {worker_python()} -m jobs.merge --run-id {run_id}",
            submission_id=run_id,
            entrypoint_num_cpus=resources.num_cpus,
            entrypoint_num_gpus=resources.num_gpus,
            runtime_env=runtime_env(threads=resources.num_cpus),
            metadata={"peftlab_run_id": run_id, "peftlab_merge": settings.method},
        )
    except Exception as err:  # noqa: BLE001 - whatever Ray says, keep the run and say why it failed
        store.finish_run(run_id, "failed", error=f"submission to Ray failed: {err}")
        raise
    return run_id


def _merge(run: dict[str, Any], reporter: DBReporter) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the recorded sources of ``run``, evaluate, store; returns the summary and the artifacts."""
    t0 = time.perf_counter()
    settings = MergeSettings.model_validate(((run["summary"] or {}).get("merge") or {}).get("settings") or {})
    rows = merges.sources_of(run["id"])
    run_ids = list(dict.fromkeys(r["run_id"] for r in rows))
    sources, spec = plan_sources(run_ids)
    if len(sources) != len(rows):
        raise MergeError(f"the sources of {run['id']} changed since it was queued: merge again")
    reporter.log(f"merging {len(sources)} adapters of {', '.join(run_ids)}: {settings.label()}")
    adapters = [read_adapter(s.directory) for s in sources]
    labels = [f"run {s.run_id}" + ("" if s.final else f" step {s.step}") for s in sources]
    trust = run_trusts_remote_code(store.get_run(run_ids[0]) or {})
    merged = merge_adapters(adapters, source_values(sources, settings), settings, labels=labels,
                            trust_remote_code=trust)  # fmt: skip
    reporter.set_progress(0.5)  # merged; the evaluation is the other half
    for layer, error in merged.refactorisation_errors.items():
        reporter.log(f"{layer}: re-factorisation relative error {error:.3e}")
    metrics = evaluate_merged(merged, spec)
    reporter.log(f"merged: {metrics}")
    out_dir = config.run_dir(run["id"])
    weights_path, config_path = write_adapter(merged.meta, merged.tensors, out_dir)
    checkpoints = [
        {"run_id": s.run_id, "step": s.step, "loss": s.loss, "weight": w, "eval_loss": s.eval_loss,
         "eval_accuracy": s.eval_accuracy, "final": s.final}
        for s, w in zip(sources, merged.weights, strict=True)
    ]  # fmt: skip
    summary = {
        "final_metrics": metrics,
        "steps": max(s.step for s in sources),
        "merge": {
            "settings": settings.model_dump(mode="json"),
            "label": settings.label(),
            "checkpoints": checkpoints,
            "refactorisation_errors": merged.refactorisation_errors,
            "max_refactorisation_error": merged.max_refactorisation_error,
        },
        "timings": {"total_s": time.perf_counter() - t0},
    }
    return summary, {"adapter": str(weights_path), "adapter_config": str(config_path)}


def execute_merge(
    run_id: str, *, attempt: int | None = None, echo: bool = True, parent_pid: int | None = None
) -> dict[str, Any]:
    """Run the merge job of a queued merged run; returns the run row at its end. As a Ray job, ``parent_pid`` is its
    supervisor's: the watchdog stops the merge when that process goes."""
    run = store.get_run(run_id)
    if run is None or run["executor"] != "merge":
        raise UserError(f"no merged run {run_id} in the database at {config.db_location()}: see python -m app.cli ls")
    attempt = attempt or run["attempt"]
    log_path = config.run_dir(run_id) / "worker.log"
    reporter = DBReporter(run_id, attempt, log_path, echo=echo)
    spec = parse_spec(run["spec"])
    device = pick_device(spec.train.device)
    if not store.claim(run_id, attempt, store.owner_id(), f"{device.type} @ {socket.gethostname()}"):
        reporter.log(f"merge not started: the run is {(store.get_run(run_id) or {}).get('status')}")
        reporter.close()
        return store.get_run(run_id) or run
    watchdog = Watchdog(run_id, attempt, reporter.log, parent_pid=parent_pid, head=_ray_head())
    reporter.watchdog = watchdog
    watchdog.start()
    try:
        summary, artifacts = _merge(run, reporter)
        if watchdog.stop_reason is None:
            for kind, path in artifacts.items():
                store.add_artifact(run_id, kind, path)
            first = store.get_run(summary["merge"]["checkpoints"][0]["run_id"]) or {}
            store.update_run(run_id, trainable_params=first.get("trainable_params"),
                             total_params=first.get("total_params"), device=str(device))  # fmt: skip
        if store.finish_run(run_id, "succeeded", summary=summary, attempt=attempt):
            reporter.log("succeeded")
        else:
            reporter.log(f"finished, but the run is no longer this merge's: {watchdog.stop_reason}")
    except BaseException as err:  # noqa: BLE001 - record every failure with its reason, then let a bug surface
        reporter.log(traceback.format_exc())
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        store.finish_run(run_id, "failed", error=message, attempt=attempt)
        if not isinstance(err, Exception):
            raise
    finally:
        watchdog.close()
        if log_path.exists():
            store.add_artifact(run_id, "log", log_path)
        reporter.close()
    return store.get_run(run_id) or run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True, help="the merged run (recorded by submit_merge)")
    args = parser.parse_args(argv)
    try:
        final = execute_merge(args.run_id, parent_pid=os.getppid())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if final["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
