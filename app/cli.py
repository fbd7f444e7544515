"""The command line, on the same RunSpec as the dashboard.

python -m app.cli run [--config] SPEC.yaml [--train.lr 3e-4 ...] [--json]   train in this process (no Ray)
python -m app.cli submit [--config] SPEC.yaml [--method.rank 8 ...] [--seeds 0 1 2]   submit to Ray
    (the flags of run and submit are RunSpec's fields, generated in app/spec_args.py: run --help lists them)
python -m app.cli ls | show ID | cancel ID | resume ID | logs ID | methods | models | datasets
python -m app.cli summary [--json] | metrics ID [--json]   groups over seeds with 95 % CIs; a run's metric series
python -m app.cli report (--experiment NAME | --runs ID ...) --out report.html   a self-contained HTML report
python -m app.cli analyze ID --kind KIND [--json]   compute or reuse a stored analysis (kinds: analyze --help)
python -m app.cli export ID --format FORMAT --out DIR [--json]  write an adapter or merged model (export --help)
python -m app.cli import DIR [--name NAME]                                  record an exported adapter as a run
python -m app.cli study STUDY.yaml [--wait] [--json] | study ls | study show ID | study cancel ID   (app/cli_study.py)
python -m app.cli merge RUN_ID [RUN_ID ...] --method mwa|uniform|linear|ties|dare [--json]   (app/cli_merge.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.spec_args import SPEC_COMMANDS, spec_from_args
from db import config, store
from db.config import DatabaseError
from db.schema import RESUMABLE_STATUSES
from engine.errors import UserError


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
        "artifacts": [{k: a[k] for k in ("kind", "path", "sha256", "bytes")} for a in store.list_artifacts(run["id"])],
    }


def cmd_run(args) -> int:
    spec = args.spec
    from engine.preflight import check
    from jobs.worker import execute

    _warn(check(spec))  # model, dataset and method, before any run row exists (no cluster needed in-process)
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
    spec = args.spec
    from jobs.preflight import preflight
    from jobs.runs import submit_seeds

    _warn(preflight(spec))  # model, dataset, method and the cluster's nodes, before any run row exists
    for run_id in submit_seeds(spec, args.seeds or [spec.train.seed]):
        print(run_id)
    return 0


def cmd_ls(args) -> int:
    runs = store.list_runs(limit=args.limit)  # applies the liveness rule: a run without heartbeats shows lost
    if args.json:
        _print_json([{"run_id": r["id"]} | {k: r[k] for k in ("status", "attempt", "method", "model", "dataset", "seed",
                                                               "progress")} for r in runs])  # fmt: skip
        return 0
    print(f"{'run id':<30} {'status':<10} {'method':<13} {'model':<14} {'dataset':<17} seed  progress  accuracy")
    for r in runs:
        acc = (r["summary"] or {}).get("final_metrics", {}).get("eval_accuracy")
        print(f"{r['id']:<30} {r['status']:<10} {r['method']:<13} {r['model'][:14]:<14} {r['dataset'][:17]:<17} "
              f"{r['seed']:<5} {r['progress']:>7.0%}  {'' if acc is None else f'{acc:.4f}'}")  # fmt: skip
    return 0


def cmd_show(args) -> int:
    from db.schema import utcnow

    run = store.get_run(args.run_id)  # applies the liveness rule
    if run is None:
        raise no_such_run(args.run_id)
    age = (utcnow() - run["heartbeat_at"]).total_seconds() if run["heartbeat_at"] else None
    _print_json(_run_result(run) | {
        "attempt": run["attempt"], "owner": run["owner"], "heartbeat_age_s": age, "progress": run["progress"],
        "spec": run["spec"], "device": run["device"], "created_at": run["created_at"],
        "started_at": run["started_at"], "finished_at": run["finished_at"],
    })  # fmt: skip
    return 0


def cmd_resume(args) -> int:
    """Resume a failed, lost or cancelled run from its last checkpoint, as its next attempt."""
    if args.inline:
        from jobs.worker import execute

        if (store.get_run(args.run_id) or {}).get("executor") == "merge":
            return _fail(f"run {args.run_id} is a merge, which has nothing to resume: merge again (app.cli merge)")
        attempt = store.requeue(args.run_id, reason="resumed by the user (in this process)",
                                only_from=RESUMABLE_STATUSES)  # fmt: skip
        if attempt is None:
            run = store.get_run(args.run_id)
            what = "is not in the database" if run is None else f"is {run['status']}"
            return _fail(f"run {args.run_id} {what}: only a {', '.join(RESUMABLE_STATUSES)} run can be resumed")
        store.update_run(args.run_id, executor="inline")
        final = execute(args.run_id, attempt=attempt, echo=not args.json)
        print(json.dumps(_run_result(final) | {"attempt": attempt}, default=str) if args.json else
              f"{args.run_id} attempt {attempt}: {final['status']}")  # fmt: skip
        return 0 if final["status"] == "succeeded" else 1
    from jobs.runs import resume_run

    attempt = resume_run(args.run_id)
    print(json.dumps({"run_id": args.run_id, "attempt": attempt}) if args.json else
          f"{args.run_id}: attempt {attempt} queued; it resumes from the last checkpoint")  # fmt: skip
    return 0


def cmd_cancel(args) -> int:
    from jobs.runs import cancel_run

    print("cancelled" if cancel_run(args.run_id) else "already finished")
    return 0


def cmd_logs(args) -> int:
    from jobs.runs import job_logs

    print(job_logs(args.run_id, tail=args.tail))
    return 0


def cmd_summary(args) -> int:
    from app.summary import paired_table, summary_markdown, summary_table

    runs = store.list_runs(experiment=args.experiment, limit=None)
    rows, pairs = summary_table(runs, args.metric), paired_table(runs, args.metric)
    if args.json:
        _print_json(rows if not args.paired else {"groups": rows, "paired": pairs})
        return 0
    print("\n".join(summary_markdown(rows, pairs)))
    return 0


def cmd_metrics(args) -> int:
    """Every metric series of a run as ``{key: [[step, value], ...]}`` (JSON), or one line per key."""
    if store.get_run(args.run_id) is None:
        raise no_such_run(args.run_id)
    frame = store.get_metrics([args.run_id])
    series = {key: [[int(step), value] for step, value in zip(rows["step"], rows["value"])]
              for key, rows in frame.groupby("key", sort=True)}  # fmt: skip
    if args.json:
        print(json.dumps(series, allow_nan=False, default=str) if _finite(series) else json.dumps(series))
        return 0
    for key, points in series.items():
        last_step, last = points[-1]
        print(f"{key:<24} {len(points):>5} points, last {last:.6g} at step {last_step}")
    return 0


def _finite(series: dict[str, list[list[float]]]) -> bool:
    return all(v == v and abs(v) != float("inf") for points in series.values() for _, v in points)


def cmd_report(args) -> int:
    from app.report import write_report

    if args.runs:
        runs = [store.get_run(r) for r in args.runs]
        missing = [r for r, run in zip(args.runs, runs) if run is None]
        if missing:
            raise no_such_run(missing[0])
    else:
        runs = store.list_runs(experiment=args.experiment, limit=None)
        if not runs:
            return _fail(f"--experiment {args.experiment}: no runs in that experiment; list them with "
                         "python -m app.cli ls")  # fmt: skip
    path = write_report([r for r in runs if r is not None], Path(args.out), title=args.title)
    print(path)
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


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def no_such_run(run_id: str) -> UserError:
    where = config.db_location()
    return UserError(f"no run {run_id} in the database at {where}: list runs with python -m app.cli ls")


def analysis_flags():
    """The ``analyze`` options, generated from every registered analysis kind's params class."""
    from engine.analysis.kinds import param_flags

    return param_flags()


