"""Launch: choose a model, a dataset, methods with their hyper-parameters, seeds and resources; submit.

Every field is validated live (the RunSpec, then pre-flight of the model, the dataset and the cluster's nodes, cached
by their inputs); Launch stays disabled while anything is invalid, and the error names the field. ``?clone=RUN_ID``
starts the form from that run's stored spec.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import streamlit as st

from app.common import cluster_status, config_form, parse_seeds
from db import store
from engine import preflight
from engine.data import BUNDLED as DATASETS
from engine.errors import UserError
from engine.methods import get_method, method_names
from engine.models import BUNDLED as MODELS
from engine.spec import DatasetSpec, ResourcesSpec, RunSpec, SpecError, TrainSpec, parse_spec

st.title("🚀 Launch runs")
ok, address = cluster_status()
if not ok:
    st.warning(f"Ray is not reachable ({address}). Start the app with ./run_app.sh or set RAY_ADDRESS.")


def field_defaults(model_cls) -> dict[str, Any]:
    return {name: f.get_default(call_default_factory=True) for name, f in model_cls.model_fields.items()}


def cloned_spec() -> dict[str, Any]:
    """The stored spec of the run named by ``?clone=RUN_ID``: the form starts from it (empty without one)."""
    run_id = st.query_params.get("clone")
    if not run_id:
        return {}
    run = store.get_run(run_id)
    if run is None:
        st.error(f"clone: no run {run_id} in the database; pick a run on the Runs page")
        return {}
    st.info(f"Cloned from run {run_id}: the form starts from its spec, and fields the form does not show are kept.")
    return run["spec"]


clone = cloned_spec()
start_data = field_defaults(DatasetSpec) | clone.get("dataset", {})
start_train = field_defaults(TrainSpec) | clone.get("train", {})
start_res = field_defaults(ResourcesSpec) | clone.get("resources", {})
start_method = clone.get("method", {})
start_model = clone.get("model", RunSpec.model_fields["model"].default)

CUSTOM = "other (hub id, local directory or timm/<name>)"
SCHEDULES = ["linear", "cosine", "constant"]
left, right = st.columns(2)
with left:
    st.subheader("Model and data")
    model_options = [*MODELS, CUSTOM]
    model_choice = st.selectbox(
        "Model", model_options, index=model_options.index(start_model if start_model in MODELS else CUSTOM),
        format_func=lambda m: m if m == CUSTOM else f"{m}: {MODELS[m]}",
    )  # fmt: skip
    custom_model = "" if start_model in MODELS else start_model
    model = (
        st.text_input("Model name or path", custom_model, key="custom_model").strip()
        if model_choice == CUSTOM
        else model_choice
    )
    trust_remote_code = st.checkbox(
        "trust_remote_code", value=bool(clone.get("trust_remote_code", False)),
        help="Run code shipped with a hub model (off by default)",
    )  # fmt: skip
    data_options = [*DATASETS, "file"]
    data_start = start_data["name"]
    data_choice = st.selectbox(
        "Dataset", data_options, index=data_options.index(data_start if data_start in DATASETS else "file"),
        format_func=lambda d: d if d == "file" else f"{d}: {DATASETS[d]}",
    )  # fmt: skip
    text_column, label_column = start_data["text_column"], start_data["label_column"]
    if data_choice == "file":
        dataset = st.text_input("CSV/JSONL path", "" if data_start in DATASETS else data_start, key="data_path")
        c1, c2 = st.columns(2)
        text_column = c1.text_input("text column", text_column)
        label_column = c2.text_input("label column", label_column, help="integer class ids or class names")
    else:
        dataset = data_choice
    c1, c2, c3 = st.columns(3)
    max_train = c1.number_input("max train examples", value=int(start_data["max_train"] or 0), step=100,
                                help="0: all")  # fmt: skip
    max_eval = c2.number_input("max eval examples", value=int(start_data["max_eval"] or 0), step=100, help="0: all")
    max_length = c3.number_input("max sequence length", value=int(start_data["max_length"]), step=8)

with right:
    st.subheader("Training")
    c1, c2, c3 = st.columns(3)
    lr = c1.number_input("learning rate", value=float(start_train["lr"]), step=1e-4, format="%.6g")
    epochs = c2.number_input("epochs", value=int(start_train["epochs"]), step=1)
    max_steps = c3.number_input("max steps (0: by epochs)", value=int(start_train["max_steps"] or 0), step=10)
    c1, c2, c3 = st.columns(3)
    batch_size = c1.number_input("batch size", value=int(start_train["batch_size"]), step=1)
    seeds_text = c2.text_input("seeds", str(start_train["seed"]), help="'0', '0, 1, 2' or '0-4': one run per seed")
    experiment = c3.text_input("experiment", clone.get("experiment", "default"))
    c1, c2, c3 = st.columns(3)
    weight_decay = c1.number_input("weight decay", value=float(start_train["weight_decay"]), step=0.01,
                                   format="%.6g", help="AdamW's decoupled weight decay (0 to 1)")  # fmt: skip
    warmup_ratio = c2.number_input("warm-up ratio", value=float(start_train["warmup_ratio"]), step=0.01,
                                   format="%.6g", help="share of the steps with a rising learning rate")  # fmt: skip
    schedule = c3.selectbox("schedule", SCHEDULES, index=SCHEDULES.index(start_train["schedule"]))
    c1, c2, c3 = st.columns(3)
    evals_per_epoch = c1.number_input("evaluations per epoch", value=int(start_train["evals_per_epoch"]), step=1)
    grad_clip = c2.number_input("gradient clipping (0: off)", value=float(start_train["grad_clip"] or 0.0),
                                step=0.5, format="%.6g", help="clip the gradient norm at this value")  # fmt: skip
    tags = c3.text_input("tags (comma separated)", ", ".join(clone.get("tags", [])))
    c1, c2, _ = st.columns(3)
    num_cpus = c1.number_input("CPUs per run", value=float(start_res["num_cpus"]), step=1.0)
    num_gpus = c2.number_input("GPUs per run", value=float(start_res["num_gpus"]), step=1.0)

st.subheader("Methods")
chosen = st.multiselect("PEFT methods", method_names(), default=[start_method.get("name", "lora")], key="methods")
method_params: dict[str, dict] = {}
for name in chosen:
    cls = get_method(name)
    with st.expander(f"{name}: {cls.summary}", expanded=len(chosen) == 1):
        st.caption(cls.paper)
        initial = {k: v for k, v in start_method.items() if k != "name"} if name == start_method.get("name") else None
        method_params[name] = config_form(cls.config_cls, key_prefix=f"method.{name}", initial=initial)


def build_specs() -> list[dict]:
    """One RunSpec dict per chosen method: the cloned spec (if any) with the form's values on top."""
    base = copy.deepcopy(clone)
    base.pop("name", None)
    base |= {
        "experiment": experiment or "default",
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
        "model": model,
        "trust_remote_code": trust_remote_code,
    }
    base["dataset"] = base.get("dataset", {}) | {
        "name": dataset,
        "max_train": int(max_train) or None,
        "max_eval": int(max_eval) or None,
        "max_length": int(max_length),
        "text_column": text_column,
        "label_column": label_column,
    }
    base["train"] = base.get("train", {}) | {
        "epochs": int(epochs),
        "max_steps": int(max_steps) or None,
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "warmup_ratio": float(warmup_ratio),
        "schedule": schedule,
        "evals_per_epoch": int(evals_per_epoch),
        "grad_clip": float(grad_clip) or None,
    }
    base["resources"] = base.get("resources", {}) | {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}
    same_method = {start_method.get("name"): clone.get("name")}
    return [
        base | {"name": same_method.get(name) or name, "method": {"name": name, **params}}
        for name, params in method_params.items()
    ]


