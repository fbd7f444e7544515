"""Run detail's panel for causal-LM runs: the base and the adapted model's greedy generations side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st


def generations_table(data: dict[str, Any]) -> pd.DataFrame:
    """One row per evaluation prompt: the prompt, the base model's and the adapted model's greedy continuation."""
    rows = data.get("rows") or []
    return pd.DataFrame(
        {"prompt": [r["prompt"] for r in rows], "base": [r["base"] for r in rows],
         "adapted": [r["adapted"] for r in rows]}
    )  # fmt: skip


def show_generations(arts: list[dict]) -> None:
    """The ``generations`` artifact of a run, when it has one (causal LMs, written at the end of training)."""
    found = next((a for a in arts if a["kind"] == "generations" and Path(a["path"]).is_file()), None)
    if found is None:
        return
    data = json.loads(Path(found["path"]).read_text())
    st.subheader("Generations: base vs adapted (greedy)")
    st.caption(f"The first evaluation prompts, up to {data.get('max_new_tokens', '?')} new tokens each.")
    st.dataframe(
        generations_table(data),
        hide_index=True,
        width="stretch",
        column_config={  # the continuations side by side in view; the prompt's full text is in its cell's tooltip
            "prompt": st.column_config.TextColumn("prompt", width=260),
            "base": st.column_config.TextColumn("base", width="large"),
            "adapted": st.column_config.TextColumn("adapted", width="large"),
        },
    )
