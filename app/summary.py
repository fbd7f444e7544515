"""Run tables without Streamlit: the frame the Compare page and ``python -m app.cli summary`` share, and the summary
over seeds. Kept apart from the pages' helpers so that the command line never imports Streamlit (an import-linter
contract in pyproject.toml holds it to that)."""

from __future__ import annotations

import pandas as pd

# --- runs ------------------------------------------------------------------------------------------


def short_label(run: dict | pd.Series) -> str:
    """A compact legend entry: name (or method), seed and the end of the run id."""
    return f"{run['name'] or run['method']} s{run['seed']} · {run['id'][-6:]}"


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per run with the columns ``engine.analysis.compare`` works on (numbers as floats, NaN if absent)."""
    rows = []
    for r in runs:
        summary = r.get("summary") or {}
        final = summary.get("final_metrics") or {}
        timings = summary.get("timings") or {}
        rows.append(
            {
                "run_id": r["id"],
                "label": short_label(r),
                "name": r["name"] or r["method"],
                "method": r["method"],
                "model": r["model"],
                "dataset": r["dataset"],
                "experiment": r.get("experiment") or "",
                "seed": r["seed"],
                "tags": list(r.get("tags") or []),
                "status": r["status"],
                "eval_accuracy": final.get("eval_accuracy"),
                "eval_loss": final.get("eval_loss"),
                "trainable_params": r.get("trainable_params"),
                "total_params": r.get("total_params"),
                "stored_params": summary.get("stored_params"),
                "stored_bytes": summary.get("stored_bytes"),
                "ms_per_step": timings.get("ms_per_step"),
                "peak_rss_mb": timings.get("peak_rss_mb"),
                "steps": summary.get("steps"),
                "majority_rate": summary.get("majority_rate"),
                "spec": r.get("spec") or {},
            }
        )
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for column in NUMERIC_RUN_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


RUN_COLUMNS = [
    "run_id", "label", "name", "method", "model", "dataset", "experiment", "seed", "tags", "status",
    "eval_accuracy", "eval_loss", "trainable_params", "total_params", "stored_params", "stored_bytes", "ms_per_step",
    "peak_rss_mb", "steps", "spec", "majority_rate",
]  # fmt: skip
NUMERIC_RUN_COLUMNS = [
    "eval_accuracy", "eval_loss", "trainable_params", "total_params", "stored_params", "stored_bytes", "ms_per_step",
    "peak_rss_mb", "steps", "majority_rate",
]  # fmt: skip


def summary_table(runs: list[dict], metric: str = "eval_accuracy") -> list[dict]:
    """One row per configuration (``engine.analysis.groups``: the full spec minus the seed) of the succeeded runs:
    n, seeds, mean, std and 95 % t interval of the final ``metric``, with trainable parameters, ms/step and peak
    memory. ``runs``, ``accuracy`` and ``accuracy_std`` repeat n, mean and std under their older names."""
    from engine.analysis.groups import group_stats

    frame = runs_frame([r for r in runs if r["status"] == "succeeded"])
    if frame.empty:
        return []
    rows = []
    for row in map(_no_nan, group_stats(frame, metric).to_dict("records")):
        rows.append({
            "group": row["group"], "group_key": row["group_key"], "model": row["model"], "dataset": row["dataset"],
            "method": row["method"], "name": ", ".join(row["names"]), "metric": metric, "n": row["n"],
            "seeds": row["seeds"], "mean": row["mean"], "std": row["std"], "ci_low": row["ci_low"],
            "ci_high": row["ci_high"], "confidence": 0.95, "run_ids": row["run_ids"],
            "runs": row["n"], "accuracy": row["mean"], "accuracy_std": row["std"] or 0.0,
            "trainable_params": None if row["trainable_params"] is None else int(row["trainable_params"]),
            "ms_per_step": row["ms_per_step"], "peak_rss_mb": row["peak_rss_mb"],
        })  # fmt: skip
    return rows


def paired_table(runs: list[dict], metric: str = "eval_accuracy") -> list[dict]:
    """The paired differences (``engine.analysis.groups.paired_differences``) between the configurations of the
    succeeded runs that share a model, evaluation data and seeds."""
    from engine.analysis.groups import paired_differences

    frame = runs_frame([r for r in runs if r["status"] == "succeeded"])
    if frame.empty:
        return []
    return [_no_nan(r) for r in paired_differences(frame, metric).to_dict("records")]


def _no_nan(record: dict) -> dict:
    """NaN (pandas' missing number) as None, so JSON stays valid and tables leave the cell blank."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in record.items()}


def _number(value: float | None, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)


def summary_markdown(rows: list[dict], pairs: list[dict] | None = None) -> list[str]:
    """The summary rows as the lines of a markdown table (std and 95 % CI only where there are several seeds), then
    the paired differences when given."""
    header = ("| model | dataset | configuration | n | mean | std | 95 % CI | trainable params | ms/step | "
              "peak RSS (MiB) |")  # fmt: skip
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["ci_low"] is not None else ""
        params = "" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        lines.append(f"| {r['model']} | {r['dataset']} | {r['group']} | {r['n']} | {r['mean']:.3f} | "
                     f"{_number(r['std'], '.3f')} | {ci} | {params} | {_number(r['ms_per_step'], '.0f')} | "
                     f"{_number(r['peak_rss_mb'], '.0f')} |")  # fmt: skip
    if pairs:
        lines += ["", "| a | b | common seeds | mean a − b | 95 % CI | p (paired t) |", "|---|---|---|---|---|---|"]
        for p in pairs:
            ci = f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p["ci_low"] is not None else ""
            lines.append(f"| {p['group_a']} | {p['group_b']} | {p['n']} | {p['mean']:+.3f} | {ci} | "
                         f"{_number(p['p_value'], '.3f')} |")  # fmt: skip
    return lines
