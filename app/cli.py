"""The command line, on the same RunSpec as the dashboard.

    python -m app.cli run SPEC.yaml [--json]     train in this process (no Ray)
    python -m app.cli submit SPEC.yaml [--seeds 0 1 2]   submit to Ray (local head or RAY_ADDRESS)
    python -m app.cli ls | show ID | cancel ID | logs ID | methods | models | datasets
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from db import store
from engine.spec import SpecError, load_spec


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _run_result(run: dict) -> dict:
    summary = run.get("summary") or {}
    return {
        "run_id": run["id"],
        "status": run["status"],
        "error": run["error"],
        "final_metrics": summary.get("final_metrics", {}),
        "majority_rate": summary.get("majority_rate"),
        "trainable_params": run["trainable_params"],
        "total_params": run["total_params"],
        "timings": summary.get("timings", {}),
        "artifacts": {a["kind"]: a["path"] for a in store.list_artifacts(run["id"])},
    }


def cmd_run(args) -> int:
    from jobs.worker import execute

    spec = load_spec(args.spec)
    for seed in args.seeds or [spec.train.seed]:
        run_id = store.create_run(spec.with_seed(seed).model_dump(mode="json"), executor="inline")
        final = execute(run_id, echo=not args.json)
        if args.json:
            _print_json(_run_result(final))
        else:
            print(f"{run_id} {final['status']} {final['summary'].get('final_metrics', {}) or final['error']}")
        if final["status"] != "succeeded":
            return 1
    return 0


def cmd_submit(args) -> int:
    from jobs.runs import submit_seeds

    spec = load_spec(args.spec)
    for run_id in submit_seeds(spec, args.seeds or [spec.train.seed]):
        print(run_id)
    return 0


def cmd_ls(args) -> int:
    from jobs.runs import reconcile

    reconcile()
    runs = store.list_runs(limit=args.limit)
    if args.json:
        _print_json([{k: r[k] for k in ("id", "status", "method", "model", "dataset", "seed", "progress")} for r in runs])
        return 0
    print(f"{'run id':<30} {'status':<10} {'method':<13} {'model':<14} {'dataset':<17} seed  progress  accuracy")
    for r in runs:
        acc = (r["summary"] or {}).get("final_metrics", {}).get("eval_accuracy")
        print(f"{r['id']:<30} {r['status']:<10} {r['method']:<13} {r['model'][:14]:<14} {r['dataset'][:17]:<17} "
              f"{r['seed']:<5} {r['progress']:>7.0%}  {'' if acc is None else f'{acc:.4f}'}")  # fmt: skip
    return 0


def cmd_show(args) -> int:
    run = store.get_run(args.run_id)
    if run is None:
        print(f"no run {args.run_id}", file=sys.stderr)
        return 1
    _print_json(_run_result(run) | {"spec": run["spec"], "device": run["device"], "created_at": run["created_at"],
                                    "started_at": run["started_at"], "finished_at": run["finished_at"]})  # fmt: skip
    return 0


def cmd_cancel(args) -> int:
    from jobs.runs import cancel_run

    print("cancelled" if cancel_run(args.run_id) else "already finished")
    return 0


def cmd_logs(args) -> int:
    from jobs.runs import job_logs

    print(job_logs(args.run_id, tail=args.tail))
    return 0


def cmd_methods(_args) -> int:
    from engine.methods import method_names

    print("\n".join(method_names()))
    return 0


def cmd_models(_args) -> int:
    from engine.models import BUNDLED

    for name, text in BUNDLED.items():
        print(f"{name:<14} {text}")
    return 0


def cmd_datasets(_args) -> int:
    from engine.data import BUNDLED

    for name, text in BUNDLED.items():
        print(f"{name:<18} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="PEFT Lab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a RunSpec in this process (no Ray)")
    p.add_argument("spec")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--json", action="store_true", help="print one JSON object per run on the last line")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("submit", help="submit a RunSpec to Ray (one run per seed)")
    p.add_argument("spec")
    p.add_argument("--seeds", type=int, nargs="+")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("ls", help="list runs")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    for name, func, helptext in (("show", cmd_show, "a run as JSON"), ("cancel", cmd_cancel, "cancel a run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_id")
        p.set_defaults(func=func)
    p = sub.add_parser("logs", help="the tail of a run's log")
    p.add_argument("run_id")
    p.add_argument("--tail", type=int, default=100)
    p.set_defaults(func=cmd_logs)
    sub.add_parser("methods", help="registered method names").set_defaults(func=cmd_methods)
    sub.add_parser("models", help="bundled model aliases").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="bundled datasets").set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