# --- validation: every field, live; Launch stays disabled while anything is invalid ----------------


@st.cache_data(ttl=60, show_spinner="Checking the model…")
def model_problem(name: str, trust: bool, options: str) -> str | None:
    """The model's pre-flight error (config only, never weights), or None."""
    try:
        preflight.model_facts(name, trust, tuple(tuple(pair) for pair in json.loads(options)))
    except UserError as err:
        return str(err)
    return None


@st.cache_data(ttl=60, show_spinner="Checking the dataset…")
def dataset_problem(name: str, text_col: str, label_col: str, _stamp: tuple | None) -> str | None:
    """The dataset's pre-flight error, or None; ``_stamp`` (size, mtime) re-reads a file that changed."""
    try:
        preflight.dataset_facts(DatasetSpec(name=name, text_column=text_col, label_column=label_col))
    except UserError as err:
        return str(err)
    return None


@st.cache_data(ttl=15, show_spinner="Checking the cluster's nodes…")
def resources_check(cpus: float, gpus: float) -> tuple[list[str], str | None]:
    """(warnings, error) of these resources against the cluster's nodes."""
    from jobs.preflight import check_fit

    try:
        return check_fit(cpus, gpus), None
    except UserError as err:
        return [], str(err)


def file_stamp(name: str) -> tuple | None:
    path = Path(name)
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None


