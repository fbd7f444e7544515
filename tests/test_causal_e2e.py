"""tiny-llama on tweets-instruct through the normal run path: ``app.cli run`` in process and a Ray job; the run
records LM metrics and the base-vs-adapted generations that Run detail shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db import store
from jobs.runs import submit_run
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.slow

LM = {
    "model": "tiny-llama",
    "dataset": {"name": "tweets-instruct", "max_train": 16, "max_eval": 6, "max_length": 40},
    "train": {"max_steps": 2, "batch_size": 8, "lr": 0.005, "log_every": 1, "num_threads": 1},
}


def _check_run(run_id: str) -> None:
    run = store.get_run(run_id)
    assert run["status"] == "succeeded", run["error"]
    keys = set(store.get_metrics([run_id])["key"])
    assert {"train_loss", "eval_loss", "perplexity", "eval_accuracy"} <= keys
    kinds = {a["kind"]: a for a in store.list_artifacts(run_id)}
    assert {"adapter", "generations"} <= set(kinds)
    rows = json.loads(Path(kinds["generations"]["path"]).read_text())["rows"]
    assert len(rows) == 4 and all({"prompt", "base", "adapted"} <= set(r) for r in rows)
    assert all("### Response:" in r["prompt"] for r in rows)


def test_cli_run_trains_tiny_llama_on_tweets_instruct(lab_env, tmp_path, capsys):
    from app.cli import main

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec(**LM)))
    assert main(["run", "--config", str(spec_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["final_metrics"]["eval_loss"] > 0 and 0 <= out["final_metrics"]["eval_accuracy"] <= 1
    _check_run(out["run_id"])


def test_ray_job_trains_tiny_llama_on_tweets_instruct(ray_lab):
    run_id = submit_run(tiny_spec(**LM))
    wait_for(lambda: store.get_run(run_id)["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
    _check_run(run_id)
