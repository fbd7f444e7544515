"""The Launch form's causal-LM task and Run detail's generations panel, under Streamlit's AppTest."""

from __future__ import annotations

import json

from app.generations import generations_table
from db import config, store
from engine.spec import parse_spec
from tests.conftest import tiny_spec
from tests.test_app_pages import by_label, offline_lab, open_page  # noqa: F401  (offline_lab: a fixture)


def test_launch_offers_the_causal_lm_task(offline_lab):  # noqa: F811
    at = open_page("launch")
    task = by_label(at.radio, "Task")
    assert "classification" in task.options and "causal LM (instruction tuning)" in task.options
    names = lambda label: [o.split(":")[0] for o in by_label(at.selectbox, label).options]  # noqa: E731
    assert "tiny-llama" not in names("Model") and "tweets-instruct" not in names("Dataset")
    task.set_value("causal LM (instruction tuning)")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [m for m in names("Model") if m.startswith("tiny")] == ["tiny-llama", "tiny-gpt2"]
    assert by_label(at.selectbox, "Model").value == "tiny-llama"
    assert by_label(at.selectbox, "Dataset").value == "tweets-instruct"
    assert "tweets-sentiment" not in names("Dataset")


def test_run_detail_shows_base_and_adapted_generations(offline_lab):  # noqa: F811
    spec = parse_spec(tiny_spec(model="tiny-llama", dataset={"name": "tweets-instruct"})).model_dump(mode="json")
    run_id = store.create_run(spec, executor="ray")
    store.mark_running(run_id, "cpu")
    assert store.finish_run(run_id, "succeeded", summary={"final_metrics": {"eval_accuracy": 0.5}})
    data = {"rows": [{"prompt": "Tweet: hi\n", "base": "zebra", "adapted": "positive"}], "max_new_tokens": 16}
    path = config.run_dir(run_id) / "generations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    store.add_artifact(run_id, "generations", path)
    at = open_page("run_detail", run=run_id)
    assert any(s.value.startswith("Generations: base vs adapted") for s in at.subheader)
    tables = [df.value for df in at.dataframe if list(df.value.columns) == ["prompt", "base", "adapted"]]
    assert len(tables) == 1 and tables[0].iloc[0].tolist() == ["Tweet: hi\n", "zebra", "positive"]
    assert generations_table(data).shape == (1, 3)
