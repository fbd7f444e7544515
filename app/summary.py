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
    "peak_rss_mb", "steps", "spec",
]  # fmt: skip
NUMERIC_RUN_COLUMNS = [
    "eval_accuracy", "eval_loss", "trainable_params", "total_params", "stored_params", "stored_bytes", "ms_per_step",
    "peak_rss_mb", "steps",
]  # fmt: skip


def summary_table(runs: list[dict]) -> list[dict]:
    """One row per (model, dataset, run name): mean ± std over its succeeded runs (seeds) of the final validation
    accuracy, with trainable parameters, ms/step and peak memory."""
    from engine.analysis.compare import method_summary

    frame = runs_frame([r for r in runs if r["status"] == "succeeded"])
    if frame.empty:
        return []
    frame["group"] = frame["model"] + " · " + frame["dataset"] + " · " + frame["name"]
    stats = method_summary(frame, group="group")
    first = frame.drop_duplicates("group").set_index("group")
    rows = []
    for _, row in stats.iterrows():
        meta = first.loc[row["group"]]
        rows.append({
            "model": meta["model"], "dataset": meta["dataset"], "name": meta["name"], "method": meta["method"],
            "runs": int(row["eval_accuracy_count"]),
            "accuracy": row["eval_accuracy_mean"], "accuracy_std": row["eval_accuracy_std"],
            "trainable_params": int(row["trainable_params_mean"]),
            "ms_per_step": row["ms_per_step_mean"], "peak_rss_mb": row["peak_rss_mb_mean"],
        })  # fmt: skip
    return rows


def summary_markdown(rows: list[dict]) -> list[str]:
    """The summary rows as the lines of a markdown table (the accuracy spread only where there are several seeds)."""
    header = "| model | dataset | run | seeds | validation accuracy | trainable params | ms/step | peak RSS (MiB) |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        spread = f" ± {r['accuracy_std']:.3f}" if r["runs"] > 1 else ""
        lines.append(f"| {r['model']} | {r['dataset']} | {r['name']} | {r['runs']} | {r['accuracy']:.3f}{spread} | "
                     f"{r['trainable_params']:,} | {r['ms_per_step']:.0f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    return lines
