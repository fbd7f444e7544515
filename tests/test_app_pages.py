"""The Launch, Runs and Run detail pages under Streamlit's AppTest, against a real SQLite file and, where runs are
submitted or cancelled, the session's real local Ray head.

AppTest runs ``app/main.py`` (so ``st.navigation`` and the page config are exercised too) and switches to the page.
Fragments run once as part of each script run; their ``run_every`` loop does not run under AppTest.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from db import config, store
from engine.spec import parse_spec
from jobs import cluster
from jobs.runs import cancel_run, submit_run
from tests.conftest import tiny_spec, wait_for

MAIN_SCRIPT = Path(__file__).resolve().parent.parent / "app" / "main.py"
FINAL = ("succeeded", "failed", "cancelled")


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture()
def offline_lab(lab_env, monkeypatch):
    """A fresh PEFT Lab home with no Ray cluster at all (not even one named by ``RAY_ADDRESS``)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config.home()  # the database file is created in the home directory
    return lab_env


def open_page(page: str, run: str | None = None) -> AppTest:
    """A fresh session of the app on ``views/<page>.py`` (optionally with ``?run=``), run once."""
    at = AppTest.from_file(str(MAIN_SCRIPT), default_timeout=60)
    if run is not None:
        at.query_params["run"] = run
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def by_label(elements, label: str):
    matches = [e for e in elements if e.label == label]
    assert len(matches) == 1, f"{len(matches)} widgets labelled {label!r}"
    return matches[0]


def expander(at: AppTest, label_start: str):
    matches = [e for e in at.expander if e.label.startswith(label_start)]
    assert len(matches) == 1, [e.label for e in at.expander]
    return matches[0]


def _decode(values) -> list:
    """Plotly serialises numeric arrays as base64 typed arrays ({dtype, bdata}); plain lists pass through."""
    if isinstance(values, dict) and "bdata" in values:
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def plotly_charts(at: AppTest) -> dict[str, dict]:
    """Every plotly chart on the page by its widget key, as the figure JSON the browser receives."""
    charts = {}
    for element in at.get("plotly_chart"):
        key = element.proto.id.rsplit("-", 1)[-1]
        charts[key] = json.loads(element.proto.spec)
    return charts


def traces(figure: dict) -> dict[str, tuple[list, list]]:
    """{trace name: (x, y)} of a figure."""
    return {t["name"]: (_decode(t["x"]), _decode(t["y"])) for t in figure["data"]}


_AGENT_READY: set[str] = set()


def wait_for_job_agent(timeout: float = 60.0) -> None:
    """Block until the Ray head's job agent accepts submissions.

    The Jobs API answers ``list_jobs`` a few seconds before the head node's job agent has registered (and the agent
    never registers if another Ray node on the machine holds its HTTP port); a submission in between is refused with
    "No available agent to submit job". A no-op probe job is retried until it is accepted (once per head), so the
    tests submit real runs only when Ray can take them, and a head whose agent is missing fails with that reason.
    """
    address = cluster.dashboard_address()
    if address in _AGENT_READY:
        return
    client = cluster.job_client()
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = client.submit_job(entrypoint="true", entrypoint_num_cpus=0)
            break
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the Ray head's job agent did not come up in {timeout:.0f} s: another Ray node on this machine "
                    "may hold the agent's HTTP port (52365 unless --dashboard-agent-listen-port is given)"
                ) from err
            time.sleep(1.0)
    wait_for(lambda: _terminal_ray_status(client, probe), timeout=60)
    _AGENT_READY.add(address)


def final_run(run_id: str) -> dict | None:
    run = store.get_run(run_id)
    return run if run["status"] in FINAL else None


def fill_launch_form(at: AppTest, seeds: str = "0") -> None:
    by_label(at.selectbox, "Model").set_value("tiny-bert")
    by_label(at.selectbox, "Dataset").set_value("tweets-sentiment")
    at.multiselect(key="method.name").set_value(["lora"])
    at.run()  # the method's parameter widgets appear for the chosen methods
    by_label(at.number_input, "max train examples").set_value(64)
    by_label(at.number_input, "max eval examples").set_value(32)
    by_label(at.number_input, "max sequence length").set_value(16)
    by_label(at.text_input, "seeds").set_value(seeds)
    by_label(at.text_input, "experiment").set_value("apptest")
    at.number_input(key="method.lora.rank").set_value(4)
    at.run()


