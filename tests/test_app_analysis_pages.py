"""The analysis pages (Compare, Spectra, Importance, Landscape, Export) under Streamlit's AppTest, against a real
SQLite file and artifact root seeded once for the module with tiny trained runs (tiny-bert on tweets-sentiment):
two LoRA runs and two HEAT runs (seeds 0 and 1), and one HEAT run on its bottleneck-adapter base, which has no
dense ΔW, so the Export page must offer it less than the LoRA-based HEAT runs.

Each page is opened with ``AppTest.from_file`` on its own file; one test opens ``app/main.py`` to check that the
navigation lists them. Fragments run once per script run (their ``run_every`` loop does not run under AppTest), so
the last test (marked slow) polls the landscape page's progress fragment by rerunning it while a real Ray job, on the
session's local Ray head, computes the landscape.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from db import config, store
from engine.spec import parse_spec
from jobs.analysis import compute_analysis, progress_file, read_progress
from jobs.worker import execute
from tests.conftest import tiny_spec

APP = Path(__file__).resolve().parent.parent / "app"
PAGES = ("compare", "spectra", "importance", "landscape", "export")


# --- the seeded lab ------------------------------------------------------------------------------------


@dataclass
class Lab:
    home: Path
    env: dict[str, str]
    runs: dict[str, str]  # "lora-0", "lora-1", "heat-0", "heat-1", "heat-adapter" -> run id


SEEDED = {
    "lora-0": ({"name": "lora", "rank": 4}, 0, ["low-rank"]),
    "lora-1": ({"name": "lora", "rank": 4}, 1, ["low-rank"]),
    "heat-0": ({"name": "heat", "rank": 4, "calibration_batches": 2}, 0, ["heads", "low-rank"]),
    "heat-1": ({"name": "heat", "rank": 4, "calibration_batches": 2}, 1, ["heads", "low-rank"]),
    "heat-adapter": ({"name": "heat", "base": "adapter", "adapter_dim": 4, "calibration_batches": 2}, 0, ["heads"]),
}


def train_inline(method: dict, seed: int, name: str, tags: list[str]) -> str:
    """Train one tiny run in this process (``executor="inline"``, as ``app.cli run`` does); returns its id."""
    spec = parse_spec(tiny_spec(method=method, train={"seed": seed}, name=name, tags=tags))
    run_id = store.create_run(spec.model_dump(mode="json"), executor="inline")
    final = execute(run_id, echo=False)
    assert final["status"] == "succeeded", final["error"]
    return run_id


@pytest.fixture(scope="module")
def seeded_lab(tmp_path_factory):
    """A PEFT Lab home for the whole module, with the runs of ``SEEDED`` trained in this process (about 10 s)."""
    home = tmp_path_factory.mktemp("analysis_pages")
    env = config.home_env(home)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        store.get_engine.cache_clear()
        runs = {
            key: train_inline(method, seed, key.rsplit("-", 1)[0], tags) for key, (method, seed, tags) in SEEDED.items()
        }
        store.get_engine.cache_clear()
    return Lab(home, env, runs)


@pytest.fixture()
def lab(seeded_lab, monkeypatch):
    """The seeded home for one test; no Ray cluster there, so "Compute on Ray" must fail politely."""
    for key, value in seeded_lab.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store.get_engine.cache_clear()
    yield seeded_lab
    store.get_engine.cache_clear()


# --- helpers -------------------------------------------------------------------------------------------


def open_page(page: str, run: str | None = None) -> AppTest:
    """A fresh session on ``app/views/<page>.py`` (optionally with ``?run=``), run once, without exceptions."""
    at = AppTest.from_file(str(APP / "views" / f"{page}.py"), default_timeout=120)
    if run is not None:
        at.query_params["run"] = run
    return rerun(at)


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _decode(values) -> list:
    """Plotly serialises numeric arrays as base64 typed arrays ({dtype, bdata}); plain lists pass through."""
    if isinstance(values, dict) and "bdata" in values:
        array = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
        shape = values.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")]).tolist() if shape else array.tolist()
    return list(values)


def charts(at: AppTest) -> dict[str, dict]:
    """Every plotly chart on the page by its widget key, as the figure JSON the browser receives."""
    return {e.proto.id.rsplit("-", 1)[-1]: json.loads(e.proto.spec) for e in at.get("plotly_chart")}


def trace_types(figure: dict) -> list[str]:
    return [t.get("type", "scatter") for t in figure["data"]]


def trace(figure: dict, name: str) -> dict:
    matches = [t for t in figure["data"] if t.get("name") == name]
    assert len(matches) == 1, [t.get("name") for t in figure["data"]]
    return matches[0]


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


# --- every page, empty database ------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_page_on_an_empty_database_says_so(lab_env, page):
    config.home()  # the SQLite file's directory
    at = open_page(page)
    assert at.info, "an empty database should be explained"
    assert not at.get("plotly_chart") and not at.error


def test_navigation_lists_the_analysis_pages(lab):
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=120)
    for page, title in (("compare", "Compare runs"), ("export", "Export")):
        at.switch_page(f"views/{page}.py")
        rerun(at)
        assert title in at.title[0].value


# --- compare -------------------------------------------------------------------------------------------


def test_compare_pareto_curves_table_and_bars(lab):
    at = open_page("compare")
    figures = charts(at)
    assert set(figures) == {"group_intervals", "pareto", "curves_eval_accuracy", "curves_train_loss", "resources"}
    # Grouped by configuration: the two LoRA seeds are one group; HEAT on LoRA and HEAT on adapters are two.
    groups = at.dataframe[0].value.set_index("configuration")
    assert len(groups) == 3 and groups.loc["lora", "n"] == 2 and groups.loc["lora", "seeds"] == "0, 1"
    finals = [store.get_run(lab.runs[f"lora-{s}"])["summary"]["final_metrics"]["eval_accuracy"] for s in (0, 1)]
    assert groups.loc["lora", "accuracy: mean ± std [95 % CI]"].startswith(f"{np.mean(finals):.3f} ± ")
    heat = sorted(g for g in groups.index if g.startswith("heat"))
    assert heat == ["heat · adapter_dim=4 · base=adapter", "heat · adapter_dim=8 · base=lora"], heat
    assert {t["name"] for t in figures["pareto"]["data"]} == {"lora", *heat, "Pareto front"}
    assert at.dataframe[1].value["baseline"].tolist() == ["majority class"]
    paired = at.dataframe[2].value  # LoRA and HEAT on LoRA share seeds 0 and 1
    assert set(paired["n"]) <= {1, 2} and 2 in set(paired["n"])
    assert any(b.label == "Download report" for b in at.get("download_button"))
    assert trace_types(figures["resources"]) == ["bar", "bar"]

    # Mean over the two LoRA seeds at the last step equals the mean of their final eval accuracies.
    lora_ids = [lab.runs["lora-0"], lab.runs["lora-1"]]
    finals = [store.get_run(r)["summary"]["final_metrics"]["eval_accuracy"] for r in lora_ids]
    mean_curve = trace(figures["curves_eval_accuracy"], "lora")
    assert _decode(mean_curve["y"])[-1] == pytest.approx(np.mean(finals))
    assert figures["curves_eval_accuracy"]["data"][0]["fill"] == "toself"  # the 95 % CI band

    table = at.dataframe[-1].value  # the runs table comes last
    assert sorted(table.index) == sorted(lab.runs.values())
    assert {"spec.method.name", "spec.train.seed", "spec.method.base"} <= set(table.columns)
    assert "spec.model" not in table.columns  # the same for every run: hidden by "differences only"
    assert any(b.label == "Download table (CSV)" for b in at.get("download_button"))

    at.toggle(key="diff_only").set_value(False)
    assert "spec.model" in rerun(at).dataframe[-1].value.columns

    at.multiselect(key="f_method").set_value(["lora"])
    rerun(at)
    assert sorted(at.dataframe[-1].value.index) == sorted(lora_ids)
    assert {t["name"] for t in charts(at)["pareto"]["data"]} == {"lora", "Pareto front"}

    at.multiselect(key="f_method").set_value([])
    at.multiselect(key="f_tags").set_value(["heads"])
    heads = [lab.runs[k] for k in ("heat-0", "heat-1", "heat-adapter")]
    assert sorted(rerun(at).dataframe[-1].value.index) == sorted(heads)

    # A shared link opens with its filters and grouping (unknown values are dropped).
    linked = AppTest.from_file(str(APP / "views" / "compare.py"), default_timeout=120)
    linked.query_params.update({"method": "lora,no-such-method", "group": "name"})
    rerun(linked)
    assert linked.multiselect(key="f_method").value == ["lora"] and linked.selectbox(key="group").value == "name"
    assert sorted(linked.dataframe[-1].value.index) == sorted(lora_ids)


# --- spectra -------------------------------------------------------------------------------------------


def test_spectra_compute_then_open_from_the_stored_artifact(lab):
    lora_ids = [lab.runs["lora-0"], lab.runs["lora-1"]]
    at = open_page("spectra")
    at.multiselect(key="spectra_runs").set_value(lora_ids)
    rerun(at)
    assert "press Compute" in texts(at.info) and not at.get("plotly_chart")

    at.button(key="spectra_compute").click()
    rerun(at)
    figures = charts(at)
    assert set(figures) == {"spectra_heatmap", "spectra_curves", "spectra_overlay"}
    heatmap = figures["spectra_heatmap"]["data"][0]
    assert heatmap["type"] == "heatmap" and list(heatmap["y"]) == ["0.q", "0.v", "1.q", "1.v"]
    assert len(figures["spectra_overlay"]["data"]) == 2

    scalars = at.dataframe[0].value
    assert len(scalars) == 2 * 4  # two runs × (q, v) in two blocks
    assert (scalars["rank"] <= 4).all() and (scalars["rank"] >= 1).all()  # a trained rank-4 update
    assert (scalars["effective_rank"] <= scalars["rank"] + 1e-9).all()
    assert (scalars["relative_update"] > 0).all()
    for run_id in lora_ids:
        assert store.list_artifacts(run_id, "analysis:spectra")

    # A new session draws the stored spectra without computing anything.
    again = open_page("spectra", run=lora_ids[0])
    assert "spectra_heatmap" in charts(again) and not again.info
    assert again.multiselect(key="spectra_runs").value == [lora_ids[0]]
    # Several runs by URL, as a shared link to an overlay: ?run=ID1,ID2 (unknown ids are dropped).
    both = open_page("spectra", run=",".join([lora_ids[1], "run-unknown", lora_ids[0]]))
    assert both.multiselect(key="spectra_runs").value == [lora_ids[1], lora_ids[0]]
    assert len(charts(both)["spectra_overlay"]["data"]) == 2


# --- importance ----------------------------------------------------------------------------------------


def test_importance_heat_head_scores_with_the_mask(lab):
    run_id = lab.runs["heat-0"]
    at = open_page("importance", run=run_id)
    figures = charts(at)
    assert trace_types(figures["heads_0"]) == ["heatmap", "scatter"]
    raw = json.loads(Path(store.list_artifacts(run_id, "method_analysis")[-1]["path"]).read_text())
    masked = trace(figures["heads_0"], "masked")
    assert len(_decode(masked["x"])) == int((np.array(raw["head_mask"]) == 0).sum()) > 0
    assert np.array(_decode(figures["heads_0"]["data"][0]["z"])).shape == np.array(raw["scores"]).shape
    assert "norm_profile" in figures and store.list_artifacts(run_id, "analysis:importance")
    assert not at.info  # HEAT has importance data


def test_importance_of_a_method_without_importance_data(lab):
    at = open_page("importance", run=lab.runs["lora-0"])
    assert "records no importance data" in texts(at.info)
    assert set(charts(at)) == {"norm_profile"}  # recorded for every adapted run
    at.radio(key="norm_kind").set_value("heatmap")
    assert trace_types(charts(rerun(at))["norm_profile"]) == ["heatmap"]


# --- landscape -----------------------------------------------------------------------------------------


def test_landscape_compute_and_draw(lab):
    run_id, other = lab.runs["lora-0"], lab.runs["lora-1"]
    at = open_page("landscape", run=run_id)
    assert "No landscape stored" in texts(at.info)

    at.button(key="landscape_ray").click()  # no Ray cluster in this module
    rerun(at)
    assert "Could not submit to Ray" in texts(at.error)

    at.number_input(key="landscape.grid.2d").set_value(4)
    rerun(at)
    assert "odd grid" in texts(at.error) and at.button(key="landscape_here").disabled

    at.number_input(key="landscape.grid.2d").set_value(5)
    at.number_input(key="landscape.examples").set_value(16)
    rerun(at).button(key="landscape_here").click()
    figures = charts(rerun(at))
    assert trace_types(figures["landscape_contour"]) == ["contour", "scatter"]
    assert trace_types(figures["landscape_surface"]) == ["surface"]
    assert np.array(_decode(figures["landscape_contour"]["data"][0]["z"])).shape == (5, 5)

    at.radio(key="landscape.kind").set_value("1d")
    rerun(at).number_input(key="landscape.grid.1d").set_value(7)
    at.button(key="landscape_here").click()
    rerun(at)
    compute_analysis(other, "landscape", {"kind": "1d", "grid": 7, "examples": 16})
    at.multiselect(key="landscape_overlay_1d").set_value([other])
    curves = charts(rerun(at))["landscape_1d"]
    assert trace_types(curves) == ["scatter", "scatter"]
    assert all(len(_decode(t["x"])) == 7 for t in curves["data"])


# --- export --------------------------------------------------------------------------------------------


def test_export_buttons_follow_what_the_method_instance_can_do(lab):
    heat = open_page("export", run=lab.runs["heat-0"])
    assert {"export_native", "export_peft", "export_merged"} <= {b.key for b in heat.button}
    adapter_based = open_page("export", run=lab.runs["heat-adapter"])  # same method, no dense ΔW
    assert [b.key for b in adapter_based.button] == ["export_native"]
    assert "not mergeable" in texts(adapter_based.caption)

    adapter_based.button(key="export_native").click()
    rerun(adapter_based)
    assert "native" in texts(adapter_based.success)
    assert [b.key for b in adapter_based.get("download_button")] == ["zip_native"]


def test_export_peft_by_svd_shows_error_sha256_and_zips(lab):
    from app.analysis_common import zip_directory

    run_id = lab.runs["lora-0"]
    at = open_page("export", run=run_id)
    at.radio(key="peft_mode").set_value("svd")
    rerun(at).number_input(key="svd_rank").set_value(2)
    at.button(key="export_peft").click()
    rerun(at)
    assert "peft" in texts(at.success)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["conversion"] == "svd" and metrics["rank"] == "2"
    assert 0.0 < float(metrics["reconstruction error"]) < 1.0  # rank 2 of a trained rank-4 update

    directory = lab.home / "exports" / f"{run_id}-peft"
    files = at.dataframe[0].value
    for name, digest in zip(files["file"], files["sha256"]):
        assert store.sha256_file(directory / name) == digest
    with zipfile.ZipFile(io.BytesIO(zip_directory(directory))) as archive:
        names = set(archive.namelist())
    assert names == {f"{directory.name}/{n}" for n in [*files["file"], "manifest.json"]}
    assert [b.key for b in at.get("download_button")] == ["zip_peft"]


# --- landscape on Ray --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_landscape_on_ray_shows_progress_then_the_result(ray_lab):
    """The real path: the job runs on the session's local Ray head, the progress fragment polls it, and once the job
    has succeeded the page draws the stored landscape. Each ``at.run()`` is one poll of the fragment."""
    from tests.conftest import wait_for
    from tests.test_app_pages import wait_for_job_agent

    wait_for_job_agent()
    run_id = train_inline({"name": "lora", "rank": 4}, 0, "lora", [])
    at = open_page("landscape", run=run_id)
    at.radio(key="landscape.kind").set_value("1d")
    rerun(at).number_input(key="landscape.grid.1d").set_value(5)
    at.number_input(key="landscape.examples").set_value(16)
    rerun(at).button(key="landscape_ray").click()
    rerun(at)
    assert not at.error and at.button(key="landscape_ray").disabled  # one job per run at a time
    seen = []

    def drawn():
        rerun(at)
        bars = at.get("progress")
        seen.extend(p.proto.text for p in bars)
        # the artifact is stored a moment before Ray calls the job finished: wait for both
        return "landscape_1d" in charts(at) and not bars

    wait_for(drawn, timeout=240, every=1.0)
    assert any(text.startswith("Ray job analysis-landscape-") for text in seen)
    assert not at.error and not at.get("progress")  # the job ended: no bar, no failure
    assert len(_decode(charts(at)["landscape_1d"]["data"][0]["x"])) == 5
    job_id = next(text for text in seen if text.startswith("Ray job analysis-landscape-")).split()[2].rstrip(":")
    assert read_progress(progress_file(run_id, job_id))["progress"] == 1.0
