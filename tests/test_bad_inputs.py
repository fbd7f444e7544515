"""Bad input, table-driven: every case of tests/bad_inputs.yaml gets a one-line error that names the thing and the fix,
through the pre-flight API, the command line (in this process, and a sample as a separate process) and the Launch
form, and leaves no run row behind (see the header of the YAML file for the format)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from streamlit.testing.v1 import AppTest

from app.cli import main
from db import config, store
from engine.errors import UserError
from engine.preflight import check
from engine.spec import parse_spec
from tests.conftest import ROOT, tiny_spec

TABLE = yaml.safe_load((Path(__file__).parent / "bad_inputs.yaml").read_text())
CASES = {case["name"]: case for case in TABLE["cases"]}
FORM_CASES = {case["name"]: case for case in TABLE["form_cases"]}
SPEC_CASES = [name for name, case in CASES.items() if "spec" in case]
CLI_CASES = [name for name, case in CASES.items() if not case.get("ray")]
RAY_CASES = [name for name, case in CASES.items() if case.get("ray")]
SUBPROCESS_CASES = [name for name, case in CASES.items() if case.get("subprocess")]


def test_the_table_covers_enough_cases():
    assert len(CASES) >= 60 and len(FORM_CASES) >= 12
    for case in [*CASES.values(), *FORM_CASES.values()]:
        assert case["expect"], case["name"]
    assert all(("spec" in c) != ("argv" in c) and "run_row" in c for c in CASES.values())


def test_the_bundled_models_facts_match_the_models():
    from transformers import AutoConfig

    from engine.models import load_model, minilm_path
    from engine.preflight import BUNDLED_FACTS, _facts, _hf_facts

    for name in ("tiny-bert", "tiny-vit", "tiny-hf-vit", "tiny-llama", "tiny-gpt2"):
        assert _facts(load_model(name, 2), "bundled") == BUNDLED_FACTS[name], name
    assert _hf_facts(AutoConfig.from_pretrained(minilm_path()), "bundled", False) == BUNDLED_FACTS["minilm-l6"]


# --- preparing a case ------------------------------------------------------------------------------


def _fill(value, directory: Path, run_id: str | None = None):
    """``value`` with "{dir}" and "{run}" replaced in every string."""
    if isinstance(value, str):
        return value.replace("{dir}", str(directory)).replace("{run}", run_id or "")
    if isinstance(value, list):
        return [_fill(v, directory, run_id) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, directory, run_id) for k, v in value.items()}
    return value


def write_files(files: dict, directory: Path) -> None:
    for name, content in (files or {}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            path.write_bytes(content["text"].encode(content["encoding"]))
        else:
            path.write_text(content, encoding="utf-8")


def case_spec(case: dict, directory: Path) -> dict:
    """The tiny test spec with the case's overrides (a ``method`` replaces the whole method)."""
    overrides = _fill(case["spec"], directory)
    method = overrides.pop("method", None)
    spec = tiny_spec(**overrides)
    if method is not None:
        spec["method"] = method
    return spec


def set_up_run(kind: str | None) -> str | None:
    """A run for commands that act on one: ``corrupt-adapter`` (succeeded, unreadable adapter) or ``queued``."""
    if kind is None:
        return None
    run_id = store.create_run(parse_spec(tiny_spec()).model_dump(mode="json"), executor="inline")
    if kind == "corrupt-adapter":
        directory = config.run_dir(run_id)
        (directory / "adapter_config.json").write_text(
            '{"method": "lora", "method_config": {"rank": 4}, "model": "tiny-bert", "num_labels": 3}'
        )
        (directory / "adapter.safetensors").write_bytes(b"truncated")
        store.add_artifact(run_id, "adapter_config", directory / "adapter_config.json")
        store.add_artifact(run_id, "adapter", directory / "adapter.safetensors")
        store.finish_run(run_id, "succeeded", summary={"final_metrics": {}})
    return run_id


@pytest.fixture()
def case_dir(lab_env, tmp_path, monkeypatch):
    """A fresh PEFT Lab home without any Ray cluster or hub; returns the case's own directory."""
    import huggingface_hub.constants

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # follow the environment of each case
    directory = tmp_path / "case"
    directory.mkdir()
    return directory


def apply_env(case: dict, monkeypatch) -> None:
    for key, value in (case.get("env") or {}).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def prepare(name: str, directory: Path, monkeypatch) -> tuple[dict, list[str], int]:
    """Write the case's files, set its environment, make its run; returns (case, argv, run rows now)."""
    case = CASES[name]
    write_files(_fill(case.get("files"), directory), directory)
    apply_env(case, monkeypatch)
    run_id = set_up_run(case.get("setup"))
    if "spec" in case:
        (directory / "spec.yaml").write_text(yaml.safe_dump(case_spec(case, directory)))
        argv = ["run", str(directory / "spec.yaml")]
    else:
        argv = _fill(case["argv"], directory, run_id)
    return case, argv, len(store.list_runs(limit=None))


def assert_one_line_error(code: int, err: str, case: dict) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case["expect"] in lines[0], (case["expect"], lines[0])


def assert_run_rows(case: dict, before: int) -> None:
    assert len(store.list_runs(limit=None)) == before == (1 if case["run_row"] else 0)


# --- the pre-flight API ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_CASES)
def test_preflight_api_refuses_with_the_field(name, case_dir, monkeypatch):
    case, _, before = prepare(name, case_dir, monkeypatch)
    with pytest.raises(UserError) as raised:
        check(case_spec(case, case_dir))
    message = str(raised.value)
    assert case["expect"] in message and "\n" not in message, message
    assert_run_rows(case, before)


