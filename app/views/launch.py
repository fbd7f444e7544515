"""Launch: a model, a dataset, methods with their hyper-parameters, seeds and resources; submit. Or, in Study mode,
a search over RunSpec fields (the Studies page's form).

The form is generated from RunSpec (app/spec_form.py): every field, RunSpec's defaults, common fields first and the
advanced ones in each section's expander. Every field is validated live (the RunSpec, then pre-flight of the model,
the dataset and the cluster's nodes, cached by their inputs); Launch stays disabled while anything is invalid, and
the error names the field. ``?clone=RUN_ID`` starts the form from that run's stored spec.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import streamlit as st
import yaml

from app.common import cluster_status, config_form
from app.spec_form import section_form, start_values
from app.study_form import study_form
from db import store
from engine import preflight
from engine.data import READ_FIELDS, source_stamp
from engine.errors import UserError
from engine.methods import get_method
from engine.spec import DatasetSpec, RunSpec, SpecError, parse_spec, spec_fields

st.title("Launch runs")
ok, address = cluster_status()
if not ok:
    st.warning(f"Ray is not reachable ({address}). Start the app with ./run_app.sh or set RAY_ADDRESS.")

if st.radio("Mode", ["Single runs", "Study"], horizontal=True, key="launch_mode") == "Study":
    st.caption("A search over RunSpec fields: one run per trial (see recipes/studies/ for the YAML).")
    study_id = study_form(show_yaml=True)
    if study_id:
        st.success(f"Launched study {study_id}")
        st.page_link("views/study.py", label="Follow it on the Studies page", icon=":material/science:")
    st.stop()


def cloned_spec() -> dict[str, Any]:
    """The stored spec of the run named by ``?clone=RUN_ID``: the form starts from it (empty without one)."""
    run_id = st.query_params.get("clone")
    if not run_id:
        return {}
    run = store.get_run(run_id)
    if run is None:
        st.error(f"clone: no run {run_id} in the database; pick a run on the Runs page")
        return {}
    st.info(f"Cloned from run {run_id}: the form starts from its spec.")
    return run["spec"]


def yaml_source() -> None:
    """Paste or upload a RunSpec YAML: "Fill the form" validates it (the error names the field) and restarts every
    field of the form from it."""
    with st.expander("Paste or upload a RunSpec YAML to fill the form", icon=":material/upload_file:"):
        uploaded = st.file_uploader("RunSpec YAML file", type=["yaml", "yml"], key="yaml_file")
        example = "model: minilm-l6\ndataset: {name: tweets-sentiment}\nmethod: {name: lora}"
        text = st.text_area("or paste it here", height=140, key="yaml_text", placeholder=example)
        source = uploaded.getvalue().decode("utf-8", errors="replace") if uploaded is not None else text
        if st.button("Fill the form", key="yaml_fill"):
            if not source.strip():
                st.error("RunSpec YAML: paste one above or upload a file first")
                return
            try:
                spec = parse_spec(yaml.safe_load(source) or {})
            except SpecError as err:
                st.error(str(err))
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                line = f" (line {where.line + 1})" if where is not None else ""
                st.error(f"RunSpec YAML{line}: not valid YAML; fix it and press Fill the form again")
            else:
                roots = {f.path.split(".")[0] for f in spec_fields()} | {"custom_model", "data_path"}
                for key in [k for k in st.session_state if str(k).split(".")[0] in roots]:
                    del st.session_state[key]  # every field starts again, from the YAML
                st.session_state["yaml_spec"] = spec.model_dump(mode="json")
                st.rerun()
    if "yaml_spec" in st.session_state:
        st.info("The form starts from the RunSpec YAML you gave; change any field below.")


yaml_source()
clone = st.session_state.get("yaml_spec") or cloned_spec()
start = start_values(clone)
start_method = clone.get("method", {})
problems: list[str] = []
values: dict[str, Any] = {}
left, right = st.columns(2)
with left:
    st.subheader("Model")
    values |= section_form("model", start, problems)
    st.subheader("Data")
    values |= section_form("data", start, problems)
with right:
    st.subheader("Training")
    values |= section_form("training", start, problems)
    st.subheader("Resources")
    values |= section_form("resources", start, problems)

st.subheader("Methods")
values |= section_form("method", start, problems)
chosen: list[str] = values.pop("method.name")
seeds: list[int] = values.pop("train.seed")
run_name = values.pop("name")
method_params: dict[str, dict] = {}
for name in chosen:
    cls = get_method(name)
    with st.expander(f"{name}: {cls.summary}", expanded=True):
        st.caption(cls.paper)
        initial = {k: v for k, v in start_method.items() if k != "name"} if name == start_method.get("name") else None
        method_params[name] = config_form(cls.config_cls, key_prefix=f"method.{name}", initial=initial)
model, dataset = values["model"], values["dataset.name"]


def build_specs() -> list[dict]:
    """One RunSpec dict per chosen method: the form's fields (the cloned spec underneath, for keys RunSpec does not
    declare). The run name, when given, names the run of one method, or prefixes each method's name."""
    from app.spec_form import nest

    base = copy.deepcopy(clone)
    for key, value in nest(values).items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) and key != "model_options" else value
    base["train"] = base["train"] | {"seed": seeds[0] if seeds else start["train.seed"]}

    def named(method: str) -> str:
        return (run_name if len(chosen) == 1 else f"{run_name}-{method}") if run_name else method

    return [base | {"name": named(m), "method": {"name": m, **params}} for m, params in method_params.items()]


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
def dataset_problem(dataset_json: str, _stamp: tuple | None) -> str | None:
    """The dataset's pre-flight error, or None; ``_stamp`` (a local source's version) re-reads one that changed."""
    try:
        preflight.dataset_facts(DatasetSpec.model_validate_json(dataset_json))
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


warnings: list[str] = []
specs: list[RunSpec] = []
for raw in build_specs() if model else []:
    try:
        specs.append(parse_spec(raw))
    except SpecError as err:
        problems.append(f"{raw['method']['name']}: {err}" if len(chosen) > 1 else str(err))
if model:
    options = json.dumps(sorted([k, repr(v)] for k, v in values["model_options"].items()))
    problems.append(model_problem(model, values["trust_remote_code"], options))
if dataset.strip():
    fields = {k.removeprefix("dataset."): v for k, v in values.items() if k.removeprefix("dataset.") in READ_FIELDS}
    try:
        dataset_json: str | None = DatasetSpec(**fields).model_dump_json()
    except ValueError:  # a field the RunSpec refuses: parse_spec names it
        dataset_json = None
    if dataset_json is not None:
        problems.append(dataset_problem(dataset_json, source_stamp(dataset)))
problems = [p for p in problems if p]
if not problems:
    for spec in specs:  # modality, target roles: the model and the dataset are cached by now
        try:
            warnings += preflight.check(spec)
        except UserError as err:
            problems.append(f"{spec.method.name}: {err}" if len(chosen) > 1 else str(err))
if ok and not problems:
    found, problem = resources_check(float(values["resources.num_cpus"]), float(values["resources.num_gpus"]))
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
        st.page_link("views/runs.py", label="Watch them on the Runs page", icon=":material/table_rows:")

planned = [(spec, seed) for spec in specs for seed in seeds or [spec.train.seed]]
with st.expander(f"RunSpec YAML of the {len(planned)} run(s) Launch will create (one per method and seed)"):
    if problems:
        st.caption("Fix the errors above; only the methods whose spec is valid are shown.")
    for spec, seed in planned:
        st.caption(f"{spec.name or spec.method.name} · seed {seed}")
        st.code(spec.with_seed(seed).to_yaml(), language="yaml")
