"""Groups are configurations: seeds of one spec pool, anything else splits; intervals and paired differences are
Student-t computations checked by hand with scipy; baselines come from the runs; ``summary`` and ``metrics`` JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from app.cli import main
from app.summary import runs_frame
from db import store
from engine.analysis.groups import assign_groups, baselines, group_stats, paired_differences, t_interval
from engine.spec import parse_spec
from tests.conftest import tiny_spec


def finished(spec: dict, accuracy: float, *, majority: float = 0.4) -> str:
    """A succeeded run of ``spec`` with this final accuracy (recorded as the worker records it)."""
    run_id = store.create_run(parse_spec(spec).model_dump(mode="json"), executor="inline")
    store.update_run(run_id, trainable_params=100, total_params=1000)
    store.mark_running(run_id, "cpu")
    summary = {"final_metrics": {"eval_accuracy": accuracy}, "majority_rate": majority,
               "timings": {"ms_per_step": 10.0, "peak_rss_mb": 500.0}}  # fmt: skip
    store.finish_run(run_id, "succeeded", summary=summary)
    return run_id


def with_method(spec: dict, method: dict) -> dict:
    return spec | {"method": method}


def frame():
    return runs_frame(store.list_runs(limit=None))


def test_seed_name_experiment_and_resources_do_not_split_a_group_but_lr_does(lab_env):
    for seed, acc in ((0, 0.5), (1, 0.6), (2, 0.7)):  # labels and bookkeeping differ, the configuration does not
        spec = tiny_spec(name=f"try-{seed}", experiment=f"e{seed}", train={"seed": seed, "log_every": 1 + seed},
                         resources={"num_cpus": 1 + seed})  # fmt: skip
        finished(spec, acc)
    grouped = assign_groups(frame())
    assert grouped["group_key"].nunique() == 1
    finished(tiny_spec(name="try-0", train={"lr": 0.01, "seed": 0}), 0.4)
    grouped = assign_groups(frame())
    assert grouped["group_key"].nunique() == 2
    # The same name for two configurations: the label names the field that differs, not the shared name.
    assert {g for g in grouped["group"]} == {"lora · lr=0.001", "lora · lr=0.01"}
    table = group_stats(grouped).set_index("group")
    assert table.loc["lora · lr=0.001", "n"] == 3 and table.loc["lora · lr=0.01", "n"] == 1
    assert table.loc["lora · lr=0.01", "ci_low"] is None or math.isnan(table.loc["lora · lr=0.01", "ci_low"])


def test_confidence_interval_equals_the_hand_computation():
    values = [0.61, 0.58, 0.66, 0.6]
    n, mean, sd = len(values), float(np.mean(values)), float(np.std(values, ddof=1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    interval = t_interval(values)
    assert interval["n"] == 4 and interval["mean"] == pytest.approx(mean) and interval["std"] == pytest.approx(sd)
    assert interval["ci_low"] == pytest.approx(mean - half) and interval["ci_high"] == pytest.approx(mean + half)
    # scipy's own interval for the mean agrees
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(values))
    assert (interval["ci_low"], interval["ci_high"]) == pytest.approx((low, high))
    assert t_interval([0.5])["ci_low"] is None and t_interval([])["n"] == 0


def test_paired_difference_uses_only_the_matching_seeds(lab_env):
    lora = {0: 0.60, 1: 0.64, 2: 0.58, 3: 0.70}  # seed 3 has no partner
    full = {0: 0.55, 1: 0.60, 2: 0.57, 5: 0.20}  # seed 5 has no partner
    for seed, acc in lora.items():
        finished(tiny_spec(name="lora", train={"seed": seed}), acc)
    for seed, acc in full.items():
        finished(with_method(tiny_spec(name="full", train={"seed": seed}), {"name": "full"}), acc)
    pairs = paired_differences(frame())
    assert len(pairs) == 1
    pair = pairs.iloc[0]
    sign = 1 if pair["group_a"] == "lora" else -1
    diffs = [sign * (lora[s] - full[s]) for s in (0, 1, 2)]
    assert pair["seeds"] == [0, 1, 2] and pair["n"] == 3 and (pair["seeds_a"], pair["seeds_b"]) == (4, 4)
    assert pair["mean"] == pytest.approx(np.mean(diffs))
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3)
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert pair["p_value"] == pytest.approx(stats.ttest_rel([lora[s] for s in (0, 1, 2)],
                                                            [full[s] for s in (0, 1, 2)]).pvalue)  # fmt: skip
    # Different evaluation data (another max_eval) is never paired, whatever the seeds.
    finished(tiny_spec(name="other-eval", dataset={"max_eval": 16}, train={"seed": 0}), 0.9)
    assert len(paired_differences(frame())) == 1


def test_baselines_are_the_majority_rate_and_the_linear_probe_of_the_same_model_and_data(lab_env):
    finished(tiny_spec(train={"seed": 0}), 0.6, majority=0.436)
    for seed, acc in ((0, 0.50), (1, 0.54)):
        finished(with_method(tiny_spec(train={"seed": seed}), {"name": "linear_probe"}), acc, majority=0.436)
    finished(with_method(tiny_spec(dataset={"max_eval": 16}), {"name": "linear_probe"}), 0.9, majority=0.5)
    table = baselines(frame())
    assert len(table) == 4  # two evaluation sets, each with both baselines
    values = {(r["baseline"], round(r["value"], 6)) for _, r in table.iterrows()}
    assert values == {("majority class", 0.436), ("linear probe", 0.52), ("majority class", 0.5),
                      ("linear probe", 0.9)}  # fmt: skip


def test_summary_and_metrics_json(lab_env, capsys):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        finished(tiny_spec(name="s", train={"seed": seed}), acc)
    assert main(["summary", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["n"] == 2 and row["seeds"] == [0, 1] and row["mean"] == pytest.approx(0.6)
    half = stats.t.ppf(0.975, 1) * np.std([0.5, 0.7], ddof=1) / math.sqrt(2)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.6 - half, 0.6 + half))
    run_id = row["run_ids"][0]
    store.log_metrics(run_id, [(5, "eval_accuracy", 0.4), (10, "eval_accuracy", 0.5), (5, "train_loss", 1.2)])
    assert main(["metrics", run_id, "--json"]) == 0
    series = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert series == {"eval_accuracy": [[5, 0.4], [10, 0.5]], "train_loss": [[5, 1.2]]}
    assert main(["metrics", "run-nope", "--json"]) == 2
    assert "no run run-nope" in capsys.readouterr().err
