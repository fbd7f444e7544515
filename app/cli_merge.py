"""``python -m app.cli merge RUN_ID [RUN_ID ...]``: merge a run's kept checkpoints, or several runs' final adapters,
into a new run (executor ``merge``; see jobs/merge.py and docs/METHODS.md, "Merging").

python -m app.cli merge RUN_ID --method mwa --metric loss --p 2 --json     the kept checkpoints of one run
python -m app.cli merge RUN_A RUN_B RUN_C --method ties --density 0.2      the final adapters of several runs

The merge runs as a job (on Ray when a cluster answers, else in this process); the command waits for it. With
``--json`` the last line is ``{"run_id", "status", "error", "final_metrics", "checkpoints": [{run_id, step, loss,
weight}], "max_refactorisation_error"}``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from engine.adapter_merge import MERGE_METHODS

FINAL = ("succeeded", "failed", "cancelled", "stopped", "lost")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge a run's kept checkpoints, or several runs' final adapters, into a new run")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="one run (its kept checkpoints) or several runs")
    p.add_argument("--method", choices=MERGE_METHODS, default="mwa", help="mwa (default), uniform, linear, ties, dare")
    p.add_argument("--metric", choices=("loss", "step"), default="loss", help="MWA's merit: 1/training loss or step")
    p.add_argument("--p", type=float, help="MWA's exponent (default 1 for mwa, 0 for linear, ties, dare)")
    p.add_argument("--weights", type=float, nargs="+", help="linear, ties, dare: explicit weights, one per source")
    p.add_argument("--density", type=float, default=0.2, help="ties: share of each tensor kept (default 0.2)")
    p.add_argument("--drop", type=float, default=0.9, help="dare: drop probability (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks")
    p.add_argument("--inline", action="store_true", help="merge in this process even when a Ray cluster is up")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=cmd_merge)


def merge_result(run: dict[str, Any]) -> dict[str, Any]:
    """The merged run as the command's JSON: its id, status, metrics and the weighted sources."""
    merge = (run.get("summary") or {}).get("merge") or {}
    checkpoints = [
        {"run_id": c["run_id"], "step": c["step"], "loss": c["loss"], "weight": c["weight"]}
        for c in merge.get("checkpoints", [])
    ]
    if not checkpoints:  # not finished: the recorded links still give the sources and their weights
        from db import merges

        checkpoints = merges.sources_of(run["id"])
    return {
        "run_id": run["id"],
        "status": run["status"],
        "error": run["error"],
        "method": merge.get("label"),
        "final_metrics": (run.get("summary") or {}).get("final_metrics", {}),
        "checkpoints": checkpoints,
        "max_refactorisation_error": merge.get("max_refactorisation_error"),
    }


def cmd_merge(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from db import store
    from engine.adapter_merge import MergeError, MergeSettings
    from jobs.merge import submit_merge

    try:
        settings = MergeSettings(method=args.method, metric=args.metric, p=args.p, weights=args.weights,
                                 density=args.density, drop_prob=args.drop, seed=args.seed)  # fmt: skip
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise MergeError(f"--{field}: {first['msg'].removeprefix('Value error, ')}") from None
    run_id = submit_merge(args.run_ids, settings, inline=True if args.inline else None)
    if not args.json:
        print(f"{run_id}: merging {settings.label()}", flush=True)
    while (run := store.get_run(run_id)) is not None and run["status"] not in FINAL:
        time.sleep(0.5)
    assert run is not None
    result = merge_result(run)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for c in result["checkpoints"]:
            where = f"step {c['step']}" if c["step"] is not None else "final"
            print(f"  {c['run_id']} {where}: loss {c['loss']:.4f}, weight {c['weight']:.4f}")
        shown = result["final_metrics"] or result["error"]
        print(f"{run_id} {run['status']} {shown}")
        if result["max_refactorisation_error"]:
            print(f"largest re-factorisation error (relative, Frobenius): {result['max_refactorisation_error']:.3e}")
    return 0 if run["status"] == "succeeded" else 1