def add_analysis_flags(parser: argparse.ArgumentParser) -> None:
    for flag in analysis_flags():
        options = dict(flag.options)
        if options.pop("action", None) == "store_true_false":
            options["action"] = argparse.BooleanOptionalAction
        parser.add_argument(flag.flag, dest=flag.dest, **options)


def cmd_analyze(args) -> int:
    from jobs.analysis import AnalysisError, compute_analysis

    flags = [f for f in analysis_flags() if getattr(args, f.dest, None) is not None]
    foreign = [f for f in flags if args.kind not in f.kinds]
    if foreign:
        owners = " or ".join(f"--kind {k}" for k in dict.fromkeys(k for f in foreign for k in f.kinds))
        names = ", ".join(f.flag for f in foreign)
        return _fail(f"options {names} are for {owners} only (this is --kind {args.kind}): drop them")
    params = {f.field: getattr(args, f.dest) for f in flags}
    try:
        summary = compute_analysis(args.run_id, args.kind, params, force=args.force)
    except AnalysisError as err:
        return _fail(str(err))
    if args.json:
        _print_json(summary)
        return 0
    how = "reused the stored artifact" if summary["reused"] else "computed"
    print(f"{summary['kind']} of {summary['run_id']}: {how}")
    for path in summary["artifacts"]:
        print(f"  {path}")
    for key, value in summary["headline"].items():
        if isinstance(value, dict):
            print(f"{key}:")
            for name, item in value.items():
                print(f"  {name}: {item:.4g}" if isinstance(item, float) else f"  {name}: {item}")
        else:
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_export(args) -> int:
    from engine.errors import UserError
    from engine.export import command_line_export_root, export_run, run_trusts_remote_code
    from engine.methods import build_method
    from jobs.analysis import trained_run

    if args.svd_rank is not None and args.format != "peft":
        return _fail("--svd-rank converts to the PEFT LoRA layout: use it with --format peft")
    if args.rank is not None and args.format != "peft":
        return _fail("--rank sets the rank of a layer's low-rank factors in the PEFT layout: use it with --format peft")
    try:
        run, adapter_dir = trained_run(args.run_id)
        method_spec = dict(run["spec"]["method"])
        method = build_method(method_spec.pop("name"), method_spec)
        if args.format == "merged" and not method.mergeable:
            return _fail(
                f"--format merged: method {method.name} of run {args.run_id} is not mergeable (its update is not a "
                "dense ΔW that folds into the weights); use --format native"
            )
        # The root is PEFTLAB_EXPORTS or the current directory, never the output's own parent.
        result = export_run(adapter_dir, args.format, Path(args.out).expanduser(), root=command_line_export_root(),
                            summary=run["summary"], svd_rank=args.svd_rank, factor_rank=args.rank,
                            overwrite=args.overwrite, trust_remote_code=run_trusts_remote_code(run))  # fmt: skip
    except UserError as err:  # AnalysisError, ExportError, ModelError, SpecError
        return _fail(str(err))
    if args.json:
        _print_json({"run_id": args.run_id, "format": result.format, "path": str(result.path), "files": result.files,
                     "relative_error": result.relative_error, "weight_error": result.weight_error,
                     "notes": result.notes})  # fmt: skip
        return 0
    print(result.path)
    for name, digest in result.files.items():
        print(f"{digest}  {name}")
    if result.relative_error is not None:
        print(f"relative error of the LoRA conversion: {result.relative_error:.3e}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_import(args) -> int:
    from engine.errors import UserError
    from jobs.imports import record_import

    try:
        run_id = record_import(args.dir, name=args.name, trust_remote_code=args.trust_remote_code)
    except UserError as err:  # ExportError, ModelError, SpecError
        return _fail(str(err))
    if args.json:
        _print_json({"run_id": run_id})
    else:
        print(run_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="PEFT Lab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in SPEC_COMMANDS.items():  # listed here; main() parses them with app/spec_args.py
        p = sub.add_parser(name, help=f"{helptext}; flags: python -m app.cli {name} --help", add_help=False)
        p.add_argument("arguments", nargs=argparse.REMAINDER, help="[--config] SPEC and --FIELD VALUE overrides")
    p = sub.add_parser("ls", help="list runs")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    for name, func, helptext in (("show", cmd_show, "a run as JSON"), ("cancel", cmd_cancel, "cancel a run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_id")
        p.add_argument("--json", action="store_true", help="show: the output is JSON in any case")
        p.set_defaults(func=func)
    p = sub.add_parser("resume", help="resume a failed, lost or cancelled run from its last checkpoint")
    p.add_argument("run_id")
    p.add_argument("--inline", action="store_true", help="train in this process instead of submitting to Ray")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("logs", help="the tail of a run's log")
    p.add_argument("run_id")
    p.add_argument("--tail", type=int, default=100)
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("summary", help="n, mean, std and 95 % CI over seeds per configuration, paired differences")
    p.add_argument("--experiment", help="only runs of this experiment")
    p.add_argument("--metric", default="eval_accuracy", help="final metric to summarise (default eval_accuracy)")
    p.add_argument("--json", action="store_true", help="print the groups as one JSON list")
    p.add_argument("--paired", action="store_true", help="with --json: {groups: [...], paired: [...]}")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("metrics", help="every metric series of a run")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true", help="print {key: [[step, value], ...]}")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("report", help="one self-contained HTML report of an experiment or of chosen runs")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="every run of this experiment")
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--title", default="PEFT Lab report")
    p.set_defaults(func=cmd_report)
    sub.add_parser("methods", help="registered method names").set_defaults(func=cmd_methods)
    sub.add_parser("models", help="bundled model aliases").set_defaults(func=cmd_models)
    sub.add_parser("datasets", help="bundled datasets").set_defaults(func=cmd_datasets)
    p = sub.add_parser("analyze", help="compute (or reuse) a stored analysis of a trained run")
    p.add_argument("run_id")
    from engine.analysis.kinds import analysis_kinds

    p.add_argument("--kind", required=True, choices=analysis_kinds())
    p.add_argument("--json", action="store_true", help="print one JSON object (kind, artifacts, headline) last")
    p.add_argument("--force", action="store_true", help="recompute even if a stored artifact matches")
    add_analysis_flags(p)  # --landscape-kind, --grid, --span, --examples, ... from the params classes
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("export", help="export a run's adapter (native, PEFT LoRA) or the merged model")
    p.add_argument("run_id")
    from engine.export import FORMATS

    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory inside PEFTLAB_EXPORTS, else the current directory")
    p.add_argument("--rank", type=int, help="peft: rank of layers whose factors take one (DyLoRA)")
    p.add_argument("--svd-rank", type=int, help="peft: convert any mergeable method by truncated SVD at this rank")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--json", action="store_true", help="print one JSON object (path, sha256 per file) last")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="record an exported adapter directory (native or PEFT) as a run")
    p.add_argument("dir")
    p.add_argument("--name", help="name of the new run")
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let the base model run its repository's Python (never taken from the imported files)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)
    from app import cli_merge, cli_study

    cli_study.add_parser(sub)
    cli_merge.add_parser(sub)
    return parser


SPEC_FUNCS = {"run": cmd_run, "submit": cmd_submit}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SPEC_COMMANDS:  # the RunSpec flags: generated from the spec's fields
            spec, options = spec_from_args(argv[0], argv[1:])
            return SPEC_FUNCS[argv[0]](argparse.Namespace(spec=spec, **vars(options)))
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UserError, DatabaseError) as err:  # bad input or an unusable environment: one line, no traceback
        return _fail(" ".join(str(err).splitlines()))
    except ConnectionError as err:  # a Ray cluster (RAY_ADDRESS) that does not answer
        reason = " ".join(str(err).split())
        return _fail(f"{reason}: start the cluster (python -m jobs.cluster start) or fix RAY_ADDRESS")


if __name__ == "__main__":
    sys.exit(main())