# --- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_prints_one_line_and_exits_2(name, case_dir, monkeypatch, capsys):
    case, argv, before = prepare(name, case_dir, monkeypatch)
    code = main(argv)
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, case)
    assert_run_rows(case, before)


def test_cli_as_a_separate_process_prints_one_line_without_a_traceback(case_dir, monkeypatch):
    """The sample marked ``subprocess`` through ``python -m app.cli``, all at once."""
    started = []
    for name in SUBPROCESS_CASES:
        directory = case_dir / name
        directory.mkdir()
        case, argv, before = prepare(name, directory, monkeypatch)
        env = dict(os.environ) | {"PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *argv], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        started.append((case, proc, before))
    for case, proc, before in started:
        _, err = proc.communicate(timeout=240)
        assert_one_line_error(proc.returncode, err, case)
        assert len(store.list_runs(limit=None)) == before


# --- the cluster (a real local Ray head) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", RAY_CASES)
def test_cli_refuses_resources_no_node_has(name, ray_lab, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before_all = len(store.list_runs(limit=None))
    case = CASES[name]
    write_files(case.get("files"), tmp_path)
    code = main(_fill(case["argv"], tmp_path))
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, case)
    assert len(store.list_runs(limit=None)) == before_all


@pytest.mark.slow
def test_resources_api_refuses_or_warns_when_the_cluster_autoscales(ray_lab, monkeypatch):
    from engine.preflight import PreflightError
    from jobs.preflight import check_resources

    spec = tiny_spec(resources={"num_gpus": 1})
    with pytest.raises(PreflightError, match=r"resources\.num_gpus: 1 GPU asked.*set resources\.num_gpus: 0"):
        check_resources(spec)
    monkeypatch.setenv("PEFTLAB_CLUSTER_AUTOSCALES", "1")
    (warning,) = check_resources(spec)
    assert "resources.num_gpus" in warning and "will wait" in warning
    assert check_resources(tiny_spec(resources={"num_cpus": 1})) == []


# --- the Launch form -----------------------------------------------------------------------------------

MAIN_SCRIPT = ROOT / "app" / "main.py"
WIDGET_KINDS = ("number_input", "text_input", "selectbox", "multiselect", "checkbox")


def open_launch(clone: str | None = None) -> AppTest:
    at = AppTest.from_file(str(MAIN_SCRIPT), default_timeout=120)
    if clone is not None:
        at.query_params["clone"] = clone
    at.switch_page("views/launch.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def widget(at: AppTest, label: str):
    if label.startswith("key:"):
        key = label.removeprefix("key:")
        return next(w for kind in WIDGET_KINDS for w in getattr(at, kind) if w.key == key)
    matches = [w for kind in WIDGET_KINDS for w in getattr(at, kind) if w.label == label]
    assert len(matches) == 1, f"{len(matches)} widgets labelled {label!r}"
    return matches[0]


def set_widget(at: AppTest, label: str, value) -> None:
    element = widget(at, label)
    if hasattr(element, "options") and value not in element.options:
        value = next(o for o in element.options if str(o).startswith(str(value)))  # "other" → "other (hub id, …)"
    element.set_value(value)


def launch_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.mark.parametrize("name", list(FORM_CASES))
def test_launch_form_disables_launch_and_names_the_field(name, case_dir):
    case = FORM_CASES[name]
    write_files(_fill(case.get("files"), case_dir), case_dir)
    at = open_launch()
    assert not at.button(key="launch").disabled, launch_errors(at)  # the default form is valid
    for step in _fill(case["steps"], case_dir):
        for label, value in step.items():
            set_widget(at, label, value)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.button(key="launch").disabled
    assert any(case["expect"] in e for e in launch_errors(at)), (case["expect"], launch_errors(at))
    assert store.list_runs(limit=None) == []


def test_launch_form_shows_every_seed_and_runspec_defaults(case_dir):
    at = open_launch()
    from engine.spec import RunSpec

    assert widget(at, "learning rate").value == RunSpec().train.lr
    set_widget(at, "seeds", "0-2")
    at.run()
    shown = [yaml.safe_load(code.value) for code in at.expander[-1].code]
    assert [s["train"]["seed"] for s in shown] == [0, 1, 2] and not at.button(key="launch").disabled


def test_clone_prefills_the_form_from_a_stored_run(case_dir):
    spec = parse_spec(tiny_spec(name="r4", train={"lr": 0.003, "seed": 7, "weight_decay": 0.1},
                                method={"name": "lora", "rank": 4, "target_roles": ["q", "k"]}))  # fmt: skip
    run_id = store.create_run(spec.model_dump(mode="json"), executor="inline")
    at = open_launch(clone=run_id)
    assert widget(at, "Model").value == "tiny-bert" and widget(at, "learning rate").value == 0.003
    assert widget(at, "seeds").value == "7" and widget(at, "key:method.lora.rank").value == 4
    shown = parse_spec(yaml.safe_load(at.expander[-1].code[0].value))
    # Fields the form does not show (log_every, num_threads, the run name) are kept; method defaults are spelled out.
    assert shown.model_dump(exclude={"method"}) == spec.model_dump(exclude={"method"})
    assert shown.method_config() == spec.method_config()
    assert not at.button(key="launch").disabled

    at = open_launch(clone="no-such-run")
    assert any("clone: no run no-such-run" in e for e in launch_errors(at))
