"""RunSpec drives every entry point: the flags of ``app.cli run``/``submit`` and the Launch form are generated from its
fields, so each field is reachable from both with RunSpec's default; flags beat the spec file; a bad flag is one line
that names it; the command line never imports Streamlit; Launch's Study mode counts trials and refuses a bad space."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from streamlit.testing.v1 import AppTest

from app.cli import main
from app.spec_args import build_spec_parser, spec_from_args
from db import config, store
from engine.spec import RunSpec, field_default, read_spec_file, spec_fields
from tests.conftest import ROOT, tiny_spec

MAIN_SCRIPT = ROOT / "app" / "main.py"
WIDGET_KINDS = ("number_input", "text_input", "selectbox", "multiselect", "checkbox")


@pytest.fixture()
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(experiment="from-file", train={"lr": 0.01, "epochs": 2})))
    return path


# --- RunSpec's fields ------------------------------------------------------------------------------


def test_spec_fields_are_the_leaves_of_runspec_with_their_defaults():
    fields = {f.path: f for f in spec_fields()}
    assert {
        "model",
        "dataset.text_column",
        "method.name",
        "train.lr",
        "train.warmup_ratio",
        "resources.num_gpus",
    } <= set(fields)
    assert not any(path in fields for path in ("dataset", "train", "method", "resources"))  # only leaves
    defaults = RunSpec().model_dump()
    for path, field in fields.items():
        node = defaults
        for part in path.split("."):
            node = node[part]
        assert field.default == node == field_default(path), path
        assert field.description and field.section in ("model", "data", "method", "training", "resources"), path


def test_read_spec_file_reads_json_and_names_a_bad_file(tmp_path):
    good = tmp_path / "spec.json"
    good.write_text('{"model": "tiny-bert", "train": {"lr": 0.002}}')
    assert read_spec_file(good) == {"model": "tiny-bert", "train": {"lr": 0.002}}
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    with pytest.raises(Exception, match=r"bad\.json is not valid JSON") as raised:
        read_spec_file(bad)
    assert "\n" not in str(raised.value)


# --- the command line ------------------------------------------------------------------------------


def test_cli_flags_cover_every_runspec_leaf_field():
    for command in ("run", "submit"):
        text = build_spec_parser(command).format_help()
        missing = [f.path for f in spec_fields() if f"--{f.path}" not in text]
        assert not missing, (command, missing)
        assert "--config" in text and "--method.KEY" in text


def test_override_beats_config_file_whatever_the_order(spec_file):
    spec, options = spec_from_args(
        "run", ["--train.lr", "3e-4", "--config", str(spec_file), "--method.rank", "8", "--dataset.max_train", "null",
                "--train.schedule=cosine", "--seeds", "0", "1", "--json"],
    )  # fmt: skip
    assert spec.train.lr == 3e-4 and spec.method_config().rank == 8 and spec.dataset.max_train is None
    assert spec.train.schedule == "cosine" and options.seeds == [0, 1] and options.json
    assert spec.experiment == "from-file" and spec.train.epochs == 2  # the file's values where no flag is given
    positional, _ = spec_from_args("submit", [str(spec_file), "--method.r", "2"])
    assert positional.train.lr == 0.01 and positional.method.params == {"r": 2} and positional.method_config().rank == 2
    bare, _ = spec_from_args("run", ["--model", "tiny-bert"])
    assert bare.model == "tiny-bert" and bare.train.lr == field_default("train.lr")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--train.lr", "abc"], "--train.lr 'abc': expected a number"),
        (["--train.lr", "0"], "--train.lr: Input should be greater than 0"),
        (["--train.schedule", "cubic"], "--train.schedule 'cubic': expected one of linear, cosine, constant"),
        (["--dataset.max_train", "many"], "--dataset.max_train 'many': expected an integer or null"),
        (["--method.rank", "0"], "--method.rank: Input should be greater than or equal to 1"),
        (["--method.rank"], "--method.rank needs a value"),
        (["--train.lrr", "1"], "unrecognized arguments: --train.lrr"),
    ],
)
def test_bad_flag_is_one_line_naming_it_with_exit_code_2(flags, named, spec_file, lab_env, capsys):
    code = main(["run", "--config", str(spec_file), *flags])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert store.list_runs(limit=None) == []


def test_bad_flag_as_a_separate_process(spec_file, lab_env):
    env = dict(os.environ) | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", "--config", str(spec_file), "--train.epochs", "x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --train.epochs 'x': expected an integer"]


def test_app_cli_imports_no_streamlit():
    code = "import app.cli, app.summary, sys; assert 'streamlit' not in sys.modules, 'streamlit imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ) | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr


# --- the Launch form -------------------------------------------------------------------------------


def open_launch() -> AppTest:
    at = AppTest.from_file(str(MAIN_SCRIPT), default_timeout=120)
    at.switch_page("views/launch.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def widget_by_key(at: AppTest, key: str):
    found = [w for kind in WIDGET_KINDS for w in getattr(at, kind) if w.key == key]
    assert len(found) == 1, f"{len(found)} widgets keyed {key!r}"
    return found[0]


def shown(path: str, default):
    """A default as its widget shows it: several methods and seeds, 0 for an optional number, text for the rest."""
    if path == "method.name":
        return [default]
    if path == "train.seed":
        return str(default)
    if default is None:
        field = next(f for f in spec_fields() if f.path == path)
        return "" if "str" in str(field.annotation) else 0
    if isinstance(default, list):
        return ", ".join(default)
    if isinstance(default, dict):
        return ""
    return default


@pytest.fixture()
def offline_lab(lab_env, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config.home()
    return lab_env


def test_form_has_a_widget_for_every_field_with_runspecs_default(offline_lab):
    at = open_launch()
    for field in spec_fields():
        assert widget_by_key(at, field.path).value == shown(field.path, field.default), field.path
    assert widget_by_key(at, "train.lr").label == "learning rate" and widget_by_key(at, "train.lr").value == 5e-4
    assert not at.button(key="launch").disabled, [e.value for e in at.error]
    preview = RunSpec.model_validate(yaml.safe_load(at.expander[-1].code[0].value))
    assert preview.model_dump(exclude={"name", "method"}) == RunSpec().model_dump(exclude={"name", "method"})
    assert preview.method_config() == RunSpec().method_config()  # the form spells the method's defaults out


def test_study_mode_counts_trials_and_refuses_an_invalid_space(offline_lab):
    from engine.study import count_trials, parse_study

    at = open_launch()
    at.radio(key="launch_mode").set_value("Study").run()
    assert not at.exception and at.text_area(key="study_yaml").value
    assert at.success[0].value.startswith("6 trials · grid search")  # 3 learning rates × 2 seeds
    submitted = parse_study(yaml.safe_load(at.expander[-1].code[0].value))
    assert count_trials(submitted) == 6 and submitted.space["train.lr"].args == [1.0e-4, 3.0e-3, 3.0e-2]
    assert at.button(key="launch_study")

    bad = yaml.safe_load(at.text_area(key="study_yaml").value)
    bad["space"] = {"train.learning_rate": {"grid": [0.1, 0.2]}}
    at.text_area(key="study_yaml").set_value(yaml.safe_dump(bad)).run()
    assert not at.exception and not at.success
    assert len(at.error) == 1 and "train.learning_rate" in at.error[0].value
    assert not [b for b in at.button if b.key == "launch_study"]  # refused before anything can run
    assert store.list_runs(limit=None) == []