problems: list[str] = []
warnings: list[str] = []
try:
    seeds = parse_seeds(seeds_text)
except ValueError as err:
    problems.append(str(err))
    seeds = []
if not model:
    problems.append("model: enter a hub id, a local directory or timm/<name>")
if not chosen:
    problems.append("method: choose at least one PEFT method")
if data_choice == "file" and not dataset.strip():
    problems.append("dataset.name: enter the path of a .csv or .jsonl file")
specs: list[RunSpec] = []
for raw in build_specs() if model else []:
    try:
        specs.append(parse_spec(raw))
    except SpecError as err:
        problems.append(f"{raw['method']['name']}: {err}" if len(chosen) > 1 else str(err))
if model:
    options = json.dumps(sorted([k, repr(v)] for k, v in clone.get("model_options", {}).items()))
    problems.append(model_problem(model, trust_remote_code, options))
if dataset.strip():
    problems.append(dataset_problem(dataset, text_column, label_column, file_stamp(dataset)))
problems = [p for p in problems if p]
if not problems:
    for spec in specs:  # modality, target roles: the model and the dataset are cached by now
        try:
            warnings += preflight.check(spec)
        except UserError as err:
            problems.append(f"{spec.method.name}: {err}" if len(chosen) > 1 else str(err))
if ok and not problems:
    found, problem = resources_check(float(num_cpus), float(num_gpus))
    warnings += found
    problems += [problem] if problem else []

for problem in dict.fromkeys(problems):
    st.error(problem)
for warning in dict.fromkeys(warnings):
    st.warning(warning)
clicked = st.button("Launch", type="primary", disabled=bool(problems), key="launch",
                    help="Fix the errors above first" if problems else None)  # fmt: skip
if clicked and not problems:
    from jobs.runs import submit_seeds

    launched = []
    for spec in specs:
        try:
            launched += submit_seeds(spec, seeds)
        except UserError as err:
            st.error(f"{spec.method.name}: {err}")
        except Exception as err:  # noqa: BLE001 - the run row keeps the reason
            st.error(f"{spec.method.name}: submission failed: {err}")
    if launched:
        st.success(f"Launched {len(launched)} run(s): " + ", ".join(launched))
        st.page_link("pages/runs.py", label="Watch them on the Runs page", icon="📋")

with st.expander("RunSpec YAML of this form (one per method and seed)"):
    if problems:
        st.caption("Fix the errors above; only the methods whose spec is valid are shown.")
    for spec in specs:
        for seed in seeds or [spec.train.seed]:
            st.code(spec.with_seed(seed).to_yaml(), language="yaml")
