"""The MWA table of docs/RESULTS.md: for every run of an experiment that kept checkpoints, merge them uniformly and
by MWA (loss, p = 1, 2, 4), then print last checkpoint vs merges as markdown (mean ± std over the runs last).

    python scripts/mwa_table.py --experiment mwa [--p 1 2 4]

Merges that already exist for a run (same settings) are reused, so the script can be run again after a stop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import config, merges, store  # noqa: E402
from engine.adapter_merge import MergeSettings  # noqa: E402
from engine.trajectory import read_trajectory  # noqa: E402
from jobs.merge import submit_merge  # noqa: E402


def merged_accuracy(run_id: str, settings: MergeSettings) -> tuple[float, float]:
    """Accuracy and largest re-factorisation error of the merge of ``run_id``'s checkpoints with ``settings``."""
    wanted = settings.model_dump(mode="json")
    for merged in merges.merges_of([run_id]):
        merge = (merged["summary"] or {}).get("merge") or {}
        if merged["status"] == "succeeded" and merge.get("settings") == wanted:
            break
    else:
        merged = store.get_run(submit_merge([run_id], settings, inline=True)) or {}
        merge = (merged.get("summary") or {}).get("merge") or {}
    if merged.get("status") != "succeeded":
        raise SystemExit(f"merge of {run_id} ({settings.label()}) ended {merged.get('status')}: {merged.get('error')}")
    return merged["summary"]["final_metrics"]["eval_accuracy"], merge["max_refactorisation_error"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--p", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    args = parser.parse_args(argv)
    runs = [
        r
        for r in store.list_runs(experiment=args.experiment, limit=None)
        if r["executor"] != "merge" and r["status"] == "succeeded" and read_trajectory(config.run_dir(r["id"]))
    ]
    runs.sort(key=lambda r: r["seed"])  # fmt: skip
    settings = [MergeSettings(method="uniform")] + [MergeSettings(method="mwa", metric="loss", p=p) for p in args.p]
    header = ["seed", "K", "last", "best checkpoint", *(s.label() for s in settings), "max SVD error"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    columns: dict[str, list[float]] = {h: [] for h in header[2:-1]}
    for run in runs:
        kept = read_trajectory(config.run_dir(run["id"]))
        row = {"last": kept[-1].eval_accuracy, "best checkpoint": max(c.eval_accuracy for c in kept)}
        errors = []
        for s in settings:
            row[s.label()], error = merged_accuracy(run["id"], s)
            errors.append(error)
        for key, value in row.items():
            columns[key].append(value)
        cells = [str(run["seed"]), str(len(kept)), *(f"{row[h]:.3f}" for h in header[2:-1]), f"{max(errors):.3f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    if len(runs) > 1:
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" for v in columns.values()]
        print("| mean ± std | | " + " | ".join(cells) + " | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
