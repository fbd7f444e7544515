"""The paper-style table of a protocol (GLUE, VTAB-1k, commonsense reasoning): one row per method, one column per
task holding the task's headline metric (the dataset spec's ``metric``, else the task's usual one) as mean ± std over
seeds, ×100 as the papers print it, and the mean over tasks. No Streamlit here (the command line uses it)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any


def task_label(spec: dict[str, Any]) -> str:
    """A task's column name: the hub config (``cola``), else the dataset's last path part (``cifar``)."""
    dataset = spec.get("dataset") or {}
    return str(dataset.get("config") or Path(str(dataset.get("name", "?"))).name)


def protocol_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(task columns, rows) over the succeeded runs: each row has ``method``, per task ``(mean, std, seeds,
    metric)`` and ``mean``, the mean over tasks (NaN unless the method has every task)."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    metrics: dict[str, str] = {}
    for run in runs:
        summary = run.get("summary") or {}
        if run.get("status") != "succeeded":
            continue
        metric = summary.get("headline_metric") or "eval_accuracy"
        value = (summary.get("final_metrics") or {}).get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        task = task_label(run.get("spec") or {})
        metrics[task] = metric
        values[(str(run.get("method")), task)].append(100.0 * float(value))
    tasks = sorted(metrics)
    rows = []
    for method in sorted({m for m, _ in values}):
        row: dict[str, Any] = {"method": method}
        for task in tasks:
            seen = values.get((method, task), [])
            row[task] = (mean(seen), stdev(seen) if len(seen) > 1 else 0.0, len(seen), metrics[task]) if seen else None
        cells = [row[t][0] for t in tasks if row[t] is not None]
        row["mean"] = mean(cells) if cells and len(cells) == len(tasks) else math.nan
        rows.append(row)
    return tasks, rows


def protocol_markdown(tasks: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The table as markdown lines; the header names each task's metric."""
    if not rows:
        return ["no succeeded run with its headline metric yet"]
    named = [f"{t} ({next(r[t][3] for r in rows if r[t] is not None).removeprefix('eval_')})" for t in tasks]
    lines = ["| method | " + " | ".join(named) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for row in rows:
        cells = [f"{row[t][0]:.1f} ± {row[t][1]:.1f}" if row[t] and row[t][2] > 1 else
                 f"{row[t][0]:.1f}" if row[t] else "–" for t in tasks]  # fmt: skip
        shown = "–" if math.isnan(row["mean"]) else f"{row['mean']:.1f}"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {shown} |")
    return lines
