"""PEFT Lab dashboard: ``streamlit run app/main.py`` (``./run_app.sh`` does it for you)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="PEFT Lab", page_icon=":material/science:", layout="wide")

PAGES = {
    "Experiments": [
        st.Page("views/launch.py", title="Launch", icon=":material/rocket_launch:", default=True),
        st.Page("views/runs.py", title="Runs", icon=":material/table_rows:"),
        st.Page("views/study.py", title="Studies", icon=":material/science:"),
        st.Page("views/run_detail.py", title="Run detail", icon=":material/search:"),
    ],
}
ANALYSIS_PAGES = [
    ("views/compare.py", "Compare", ":material/balance:"),
    ("views/spectra.py", "Spectra", ":material/ssid_chart:"),
    ("views/importance.py", "Importance", ":material/target:"),
    ("views/landscape.py", "Landscape", ":material/landscape:"),
    ("views/export.py", "Export", ":material/package_2:"),
    ("views/merge.py", "Merge", ":material/merge:"),
]
available = [st.Page(p, title=t, icon=i) for p, t, i in ANALYSIS_PAGES if (Path(__file__).parent / p).exists()]
if available:
    PAGES["Analyses"] = available

from db import store  # noqa: E402
from db.config import DatabaseError  # noqa: E402

try:  # an unusable PEFTLAB_DB_URL is one line on every page, not a traceback
    store.get_engine()
except DatabaseError as err:
    st.error(str(err))
    st.stop()

st.navigation(PAGES).run()