def seed_runs() -> dict[str, str]:
    """One run in each status, created and advanced through the store as a worker would; returns {status: id}."""
    specs = [parse_spec(tiny_spec(train={"seed": seed})).model_dump(mode="json") for seed in range(5)]
    ids = {}

    ids["succeeded"] = store.create_run(specs[0], executor="ray")
    store.mark_running(ids["succeeded"], "cpu")
    store.log_metrics(
        ids["succeeded"],
        [
            (1, "train_loss", 1.0),
            (4, "train_loss", 0.7),
            (4, "eval_loss", 0.6),
            (4, "eval_accuracy", 0.75),
            (4, "lr", 0.0),
        ],
    )
    store.update_run(ids["succeeded"], trainable_params=2147, total_params=100_000)
    summary = {"final_metrics": {"eval_accuracy": 0.75}, "majority_rate": 0.4, "steps": 4, "adapter_params": 2048}
    assert store.finish_run(ids["succeeded"], "succeeded", summary=summary)
    adapter = config.run_dir(ids["succeeded"]) / "adapter.safetensors"
    adapter.write_bytes(bytes(range(100)))
    store.add_artifact(ids["succeeded"], "adapter", adapter)

    ids["running"] = store.create_run(specs[1], executor="ray")
    store.mark_running(ids["running"], "cpu")
    store.log_metrics(ids["running"], [(1, "train_loss", 1.1), (2, "train_loss", 0.9), (2, "eval_accuracy", 0.4)])
    store.heartbeat(ids["running"], progress=0.5)

    ids["queued"] = store.create_run(specs[2], executor="ray")

    ids["failed"] = store.create_run(specs[3], executor="ray")
    store.mark_running(ids["failed"], "cpu")
    assert store.finish_run(ids["failed"], "failed", error="dataset.name 'missing.csv' is not a bundled dataset")

    ids["cancelled"] = store.create_run(specs[4], executor="ray")
    assert store.finish_run(ids["cancelled"], "cancelled", error="cancelled by the user")

    ids["lost"] = store.create_run(parse_spec(tiny_spec(train={"seed": 5})).model_dump(mode="json"), executor="ray")
    store.mark_running(ids["lost"], "cpu")
    assert store.transition(ids["lost"], "lost", error="no heartbeat for more than 20 s: the worker or its node died")
    return ids


