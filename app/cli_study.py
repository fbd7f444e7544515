"""``python -m app.cli study ...``: run, list, show and cancel studies (hyper-parameter searches whose trials are
runs; see engine/study.py for the YAML).

python -m app.cli study STUDY.yaml [--wait] [--json]   validate, submit to Ray; with --wait, follow it to its end
python -m app.cli study ls [--json]
python -m app.cli study show ID [--json]
python -m app.cli study cancel ID
python -m app.cli study table ID [--json]    the paper-style table: headline metric per task, mean over tasks
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

COMMANDS = ("ls", "show", "cancel", "table")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "study", help="run a study (a search over RunSpec fields), or: study ls | show ID | cancel ID | table ID"
    )
    p.add_argument("target", help="a study YAML file, or ls, show, cancel")
    p.add_argument("study_id", nargs="?", help="the study of show and cancel")
    p.add_argument("--wait", action="store_true", help="follow the study until every trial has finished")
    p.add_argument("--json", action="store_true", help="print one JSON object (or list) last")
    p.set_defaults(func=cmd_study)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _line(report: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report["counts"].items())) or "no trial recorded yet"
    best = report["best"]
    shown = f"; best {best['metric']} {best['value']:.4f} ({best['run_id']})" if best else ""
    return f"{report['study_id']} {report['status']}: {report['n_trials']} trials ({counts}){shown}"


def cmd_study(args: argparse.Namespace) -> int:
    from engine.errors import UserError
    from jobs import studies

    if args.target not in COMMANDS:
        if args.study_id:
            raise UserError(f"study {args.target}: give a study file alone (or: study show|cancel ID)")
        return _submit(args)
    if args.target == "ls":
        from db import studies as db_studies

        rows = db_studies.list_studies()
        if args.json:
            _print_json([{k: r[k] for k in ("id", "name", "status", "n_trials", "counts", "created_at")} for r in rows])
        for r in [] if args.json else rows:
            print(f"{r['id']}  {r['status']:<10} {r['name']:<24} {r['n_trials']:>4} trials  {r['counts']}")
        return 0
    if not args.study_id:
        raise UserError(f"study {args.target} needs a study id: python -m app.cli study {args.target} ID")
    if args.target == "table":
        from app.protocol import protocol_markdown, protocol_table
        from db import studies as db_studies

        studies.study_report(args.study_id)  # an unknown id is one line naming it
        tasks, rows = protocol_table(db_studies.trial_runs(args.study_id))
        print(json.dumps({"tasks": tasks, "rows": rows}, default=str) if args.json else
              "\n".join(protocol_markdown(tasks, rows)))  # fmt: skip
        return 0
    if args.target == "cancel":
        n = studies.cancel_study(args.study_id)
        print(f"study {args.study_id} cancelled ({n} trial(s) stopped or never started)")
        return 0
    report = studies.study_report(args.study_id)
    print(json.dumps(report, default=str) if args.json else _line(report))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from db import studies as db_studies
    from engine.study import count_trials, load_study
    from jobs import studies

    study = load_study(args.target)
    study_id = studies.submit_study(study)
    if not args.json:
        print(f"{study_id} submitted: {count_trials(study)} trials ({study.search} search)")
    if not args.wait:
        if args.json:
            _print_json({"study_id": study_id})
        return 0
    seen = ""
    while (db_studies.get_study(study_id) or {}).get("status") in ("queued", "running"):
        line = _line(studies.study_report(study_id))
        if line != seen and not args.json:
            print(line, flush=True)
        seen = line
        time.sleep(2.0)
    report = studies.study_report(study_id)
    print(json.dumps(report, default=str) if args.json else _line(report))
    return 0 if report["status"] == "succeeded" else 1
