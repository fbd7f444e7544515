"""Every recipe under recipes/ parses, and names a model and a dataset that resolve by name (nothing is loaded:
the protocols' data and weights live on the hub or in prepared folders, which tests never reach)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.data import BUNDLED as BUNDLED_DATA
from engine.datasources import looks_like_hub_id
from engine.metrics import task_metrics
from engine.models import BUNDLED as BUNDLED_MODELS
from engine.spec import load_spec
from engine.study import load_study

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RUN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if "studies" not in p.parts)
STUDIES = sorted((RECIPES / "studies").glob("*.yaml"))
GLUE_METRICS = {"cola": "eval_mcc", "sst2": "eval_accuracy", "mrpc": "eval_f1", "qqp": "eval_f1",
                "stsb": "eval_pearson", "mnli": "eval_accuracy", "qnli": "eval_accuracy",
                "rte": "eval_accuracy"}  # fmt: skip


def _model_kind(name: str) -> str:
    import timm

    if name in BUNDLED_MODELS:
        return "bundled"
    if name.startswith("timm/"):
        assert timm.is_model(name.removeprefix("timm/")), f"{name} is not a timm model"
        return "timm"
    assert looks_like_hub_id(name) and name.count("/") == 1, f"{name} is not a hub id (owner/name)"
    return "hub"


@pytest.mark.parametrize("path", RUN_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_and_its_names_resolve(path):
    spec = load_spec(path)
    kind = _model_kind(spec.model)
    ds = spec.dataset
    if ds.name in BUNDLED_DATA:
        return
    if path.parent.name == "vtab-1k":  # a prepared image folder per task, 800/200 images
        assert not looks_like_hub_id(ds.name) and ds.name.startswith("data/vtab-1k/")
        assert (ds.split, ds.eval_split, ds.metric, kind) == ("train800", "val200", "eval_accuracy", "timm")
        return
    assert looks_like_hub_id(ds.name), f"dataset.name {ds.name} is neither bundled, a prepared folder nor a hub id"
    assert ds.eval_split, "a protocol recipe evaluates on the benchmark's own split"
    if path.parent.name == "glue":
        assert ds.name == "nyu-mll/glue" and ds.metric == GLUE_METRICS[ds.config]
        task = "regression" if ds.config == "stsb" else "classification"
        assert ds.task == ("regression" if task == "regression" else "auto")
        assert ds.metric in task_metrics(task, 2)
        assert (ds.text_pair_column is None) == (ds.config in ("cola", "sst2"))
        return
    assert path.parent.name == "commonsense" and ds.task == "multiple_choice" and ds.metric == "eval_accuracy"
    from engine.backends import list_backends

    if "hf-causal-lm" not in list_backends():
        pytest.skip(
            "the model-task check needs a causal-LM backend, which this build does not have yet: the "
            "recipe's names resolve, its model's head is not checked"
        )
    from engine.backends import get_backend

    assert get_backend("hf-causal-lm").modality == "causal-lm"


def test_the_protocols_are_complete():
    names = {p.relative_to(RECIPES).parts[0]: [] for p in RUN_RECIPES if len(p.relative_to(RECIPES).parts) > 1}
    for p in RUN_RECIPES:
        parts = p.relative_to(RECIPES).parts
        if len(parts) > 1:
            names[parts[0]].append(p.stem)
    assert len(names["glue"]) == 8 and len(names["commonsense"]) == 8 and len(names["vtab-1k"]) == 19
    configs = {load_spec(RECIPES / "glue" / f"{n}.yaml").dataset.config for n in names["glue"]}
    assert configs == set(GLUE_METRICS)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_templates_parse_with_every_trial(path):
    study = load_study(path)
    assert study.spec is not None
    if "protocol" in path.name:
        grid = next(iter(study.space.values())).args
        assert len(grid) in (8, 19) and study.seeds == [0, 1, 2]
        assert yaml.safe_load(path.read_text())["base"].startswith("../")


def test_protocol_table_is_the_headline_metric_per_task_and_the_mean_over_tasks():
    from app.protocol import protocol_markdown, protocol_table

    def run(method, config, metric, value, seed, status="succeeded"):
        summary = {"headline_metric": metric, "final_metrics": {metric: value, "eval_accuracy": 0.0}}
        spec = {"dataset": {"name": "nyu-mll/glue", "config": config}}
        return {"method": method, "status": status, "seed": seed, "spec": spec, "summary": summary}

    runs = [run("lora", "cola", "eval_mcc", 0.60, 0), run("lora", "cola", "eval_mcc", 0.62, 1),
            run("lora", "stsb", "eval_pearson", 0.90, 0), run("lora", "stsb", "eval_pearson", 0.5, 1, "failed"),
            run("neat", "cola", "eval_mcc", 0.64, 0)]  # fmt: skip
    tasks, rows = protocol_table(runs)
    assert tasks == ["cola", "stsb"] and [r["method"] for r in rows] == ["lora", "neat"]
    lora, neat = rows
    assert lora["cola"][0] == pytest.approx(61.0) and lora["cola"][2] == 2 and lora["stsb"][:3] == (90.0, 0.0, 1)
    assert lora["mean"] == pytest.approx((61.0 + 90.0) / 2)
    assert neat["stsb"] is None and neat["mean"] != neat["mean"]  # NaN: a task is missing
    lines = protocol_markdown(tasks, rows)
    assert lines[0] == "| method | cola (mcc) | stsb (pearson) | mean |" and "61.0 ± 1.4" in lines[2]