# --- Launch ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_launch_submits_one_ray_run_per_seed_and_they_succeed(ray_lab):
    wait_for_job_agent()
    before = {r["id"] for r in store.list_runs(limit=None)}
    at = open_page("launch")
    assert not at.warning, "the page says Ray is not reachable although the local head is up"
    fill_launch_form(at, seeds="0, 1")

    # The YAML expander shows the RunSpec the form describes, and it parses back.
    shown = parse_spec(yaml.safe_load(expander(at, "RunSpec YAML").code[0].value))
    assert (shown.model, shown.dataset.name, shown.method.name) == ("tiny-bert", "tweets-sentiment", "lora")
    assert (shown.dataset.max_train, shown.dataset.max_eval, shown.dataset.max_length) == (64, 32, 16)
    assert shown.method_config().rank == 4 and shown.experiment == "apptest"

    at.button(key="launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    new = [r for r in store.list_runs(limit=None) if r["id"] not in before]
    assert len(new) == 2 and sorted(r["seed"] for r in new) == [0, 1]
    assert at.success[0].value.startswith("Launched 2 run(s)")
    assert all(r["id"] in at.success[0].value for r in new)
    for run in new:
        assert run["executor"] == "ray" and run["model"] == "tiny-bert" and run["spec"]["method"]["rank"] == 4
        assert run["spec"]["dataset"]["max_train"] == 64 and run["spec"]["dataset"]["max_length"] == 16

    client = cluster.job_client()
    assert {r["id"] for r in new} <= {j.submission_id for j in client.list_jobs()}
    for run in new:
        done = wait_for(lambda rid=run["id"]: final_run(rid))
        assert done["status"] == "succeeded", done["error"]
        assert {"train_loss", "eval_accuracy"} <= set(store.get_metrics([run["id"]])["key"])
        assert str(wait_for(lambda rid=run["id"]: _terminal_ray_status(client, rid))) == "SUCCEEDED"


def test_launch_invalid_method_parameter_names_the_field_and_creates_no_run(offline_lab):
    at = open_page("launch")
    assert at.warning and "Ray is not reachable" in at.warning[0].value  # no head in this home
    fill_launch_form(at)
    at.number_input(key="method.lora.rank").set_value(0)
    at.button(key="launch").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and all("method.rank" in e for e in errors), errors  # launch error and the YAML preview's
    assert not at.success
    assert store.list_runs(limit=None) == []


def test_launch_without_a_custom_model_name_names_the_field_and_creates_no_run(offline_lab):
    at = open_page("launch")
    by_label(at.selectbox, "Model").set_value(next(o for o in by_label(at.selectbox, "Model").options if "other" in o))
    at.run()
    assert by_label(at.text_input, "Model name or path").value == ""
    assert at.button(key="launch").disabled  # Launch waits until every field is valid
    assert not at.exception
    assert at.error and "model" in at.error[0].value, [e.value for e in at.error]
    assert store.list_runs(limit=None) == []


def test_launch_with_unparseable_seeds_shows_an_error_and_creates_no_run(offline_lab):
    at = open_page("launch")
    fill_launch_form(at, seeds="x")
    assert at.button(key="launch").disabled
    assert not at.exception and not at.success
    assert len(at.error) == 1 and "'x'" in at.error[0].value  # the YAML preview does not involve the seeds
    assert store.list_runs(limit=None) == []


def test_launch_fills_the_form_from_a_pasted_yaml_and_previews_every_run(offline_lab):
    at = open_page("launch")
    pasted = "model: tiny-bert\ndataset: {name: tweets-sentiment}\nmethod: {name: lora, rank: 64}"
    at.text_area(key="yaml_text").set_value(pasted)
    at.button(key="yaml_fill").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.number_input(key="method.lora.rank").value == 64  # the form starts from the YAML
    assert by_label(at.selectbox, "Model").value == "tiny-bert"
    # Two methods and two seeds: both methods' panels are open, and the preview shows all four runs.
    at.multiselect(key="method.name").set_value(["lora", "neat"]).run()
    by_label(at.text_input, "seeds").set_value("0, 1").run()
    panels = [e for e in at.expander if e.label.startswith(("lora:", "neat:"))]
    assert len(panels) == 2 and all(p.proto.expanded for p in panels)
    preview = expander(at, "RunSpec YAML of the 4 run(s)")
    shown = [parse_spec(yaml.safe_load(c.value)) for c in preview.code]
    assert sorted((s.method.name, s.train.seed) for s in shown) == [("lora", 0), ("lora", 1), ("neat", 0), ("neat", 1)]
    # A YAML that is not a RunSpec names the field and leaves the form as it was.
    at.text_area(key="yaml_text").set_value("model: tiny-bert\ndataset: {name: tweets-sentiment}\ntrain: {lr: -1}")
    at.button(key="yaml_fill").click().run()
    assert any("train.lr" in e.value for e in at.error), [e.value for e in at.error]
    assert at.number_input(key="method.lora.rank").value == 64


def test_launch_seed_error_names_the_seeds_field(offline_lab):
    at = open_page("launch")
    fill_launch_form(at, seeds="x")
    assert at.button(key="launch").disabled and "seeds" in at.error[0].value


# --- Runs ------------------------------------------------------------------------------------------


def test_runs_page_lists_every_status_with_errors_and_live_curves(offline_lab):
    ids = seed_runs()
    at = open_page("runs")

    assert at.caption[0].value == (
        ":material/schedule: queued: 1 · :material/play_circle: running: 1 · :material/check_circle: succeeded: 1 · "
        ":material/error: failed: 1 · :material/block: cancelled: 1 · :material/help: lost: 1"
    )
    table = at.dataframe[0].value.set_index("run")
    assert set(table.index) == set(ids.values())
    for status, run_id in ids.items():
        assert table.loc[run_id, "status"] == status
        assert table.loc[run_id, "detail"] == f"/run_detail?run={run_id}"
    assert table.loc[ids["succeeded"], "eval accuracy"] == "0.7500"
    assert table.loc[ids["running"], "eval accuracy"] == "0.4000"  # a running run shows its last evaluation
    assert table.loc[ids["queued"], "eval accuracy"] == "" and table.loc[ids["queued"], "trainable params"] == ""
    assert table.loc[ids["succeeded"], "progress"] == 1.0 and table.loc[ids["running"], "progress"] == 0.5
    assert table.loc[ids["succeeded"], "trainable params"] == "2,147"
    assert list(at.dataframe[0].value.columns[:5]) == ["status", "name", "method", "eval accuracy", "progress"]

    # Only the failed run gets an error expander, and it shows the recorded error.
    failed = [e for e in at.expander if e.proto.icon == ":material/error:"]
    assert len(failed) == 1 and ids["failed"] in failed[0].label
    assert failed[0].error[0].value == "dataset.name 'missing.csv' is not a bundled dataset"
    # Failed, lost and cancelled runs can be resumed; the others cannot.
    resumable = {b.key.removeprefix("resume_") for b in at.button if b.key and b.key.startswith("resume_")}
    assert resumable == {ids["failed"], ids["lost"], ids["cancelled"]}

    # The live curves follow the active runs (the queued one has logged nothing yet).
    charts = plotly_charts(at)
    assert set(charts) == {"live_loss", "live_acc"}
    loss, acc = traces(charts["live_loss"]), traces(charts["live_acc"])
    label = f"lora s1 ({ids['running'][-6:]})"
    assert loss == {label: ([1, 2], [1.1, 0.9])}
    assert acc == {label: ([2], [0.4])}

    # Only active runs can be cancelled.
    targets = at.selectbox(key="cancel_target").options
    assert len(targets) == 2 and {ids["queued"], ids["running"]} == {t.split(" · ")[0] for t in targets}

    at.multiselect(key="status_filter").set_value(["failed", "cancelled"]).run()
    assert set(at.dataframe[0].value["run"]) == {ids["failed"], ids["cancelled"]}
    charts = plotly_charts(at)  # no active run: the latest runs, which logged nothing
    assert set(charts) == {"live_loss", "live_acc"} and all(not f["data"] for f in charts.values())
    assert not [b for b in at.button if b.key == "cancel"]


@pytest.mark.slow
def test_runs_page_cancel_button_stops_an_active_ray_run(ray_lab):
    wait_for_job_agent()
    long_run = submit_run(tiny_spec(dataset={"max_train": 256}, train={"epochs": 1000}))
    try:
        wait_for(lambda: not store.get_metrics([long_run]).empty)  # the worker is training
        at = open_page("runs")
        table = at.dataframe[0].value.set_index("run")
        assert table.loc[long_run, "status"] == "running"
        at.selectbox(key="cancel_target").set_value(long_run)
        at.button(key="cancel").click().run()
        assert not at.exception
        assert [t.value for t in at.toast] == [f"cancelled {long_run}"]

        run = store.get_run(long_run)
        assert run["status"] == "cancelled" and run["error"] == "cancelled by the user"
        client = cluster.job_client()
        assert str(wait_for(lambda: _terminal_ray_status(client, long_run), timeout=60)) == "STOPPED"

        at.run()
        assert at.dataframe[0].value.set_index("run").loc[long_run, "status"] == "cancelled"
        assert not store.get_metrics([long_run]).empty  # what it logged before the cancel is kept
    finally:
        if store.get_run(long_run)["status"] not in FINAL:
            cancel_run(long_run)


# --- Run detail ------------------------------------------------------------------------------------


def test_run_detail_shows_spec_metrics_curves_and_artifacts(offline_lab):
    ids = seed_runs()
    run_id = ids["succeeded"]  # not the newest run: the page must honour ?run=
    at = open_page("run_detail", run=run_id)

    assert at.selectbox(key="run").value == run_id
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["status"] == "succeeded" and metrics["progress"] == "100%"
    assert metrics["eval accuracy"] == "0.7500" and metrics["trainable / total"] == "2,147 / 100,000"
    assert not at.error

    charts = plotly_charts(at)
    assert set(charts) == {"curve_train_loss", "curve_eval_loss", "curve_eval_accuracy", "curve_lr"}
    assert traces(charts["curve_train_loss"]) == {"lora": ([1, 4], [1.0, 0.7])}
    assert traces(charts["curve_eval_accuracy"]) == {"lora": ([4], [0.75])}

    pivot = expander(at, "Metrics table").dataframe[0].value
    assert list(pivot.index) == [1, 4] and pivot.loc[4, "eval_loss"] == pytest.approx(0.6)

    spec_yaml = next(c.value for c in at.code if c.value.startswith("name:"))
    assert yaml.safe_load(spec_yaml) == store.get_run(run_id)["spec"]
    assert parse_spec(yaml.safe_load(spec_yaml)).model == "tiny-bert"

    artifact = store.list_artifacts(run_id)[0]
    shown = [df.value for df in at.dataframe if "sha256" in df.value.columns]
    assert len(shown) == 1
    row = shown[0].iloc[0]
    assert (row["kind"], row["path"], row["bytes"], row["sha256"]) == (
        "adapter",
        artifact["path"],
        100,
        store.sha256_file(Path(artifact["path"])),
    )
    # The stored adapter downloads from here; the Export page (linked) makes the other formats.
    assert [b.key for b in at.get("download_button")] == ["dl_spec", "dl_adapter"]
    assert any(f"(export?run={run_id})" in m.value for m in at.markdown)


def test_run_detail_of_a_failed_run_shows_its_error_and_no_cancel(offline_lab):
    ids = seed_runs()
    at = open_page("run_detail", run=ids["failed"])
    assert at.selectbox(key="run").value == ids["failed"]
    assert {m.label: m.value for m in at.metric}["status"] == "failed"
    assert [e.value for e in at.error] == ["dataset.name 'missing.csv' is not a bundled dataset"]
    assert not [b for b in at.button if b.key == "cancel_detail"]
    assert expander(at, "Log (tail)").proto.expanded


def test_run_detail_offers_cancel_for_an_active_run(offline_lab):
    ids = seed_runs()
    at = open_page("run_detail", run=ids["running"])
    assert at.button(key="cancel_detail").label == "Cancel this run"
    at.button(key="cancel_detail").click().run()  # no Ray in this home: the database still records the cancel
    assert not at.exception
    assert store.get_run(ids["running"])["status"] == "cancelled"
    assert {m.label: m.value for m in at.metric}["status"] == "cancelled"


def _terminal_ray_status(client, run_id: str):
    status = client.get_job_status(run_id)
    return status if status.is_terminal() else None


def test_merge_page_shows_the_weights_then_the_merges_beside_every_checkpoint(offline_lab):
    """A run with kept checkpoints: the weight bars are MWA's before merging; Merge (with the uniform baseline)
    records two merged runs linked to it, and the accuracy chart puts them beside every checkpoint and the last."""
    from db import merges
    from engine.merging import mwa_weights
    from engine.trajectory import read_trajectory
    from jobs.worker import execute

    spec = parse_spec(tiny_spec(train={"keep_checkpoints": 3, "device": "cpu"})).model_dump(mode="json")
    run_id = store.create_run(spec, executor="inline")
    assert execute(run_id, echo=False)["status"] == "succeeded"
    kept = read_trajectory(config.run_dir(run_id))
    at = open_page("merge", run=run_id)
    x, y = traces(plotly_charts(at)["merge_weights"])["weight"]
    assert x == [f"step {c.step}" for c in kept]
    assert y == pytest.approx(mwa_weights([c.train_loss for c in kept], "loss", 1.0))
    by_label(at.number_input, "p (penalty exponent)").set_value(4.0)
    at.run()
    _, y = traces(plotly_charts(at)["merge_weights"])["weight"]
    assert y == pytest.approx(mwa_weights([c.train_loss for c in kept], "loss", 4.0))
    at.button(key="merge_go").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    made = merges.merges_of([run_id])
    assert sorted(m["summary"]["merge"]["label"] for m in made) == ["mwa loss p=4", "uniform"]
    assert all(m["status"] == "succeeded" and m["executor"] == "merge" for m in made)
    chart = traces(plotly_charts(at)["merge_accuracy"])
    assert chart["sources"] == ([f"step {c.step}" for c in kept], pytest.approx([c.eval_accuracy for c in kept]))
    assert chart["last checkpoint"][1] == pytest.approx([kept[-1].eval_accuracy])
    for m in made:
        label = m["summary"]["merge"]["label"]
        assert chart[label][1] == pytest.approx([m["summary"]["final_metrics"]["eval_accuracy"]])
