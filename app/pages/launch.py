"""Launch: choose a model, a dataset, methods with their hyper-parameters, seeds and resources; submit."""

from __future__ import annotations

import streamlit as st

from app.common import cluster_status, config_form, parse_seeds
from engine.data import BUNDLED as DATASETS
from engine.methods import get_method, method_names
from engine.models import BUNDLED as MODELS
from engine.spec import SpecError, parse_spec

st.title("🚀 Launch runs")
ok, address = cluster_status()
if not ok:
    st.warning(f"Ray is not reachable ({address}). Start the app with ./run_app.sh or set RAY_ADDRESS.")

CUSTOM = "other (hub id, local directory or timm/<name>)"
left, right = st.columns(2)
with left:
    st.subheader("Model and data")
    model_choice = st.selectbox(
        "Model", [*MODELS, CUSTOM], format_func=lambda m: m if m == CUSTOM else f"{m}: {MODELS[m]}"
    )
    model = st.text_input("Model name or path", "", key="custom_model") if model_choice == CUSTOM else model_choice
    trust_remote_code = st.checkbox(
        "trust_remote_code", value=False, help="Run code shipped with a hub model (off by default)"
    )
    data_choice = st.selectbox(
        "Dataset", [*DATASETS, "file"], format_func=lambda d: d if d == "file" else f"{d}: {DATASETS[d]}"
    )
    dataset = st.text_input("CSV/JSONL path", "", key="data_path") if data_choice == "file" else data_choice
    c1, c2, c3 = st.columns(3)
    max_train = c1.number_input("max train examples", min_value=1, value=2000, step=100)
    max_eval = c2.number_input("max eval examples", min_value=1, value=500, step=100)
    max_length = c3.number_input("max sequence length", min_value=4, value=64, step=8)

with right:
    st.subheader("Training")
    c1, c2, c3 = st.columns(3)
    lr = c1.number_input("learning rate", value=1e-3, format="%.6g", min_value=1e-8)
    epochs = c2.number_input("epochs", min_value=1, value=1, step=1)
    max_steps = c3.number_input("max steps (0: by epochs)", min_value=0, value=0, step=10)
    c1, c2, c3 = st.columns(3)
    batch_size = c1.number_input("batch size", min_value=1, value=16, step=1)
    seeds_text = c2.text_input("seeds", "0", help="'0', '0, 1, 2' or '0-4': one run per seed")
    experiment = c3.text_input("experiment", "default")
    c1, c2, c3 = st.columns(3)
    num_cpus = c1.number_input("CPUs per run", min_value=0.0, value=1.0, step=1.0)
    num_gpus = c2.number_input("GPUs per run", min_value=0.0, value=0.0, step=1.0)
    tags = c3.text_input("tags (comma separated)", "")

st.subheader("Methods")
chosen = st.multiselect("PEFT methods", method_names(), default=["lora"], key="methods")
method_params: dict[str, dict] = {}
for name in chosen:
    cls = get_method(name)
    with st.expander(f"{name}: {cls.summary}", expanded=len(chosen) == 1):
        st.caption(cls.paper)
        method_params[name] = config_form(cls.config_cls, key_prefix=f"method.{name}")


def build_specs() -> list[dict]:
    base = {
        "experiment": experiment or "default",
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
        "model": model,
        "trust_remote_code": trust_remote_code,
        "dataset": {
            "name": dataset,
            "max_train": int(max_train),
            "max_eval": int(max_eval),
            "max_length": int(max_length),
        },
        "train": {
            "epochs": int(epochs),
            "max_steps": int(max_steps) or None,
            "batch_size": int(batch_size),
            "lr": float(lr),
        },
        "resources": {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)},
    }
    return [base | {"name": name, "method": {"name": name, **params}} for name, params in method_params.items()]


if st.button("Launch", type="primary", disabled=not chosen, key="launch"):
    from jobs.runs import submit_seeds

    try:
        seeds = parse_seeds(seeds_text)
        specs = [parse_spec(s) for s in build_specs()]
    except (SpecError, ValueError) as err:
        st.error(str(err))
    else:
        if not model:
            st.error("model: enter a hub id, a local directory or timm/<name>")
        else:
            launched = []
            for spec in specs:
                try:
                    launched += submit_seeds(spec, seeds)
                except Exception as err:  # noqa: BLE001 - the run row keeps the reason
                    st.error(f"{spec.method.name}: submission failed: {err}")
            if launched:
                st.success(f"Launched {len(launched)} run(s): " + ", ".join(launched))
                st.page_link("pages/runs.py", label="Watch them on the Runs page", icon="📋")

with st.expander("RunSpec YAML of this form"):
    try:
        st.code("\n---\n".join(parse_spec(s).to_yaml() for s in build_specs()), language="yaml")
    except (SpecError, ValueError) as err:
        st.error(str(err))
