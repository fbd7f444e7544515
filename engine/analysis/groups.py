"""Groups of runs that are one configuration, their statistics over seeds, paired differences and baselines.

A comparison table for a paper averages the seeds of *one* configuration and nothing else. Here:

* **A group is a configuration**: the run's full RunSpec (defaults filled in) minus the training seed. The run's
  ``name``, ``experiment`` and ``tags`` are labels, and so are fields that do not change what is trained or how it
  is scored (``resources.*``, checkpoint cadence, logging and evaluation cadence, CPU threads): two runs that
  differ only in those are seeds of one configuration. Anything else (``train.lr``, ``dataset.max_train``,
  ``method.rank``, ...) makes a different group.
* **Statistics over seeds**: n, mean, sample standard deviation (ddof = 1) and the 95 % confidence interval of the
  mean from Student's t, ``mean ± t(0.975, n − 1) · s / √n`` (no interval with a single run). A seed that appears
  twice in a group (a configuration rerun) counts once, with its newest run.
* **Paired differences**: two groups of the same model and the same evaluation data (every ``dataset.*`` field
  equal, so both saw the same held-out examples) that share seeds are compared seed by seed: the differences
  ``a_s − b_s`` over the common seeds get the same t interval, and a two-sided paired t-test p-value. Seeds that
  only one group has are left out (they are counted in ``seeds_a`` / ``seeds_b``).
* **Baselines** per model and evaluation data: the majority-class rate of the evaluation split (every run records
  it) and the linear probe, i.e. the mean of the succeeded ``linear_probe`` (head-only) runs of that model and data.

Inputs are the runs table of ``engine.analysis.compare`` (``run_id``, ``spec``, ``seed``, ``model``, ``dataset``,
``method``, ``name``, the metric column, optionally ``majority_rate`` and ``created``); outputs are DataFrames.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from engine.analysis.compare import flatten

CONFIDENCE = 0.95
LINEAR_PROBE = "linear_probe"
# Fields that label a run or set how it is run, not what it is: never part of a group's key.
LABEL_FIELDS = ("name", "experiment", "tags", "train.seed")
LABEL_PREFIXES = ("resources.",)
BOOKKEEPING_FIELDS = (
    "train.log_every", "train.evals_per_epoch", "train.num_threads", "train.checkpoint_every_s",
    "train.checkpoint_every_steps",
)  # fmt: skip


def _full_spec(spec: Any) -> dict[str, Any]:
    """The spec with RunSpec's and the method's defaults filled in (``rank: 8`` written out or left to the default
    is one configuration; a run stored before a field existed groups with newer ones), or the stored dict as it is
    when it no longer parses (e.g. an imported run of a method since renamed)."""
    from engine.spec import SpecError, parse_spec

    if isinstance(spec, str):
        spec = json.loads(spec) if spec.strip() else {}
    try:
        parsed = parse_spec(dict(spec))
        full = parsed.model_dump(mode="json")
        full["method"] = {"name": parsed.method.name} | parsed.method_config().model_dump(mode="json")
        return full
    except (SpecError, ValueError, TypeError, KeyError):
        return dict(spec)


def configuration(spec: Any) -> dict[str, Any]:
    """The flattened fields of a run's spec that make its configuration (everything but labels and the seed)."""
    flat = flatten(_full_spec(spec))
    return {
        k: v for k, v in sorted(flat.items())
        if k not in LABEL_FIELDS and k not in BOOKKEEPING_FIELDS and not k.startswith(LABEL_PREFIXES)
    }  # fmt: skip


