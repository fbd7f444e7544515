"""The study form both the Studies page and Launch's "Study" mode show: a study as YAML (see recipes/studies/),
checked as you type. It shows the number of trials and the YAML that will be submitted, or refuses the study with
the field named (``engine.study.StudyError``) before anything runs."""

from __future__ import annotations

import streamlit as st
import yaml

from engine.errors import UserError

EXAMPLE = """\
name: tiny-lr-grid
spec:
  model: tiny-bert
  dataset: {name: tweets-sentiment, max_train: 64, max_eval: 32, max_length: 16}
  method: {name: lora, rank: 4}
  train: {epochs: 1, batch_size: 16, log_every: 1, num_threads: 1}
space:
  train.lr: {grid: [1.0e-4, 3.0e-3, 3.0e-2]}
seeds: [0, 1]
search: grid
max_concurrent: 2
"""


def study_form(show_yaml: bool = False) -> str | None:
    """The YAML box, its check and the Launch study button; returns the id of a study just submitted, else None.
    ``show_yaml`` also shows the study as it will be submitted (the base run resolved, defaults spelled out)."""
    from engine.study import count_trials, parse_study

    text = st.text_area("Study YAML", value=st.session_state.get("study_yaml", EXAMPLE), height=300, key="study_yaml")
    try:
        study = parse_study(yaml.safe_load(text))
    except (UserError, yaml.YAMLError) as err:
        st.error(" ".join(str(err).split()))
        return None
    scheduler = "ASHA" if study.asha else "FIFO"
    st.success(f"{count_trials(study)} trials · {study.search} search · {scheduler} · {study.max_concurrent} at once")
    if show_yaml:
        with st.expander("The study YAML that will be submitted"):
            st.code(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False), language="yaml")
    if not st.button("Launch study", type="primary", key="launch_study"):
        return None
    from jobs.studies import submit_study

    try:
        return submit_study(study)
    except UserError as err:
        st.error(" ".join(str(err).split()))
        return None
