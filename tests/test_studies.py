"""Studies: the StudySpec grammar (no Ray), and studies run by Ray Tune on a real local Ray head."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from db import store
from db import studies as db_studies
from engine.study import StudyError, apply, count_trials, expand, load_study, parse_study
from jobs.studies import best_trial, study_report, submit_study
from tests.conftest import ROOT, tiny_spec, wait_for

SPACE = {
    "train.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "method.rank": {"choice": [4, 8, 16]},
    "method.name": {"grid": ["lora", "neat", "lily"]},
}


def study(**fields) -> dict:
    return {"name": "s", "spec": tiny_spec()} | fields


# --- the grammar -------------------------------------------------------------------------------------


def test_random_search_draws_each_configuration_once_and_trains_it_on_every_seed():
    s = parse_study(study(space=SPACE, seeds=[0, 1], search="random", num_samples=2))
    trials = expand(s)
    assert count_trials(s) == len(trials) == 2 * 3 * 2  # draws x grid points x seeds
    configs = {json.dumps({k: v for k, v in t.items() if k != "train.seed"}, sort_keys=True) for t in trials}
    assert len(configs) == 6 and sorted(t["train.seed"] for t in trials) == [0] * 6 + [1] * 6
    assert {t["method.name"] for t in trials} == {"lora", "neat", "lily"}
    assert all(1e-4 <= t["train.lr"] <= 1e-2 and t["method.rank"] in (4, 8, 16) for t in trials)
    assert expand(s) == trials  # deterministic for a sample_seed
    assert expand(s.model_copy(update={"sample_seed": 1})) != trials


def test_grid_search_enumerates_choices_too():
    s = parse_study(study(space={"method.rank": {"choice": [4, 8]}, "train.lr": {"grid": [1e-3, 1e-2, 0.1]}}))
    assert count_trials(s) == len(expand(s)) == 6
    assert {(t["method.rank"], t["train.lr"]) for t in expand(s)} == {
        (r, lr) for r in (4, 8) for lr in (1e-3, 1e-2, 0.1)
    }


def test_another_method_keeps_the_base_fields_it_has_and_drops_the_rest():
    base = tiny_spec(method={"name": "dora", "rank": 4, "target_roles": ["q"]})
    out = apply(base, {"method.name": "lora", "method.rank": 8})
    assert out["method"] == {"name": "lora", "rank": 8, "target_roles": ["q"]}
    assert base["method"]["rank"] == 4  # the base is not modified


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"space": {"train.lrr": {"grid": [1]}}}, "space: 'train.lrr' is not a field: train has epochs"),
        ({"space": {"method.rank": {"grid": [0]}}}, "space: the trial method.rank=0, train.seed=0 is not a valid"),
        ({"space": {"train.lr": {"uniform": [2, 1]}}}, "invalid study: space.train.lr: uniform: low 2.0 must be"),
        ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform: both bounds must be positive"),
        ({"space": {"train.lr": {"uniform": [0.1, 0.2], "grid": [1]}}}, "give exactly one of"),
        ({"space": {"train.lr": {"uniform": [1e-4, 1e-2]}}}, "space: train.lr is a range, which a grid cannot"),
        ({"space": {"train.seed": {"grid": [1, 2]}}}, "space: train.seed is set by seeds"),
        ({"space": {"model.x": {"grid": [1]}}}, "space: 'model.x' is not a field: model has no sub-fields"),
        ({"search": "optuna"}, "search: optuna needs a space"),
        ({"seeds": []}, "invalid study: seeds: List should have at least 1 item"),
        ({"scheduler": {"asha": {"reduction_factor": 1}}}, "invalid study: scheduler"),
        ({"space": {"train.lr": {"grid": [1e-3] * 101}}, "seeds": list(range(100))}, "10100 trials, more than"),
    ],
)
def test_bad_studies_are_refused_with_the_field_named(fields, message):
    with pytest.raises(StudyError) as err:
        parse_study(study(**fields))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_optuna_space_is_checked_at_both_bounds_for_every_method(tmp_path):
    with pytest.raises(StudyError, match=r"method.name='lora', train.lr=.*not a valid run"):
        parse_study(
            study(search="optuna", space={"method.name": {"choice": ["lora"]}, "train.lr": {"uniform": [0.5, 2]}})
        )
    assert count_trials(parse_study(study(search="optuna", num_samples=7, space=SPACE))) == 7


def test_a_study_file_names_its_base_relative_to_itself(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_spec()))
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"name": "f", "base": "base.yaml", "space": SPACE, "search": "random"})
    )
    s = load_study(tmp_path / "s.yaml")
    assert s.spec is not None and s.spec["model"] == "tiny-bert" and count_trials(s) == 3


# --- on a real Ray head -------------------------------------------------------------------------------


def _finished(study_id: str):
    row = db_studies.get_study(study_id)
    return row if row["status"] not in ("queued", "running") else None


@pytest.mark.slow
def test_grid_study_runs_every_point_as_a_run_and_reports_the_most_accurate(ray_lab):
    study_id = submit_study(study(space={"train.lr": {"grid": [1e-4, 3e-3, 3e-2]}}, seeds=[0, 1], max_concurrent=2))
    assert wait_for(lambda: _finished(study_id), timeout=600)["status"] == "succeeded"
    trials = db_studies.trial_runs(study_id)
    assert [t["status"] for t in trials] == ["succeeded"] * 6
    assert {(t["trial_params"]["train.lr"], t["trial_params"]["train.seed"]) for t in trials} == {
        (lr, seed) for lr in (1e-4, 3e-3, 3e-2) for seed in (0, 1)
    }
    for t in trials:  # each trial is a run: its spec carries the searched values; metrics and artifacts recorded
        assert t["spec"]["train"]["lr"] == t["trial_params"]["train.lr"] and t["study_id"] == study_id
        assert len(store.get_metrics([t["id"]], keys=["train_loss"])) == 4
        assert {a["kind"] for a in store.list_artifacts(t["id"])} >= {"adapter", "log"}
    best = best_trial(study_id)
    accuracies = {t["id"]: t["summary"]["final_metrics"]["eval_accuracy"] for t in trials}
    assert best["value"] == max(accuracies.values()) == accuracies[best["run_id"]]
    assert best["params"] == next(t["trial_params"] for t in trials if t["id"] == best["run_id"])


@pytest.mark.slow
def test_cancelling_a_study_cancels_its_running_and_queued_trials(ray_lab):
    slow = tiny_spec(dataset={"max_train": 16 * 400}, train={"checkpoint_every_steps": 50})
    study_id = submit_study(study(spec=slow, space={"train.lr": {"grid": [1e-3, 2e-3, 3e-3, 4e-3]}}, max_concurrent=1))
    first = db_studies.trial_id(study_id, 0)
    wait_for(lambda: store.get_run(first)["status"] == "running" and store.get_metrics([first])["step"].max() > 5)
    out = subprocess.run([sys.executable, "-m", "app.cli", "study", "cancel", study_id], cwd=ROOT, text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_for(lambda: _finished(study_id), timeout=120)
    trials = db_studies.trial_runs(study_id)
    assert [t["status"] for t in trials] == ["cancelled"] * 4, [(t["status"], t["error"]) for t in trials]
    assert db_studies.get_study(study_id)["status"] == "cancelled"
    time.sleep(3)  # the stopped worker records nothing after the cancel
    assert store.get_run(first)["status"] == "cancelled" and store.get_metrics([first])["step"].max() < 400


@pytest.mark.slow
def test_asha_stops_the_poor_learning_rates_early_and_keeps_their_metrics(ray_lab):
    """MiniLM on tweets: lr 3e-3 learns within a few steps, lr 1e-7 does not. The good trials run first, so ASHA's
    first rung has their values when the poor ones arrive."""
    spec = tiny_spec(model="minilm-l6", dataset={"max_train": 160, "max_eval": 64, "max_length": 24},
                     train={"evals_per_epoch": 5, "log_every": 2})  # fmt: skip
    asha = {"asha": {"metric": "eval_loss", "mode": "min", "grace_evals": 1, "reduction_factor": 2}}
    study_id = submit_study(study(spec=spec, space={"train.lr": {"grid": [3e-3, 2e-3, 1e-7, 2e-7]}},
                                  metric="eval_loss", mode="min", scheduler=asha, max_concurrent=2))  # fmt: skip
    assert wait_for(lambda: _finished(study_id), timeout=600)["status"] == "succeeded"
    trials = {t["trial_params"]["train.lr"]: t for t in db_studies.trial_runs(study_id)}
    for lr in (1e-7, 2e-7):
        poor = trials[lr]
        assert poor["status"] == "stopped" and poor["error"].startswith("stopped early by ASHA after"), poor["error"]
        evals = store.get_metrics([poor["id"]], keys=["eval_loss"])
        assert 1 <= len(evals) < 5 and math.isfinite(evals["value"].iloc[-1])  # kept, up to where it stopped
    assert (
        trials[3e-3]["status"] == "succeeded" and len(store.get_metrics([trials[3e-3]["id"]], keys=["eval_loss"])) == 5
    )
    report = study_report(study_id)
    assert report["counts"]["stopped"] >= 2 and report["best"]["params"]["train.lr"] in (3e-3, 2e-3)


def _trial(index: int, status: str, lr: float, accuracy: float | None) -> dict:
    final = {} if accuracy is None else {"eval_accuracy": accuracy}
    return {"id": f"study-x-t{index:03d}", "status": status, "summary": {"final_metrics": final}, "progress": 1.0,
            "error": None, "trial_params": {"train.lr": lr, "train.seed": 0}}  # fmt: skip


def test_study_views_plot_the_fields_trials_differ_in_and_grey_the_stopped():
    from app.study_view import parallel_coordinates, sensitivity, trials_table

    trials = [_trial(0, "succeeded", 1e-4, 0.41), _trial(1, "stopped", 1e-3, 0.35), _trial(2, "succeeded", 1e-2, 0.55),
              _trial(3, "running", 3e-3, None)]  # fmt: skip
    table = trials_table(trials, "eval_accuracy")
    assert table["trial"].tolist() == [0, 1, 2, 3] and pd.isna(table.loc[3, "eval_accuracy"])
    dims = parallel_coordinates(table, "eval_accuracy").data[0].dimensions
    assert [d.label for d in dims] == ["log10 train.lr", "eval_accuracy"]  # one seed only: no seed axis
    assert list(dims[0].values) == pytest.approx([-4, -3, -2])  # the running trial has no metric yet
    (fig,) = sensitivity(table, "eval_accuracy")
    assert fig.layout.xaxis.type == "log"
    by_name = {trace.name: list(trace.y) for trace in fig.data}
    assert by_name == {"finished": [0.41, 0.55], "stopped early": [0.35]}


@pytest.mark.slow
def test_optuna_search_records_each_proposal_as_a_trial_run_within_the_space(ray_lab):
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "method.rank": {"choice": [2, 4]}}
    study_id = submit_study(study(space=space, search="optuna", num_samples=4, max_concurrent=2, sample_seed=3))
    assert wait_for(lambda: _finished(study_id), timeout=600)["status"] == "succeeded"
    trials = db_studies.trial_runs(study_id)
    assert len(trials) == 4 and [t["status"] for t in trials] == ["succeeded"] * 4
    assert len({t["id"] for t in trials}) == 4  # one run per proposal, numbered by Tune's trial index
    for t in trials:  # Optuna's proposal is the trial's spec, inside the space
        lr, rank = t["trial_params"]["train.lr"], t["trial_params"]["method.rank"]
        assert 1e-4 <= lr <= 1e-2 and rank in (2, 4)
        assert t["spec"]["train"]["lr"] == lr and t["spec"]["method"]["rank"] == rank
    assert best_trial(study_id)["run_id"] in {t["id"] for t in trials}