def configuration_key(spec: Any) -> str:
    """A short stable id of the configuration (the same for every seed of it)."""
    text = json.dumps(configuration(spec), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _eval_data(config: dict[str, Any]) -> str:
    """What decides the evaluation examples: the model (its tokenizer) and every dataset field."""
    picked = {k: v for k, v in config.items() if k == "model" or k.startswith("dataset.")}
    return json.dumps(picked, sort_keys=True, default=str)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def assign_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``runs`` with ``group_key`` (the configuration's id), ``group`` (a readable label) and ``eval_data``.

    The label is the runs' common name when every run of the group has the same one and no other group uses it;
    otherwise the method followed by the fields whose values differ between the groups (``lora · train.lr=0.001``).
    """
    out = runs.copy()
    configs = [configuration(s) for s in out["spec"]]
    out["group_key"] = [configuration_key(s) for s in out["spec"]]
    out["eval_data"] = [_eval_data(c) for c in configs]
    by_key = dict(zip(out["group_key"], configs))
    keys = list(by_key)
    names = out.groupby("group_key", sort=False)["name"].agg(lambda s: set(s))
    name_users: dict[str, int] = {}
    for key in keys:
        for name in names[key]:
            name_users[name] = name_users.get(name, 0) + 1
    labels = {}
    for key in keys:
        config, own = by_key[key], names[key]
        if len(own) == 1 and name_users[next(iter(own))] == 1:
            labels[key] = next(iter(own))
            continue
        # The fields that tell it apart from the groups it shares a name with (all groups if none).
        peers = [by_key[k] for k in keys if names[k] & own] if own else list(by_key.values())
        differing = [
            f for f in sorted({f for c in peers for f in c})
            if f not in ("method.name", "model") and len({repr(c.get(f)) for c in peers}) > 1
        ]  # fmt: skip
        shown = [f"{f.split('.', 1)[-1]}={_short(config.get(f, '—'))}" for f in differing][:4]
        labels[key] = " · ".join([str(config.get("method.name", "?")), *shown])
    seen: dict[str, int] = {}
    for key in keys:  # two groups can still read alike (more than four differing fields): number them
        seen[labels[key]] = seen.get(labels[key], 0) + 1
        if seen[labels[key]] > 1:
            labels[key] = f"{labels[key]} ({key[:6]})"
    out["group"] = out["group_key"].map(labels)
    return out


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> dict[str, float | int | None]:
    """n, mean, sample std and Student-t interval of the mean (``ci_low``/``ci_high`` None when n < 2)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None, "half_width": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "half_width": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "half_width": half}


def _per_seed(frame: pd.DataFrame, metric: str) -> pd.Series:
    """The metric by seed, the newest run of a seed kept (rows come newest first, as the store lists them)."""
    scored = frame.dropna(subset=[metric])
    if "created" in scored:
        scored = scored.sort_values("created", ascending=False, kind="stable")
    return scored.drop_duplicates("seed", keep="first").set_index("seed")[metric].sort_index()


def group_stats(
    runs: pd.DataFrame, metric: str = "eval_accuracy", extra: Sequence[str] = ("trainable_params", "ms_per_step",
                                                                              "peak_rss_mb"),
) -> pd.DataFrame:  # fmt: skip
    """One row per configuration: labels, n, seeds, mean, std, the 95 % interval, and the mean of ``extra``."""
    grouped = runs if "group_key" in runs else assign_groups(runs)
    rows = []
    for key, frame in grouped.groupby("group_key", sort=False):
        values = _per_seed(frame, metric)
        first = frame.iloc[0]
        row: dict[str, Any] = {
            "group": first["group"], "group_key": key, "model": first["model"], "dataset": first["dataset"],
            "method": first["method"], "names": sorted(set(frame["name"])), "run_ids": frame["run_id"].tolist(),
            "seeds": [int(s) for s in values.index],
        }  # fmt: skip
        row |= t_interval(values.to_list())
        for column in extra:
            if column in frame:
                mean = pd.to_numeric(frame[column], errors="coerce").mean()
                row[column] = None if pd.isna(mean) else float(mean)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(runs: pd.DataFrame, metric: str = "eval_accuracy") -> pd.DataFrame:
    """``a − b`` seed by seed for every two groups of one model and evaluation data with at least one common seed:
    n (common seeds), the seeds, mean difference, its std, 95 % t interval and the paired t-test's p-value."""
    grouped = runs if "group_key" in runs else assign_groups(runs)
    per_group = {
        key: (frame.iloc[0]["group"], frame.iloc[0]["eval_data"], _per_seed(frame, metric))
        for key, frame in grouped.groupby("group_key", sort=False)
    }
    keys = list(per_group)
    rows = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            (name_a, data_a, va), (name_b, data_b, vb) = per_group[a], per_group[b]
            common = sorted(set(va.index) & set(vb.index))
            if data_a != data_b or not common:
                continue
            diffs = (va.loc[common] - vb.loc[common]).to_list()
            interval = t_interval(diffs)
            p_value = None
            n, std = len(diffs), interval["std"]
            if n >= 2 and std:
                t = float(np.mean(diffs)) / (float(std) / math.sqrt(n))
                p_value = float(2 * stats.t.sf(abs(t), n - 1))
            rows.append({"group_a": name_a, "group_b": name_b, "seeds": [int(s) for s in common],
                         "seeds_a": len(va), "seeds_b": len(vb), **interval, "p_value": p_value})  # fmt: skip
    columns = ["group_a", "group_b", "seeds", "seeds_a", "seeds_b", "n", "mean", "std", "ci_low", "ci_high",
               "half_width", "p_value"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def baselines(runs: pd.DataFrame, metric: str = "eval_accuracy") -> pd.DataFrame:
    """Reference values per model and evaluation data: ``majority class`` (the recorded majority rate of the
    evaluation split; accuracy only) and ``linear probe`` (mean of the ``linear_probe`` runs' ``metric``)."""
    grouped = runs if "eval_data" in runs else assign_groups(runs)
    rows = []
    for (model, data), frame in grouped.groupby(["model", "eval_data"], sort=False):
        dataset = frame.iloc[0]["dataset"]
        if metric == "eval_accuracy" and "majority_rate" in frame:
            rates = pd.to_numeric(frame["majority_rate"], errors="coerce").dropna()
            if len(rates):
                rows.append({"model": model, "dataset": dataset, "eval_data": data, "baseline": "majority class",
                             "value": float(rates.iloc[0]), "n": None})  # fmt: skip
        probe = _per_seed(frame[frame["method"] == LINEAR_PROBE], metric)
        if len(probe):
            rows.append({"model": model, "dataset": dataset, "eval_data": data, "baseline": "linear probe",
                         "value": float(probe.mean()), "n": len(probe)})  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "dataset", "eval_data", "baseline", "value", "n"])


def format_interval(row: dict[str, Any] | pd.Series, digits: int = 3) -> str:
    """``0.606 ± 0.003 [0.579, 0.633]`` (mean ± std [95 % CI]); just the mean for a single run."""
    mean = row.get("mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if row.get("ci_low") is None or (isinstance(row.get("ci_low"), float) and math.isnan(row["ci_low"])):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {row['std']:.{digits}f} [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
