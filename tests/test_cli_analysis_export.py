"""`app.cli analyze / export / import` and the analysis job entrypoint, on tiny runs trained in-process.

Each test trains its own tiny-bert run for 4 steps (about half a second once the libraries are loaded), so the
checks see real trained adapters, the real database rows and the real files.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from app.cli import main
from db import store
from engine.analysis.landscape import load_landscape
from engine.analysis.spectra import effective_rank, load_spectra
from engine.export import load_adapter, load_merged
from engine.spec import parse_spec
from engine.train import evaluate, prepare
from jobs import analysis
from tests.conftest import batch_for, tiny_spec

LORA_LAYERS = [f"net.bert.encoder.layer.{b}.attention.self.{p}" for b in (0, 1) for p in ("query", "value")]


def train_run(tmp_path: Path, capsys, method: dict | None = None) -> dict:
    """Train a 4-step tiny-bert run (LoRA rank 4 unless ``method``) with `app.cli run SPEC --json`; its JSON result."""
    spec = tiny_spec(train={"max_steps": 4})
    if method is not None:
        spec["method"] = method
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "succeeded", result["error"]
    return result


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def adapter_dir(run_id: str) -> Path:
    return Path(store.list_artifacts(run_id, "adapter")[0]["path"]).parent


def test_spectra_is_stored_recorded_and_reused(lab_env, tmp_path, capsys):
    run_id = train_run(tmp_path, capsys)["run_id"]
    code, out, err = cli(capsys, "analyze", run_id, "--kind", "spectra", "--json")
    assert code == 0, err
    summary = last_json(out)
    assert summary["kind"] == "spectra" and summary["reused"] is False
    ranks = summary["headline"]["effective_rank"]
    assert sorted(ranks) == sorted(LORA_LAYERS)

    # The stored numbers are those of the trained ΔW (dense SVD here, the factor route in the analysis).
    model, method = load_adapter(adapter_dir(run_id))
    for name, dw in method.delta_weights(model).items():
        sigma = torch.linalg.svdvals(dw.double()).numpy()
        sigma[sigma <= sigma[0] * max(dw.shape) * torch.finfo(torch.float32).eps] = 0.0
        assert ranks[name] == pytest.approx(effective_rank(sigma), rel=1e-5)
        assert 1.0 < ranks[name] <= summary["headline"]["rank"][name] <= 4  # LoRA rank 4

    # Every file is recorded with its sha256; the JSON records the parameters.
    rows = {a["path"]: a for a in store.list_artifacts(run_id, "analysis:spectra")}
    assert sorted(rows) == sorted(summary["artifacts"])
    for path, row in rows.items():
        assert row["sha256"] == store.sha256_file(Path(path)) and row["bytes"] == Path(path).stat().st_size
    assert load_spectra(summary["artifacts"][0]).settings["analysis"]["params"]["intruder_k"] == 10

    # A second call reuses the files untouched; --force recomputes the same numbers.
    mtimes = {p: Path(p).stat().st_mtime_ns for p in summary["artifacts"]}
    code, out, _ = cli(capsys, "analyze", run_id, "--kind", "spectra", "--json")
    again = last_json(out)
    assert code == 0 and again["reused"] is True and again["headline"] == summary["headline"]
    assert {p: Path(p).stat().st_mtime_ns for p in again["artifacts"]} == mtimes
    code, out, _ = cli(capsys, "analyze", run_id, "--kind", "spectra", "--force", "--json")
    forced = last_json(out)
    assert code == 0 and forced["reused"] is False and forced["headline"]["effective_rank"] == ranks


def test_landscape_centre_is_the_runs_eval_loss_and_interpolation_starts_at_init(lab_env, tmp_path, capsys):
    result = train_run(tmp_path, capsys)
    run_id = result["run_id"]
    code, out, err = cli(capsys, "analyze", run_id, "--kind", "landscape", "--grid", "3", "--json")
    assert code == 0, err
    head = last_json(out)["headline"]
    assert head["points"] == 9 and head["examples"] == 32  # the whole eval split (max_eval 32)
    # Same batches as the training loop's evaluation; vmap with the math attention kernel vs the fused one.
    assert head["center_loss"] == pytest.approx(result["final_metrics"]["eval_loss"], abs=1e-5)
    assert head["center_accuracy"] == pytest.approx(result["final_metrics"]["eval_accuracy"])
    assert head["min_loss"] <= head["center_loss"] <= head["max_loss"]
    stored = load_landscape(last_json(out)["artifacts"][-1])
    assert stored["losses"].shape == (3, 3) and stored["meta"]["analysis"]["params"]["grid"] == 3

    # Interpolation from the method's fresh init at the run's seed (grid 7: t = −0.25, 0, …, 1, 1.25).
    code, out, err = cli(capsys, "analyze", run_id, "--kind", "landscape", "--landscape-kind", "interpolation",
                         "--grid", "7", "--json")  # fmt: skip
    assert code == 0, err
    head = last_json(out)["headline"]
    prep = prepare(parse_spec(store.get_run(run_id)["spec"]))
    init_loss = evaluate(prep.model, prep.data.eval, 32, prep.device)["eval_loss"]
    assert head["init_loss"] == pytest.approx(init_loss, abs=1e-5)
    assert head["center_loss"] == pytest.approx(result["final_metrics"]["eval_loss"], abs=1e-5)
    assert head["init_loss"] != pytest.approx(head["center_loss"], abs=1e-7)  # training moved the loss
    assert {a["path"] for a in store.list_artifacts(run_id, "analysis:landscape")} >= set(last_json(out)["artifacts"])


def test_importance_of_a_heat_run_gives_the_head_score_table(lab_env, tmp_path, capsys):
    run_id = train_run(tmp_path, capsys, method={"name": "heat", "rank": 2, "calibration_batches": 2})["run_id"]
    code, out, err = cli(capsys, "analyze", run_id, "--kind", "importance", "--json")
    assert code == 0, err
    summary = last_json(out)
    tables = analysis.load_importance(summary["artifacts"][0])
    recorded = json.loads((adapter_dir(run_id) / "heat_analysis.json").read_text())
    scores = tables["scores"]
    assert summary["headline"]["tables"]["scores"]["rows"] == len(scores) == 2 * 4  # blocks × heads of tiny-bert
    assert {"scores", "head_mask"} <= set(scores.columns)
    np.testing.assert_allclose(scores["scores"].to_numpy(), np.ravel(recorded["scores"]))
    assert int((scores["head_mask"] == 0).sum()) == len(recorded["masked_heads"]) == 2  # 25 % of 8 heads
    assert set(tables["norm_profile"]["layer"]) and "grad_norm" in tables["norm_profile"].columns


def test_exports_load_and_an_imported_run_has_the_same_spectra(lab_env, tmp_path, capsys, monkeypatch):
    run_id = train_run(tmp_path, capsys)["run_id"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFTLAB_EXPORTS")  # the command line's export root is then the current directory
    reference, _ = load_adapter(adapter_dir(run_id))
    batch = batch_for(reference)
    with torch.no_grad():
        expected = reference(batch)

    exports = {}
    for fmt in ("native", "peft", "merged"):
        code, out, err = cli(capsys, "export", run_id, "--format", fmt, "--out", f"exports/{fmt}", "--json")
        assert code == 0, err
        exports[fmt] = last_json(out)
        directory = Path(exports[fmt]["path"])
        assert directory == (tmp_path / "exports" / fmt).resolve()
        for name, digest in exports[fmt]["files"].items():
            assert store.sha256_file(directory / name) == digest
    with torch.no_grad():
        native, _ = load_adapter(tmp_path / "exports/native")
        torch.testing.assert_close(native(batch), expected, rtol=0, atol=0)
        peft_model, peft_method = load_adapter(tmp_path / "exports/peft")
        assert peft_method.name == "lora"
        torch.testing.assert_close(peft_model(batch), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_merged(tmp_path / "exports/merged")(batch), expected, rtol=1e-5, atol=1e-5)
    assert exports["peft"]["relative_error"] < 1e-5

    code, out, err = cli(capsys, "import", "exports/native", "--name", "reimported")
    assert code == 0, err
    new_id = out.strip().splitlines()[-1]
    assert new_id != run_id and store.get_run(new_id)["name"] == "reimported"
    spectra = []
    for rid in (run_id, new_id):
        code, out, err = cli(capsys, "analyze", rid, "--kind", "spectra", "--json")
        assert code == 0, err
        spectra.append(load_spectra(last_json(out)["artifacts"][0]))
    assert list(spectra[0].sigmas) == list(spectra[1].sigmas) == LORA_LAYERS
    for name in LORA_LAYERS:
        np.testing.assert_array_equal(spectra[0].sigmas[name], spectra[1].sigmas[name])


def test_bad_requests_exit_2_with_a_clear_message(lab_env, tmp_path, capsys):
    code, _, err = cli(capsys, "analyze", "run-missing", "--kind", "spectra")
    assert code == 2 and "no run run-missing in the database" in err
    code, _, err = cli(capsys, "export", "run-missing", "--format", "native", "--out", str(tmp_path / "x"))
    assert code == 2 and "run-missing" in err

    run_id = train_run(tmp_path, capsys, method={"name": "houlsby", "bottleneck": 4})["run_id"]
    code, _, err = cli(capsys, "export", run_id, "--format", "merged", "--out", str(tmp_path / "merged"))
    assert code == 2 and "houlsby" in err and "not mergeable" in err and "--format native" in err
    assert not (tmp_path / "merged").exists()
    code, _, err = cli(capsys, "export", run_id, "--format", "native", "--svd-rank", "2", "--out", str(tmp_path / "y"))
    assert code == 2 and "--svd-rank" in err and "--format peft" in err
    code, _, err = cli(capsys, "analyze", run_id, "--kind", "landscape", "--grid", "4")
    assert code == 2 and "landscape.grid" in err and "odd" in err
    code, _, err = cli(capsys, "analyze", run_id, "--kind", "spectra", "--span", "2")
    assert code == 2 and "--span" in err and "--kind landscape" in err
    code, _, err = cli(capsys, "import", str(tmp_path))
    assert code == 2 and "neither a native adapter" in err
    assert store.list_artifacts(run_id, "analysis:landscape") == []


def test_analysis_job_main_writes_its_progress_file(lab_env, tmp_path, capsys):
    run_id = train_run(tmp_path, capsys)["run_id"]
    params = {"kind": "1d", "grid": 9, "chunk_size": 2}
    first, second = analysis.progress_file(run_id, "job-1"), analysis.progress_file(run_id, "job-2")
    argv = ["--run-id", run_id, "--kind", "landscape", "--params", json.dumps(params)]
    assert analysis.main([*argv, "--progress-file", str(first)]) == 0
    assert last_json(capsys.readouterr().out)["headline"]["points"] == 9
    progress = analysis.read_progress(first)
    # 0 at the start, one update per chunk of 2 points, 1.0 once the artifact is recorded.
    assert progress["history"] == pytest.approx([0.0, 2 / 9, 4 / 9, 6 / 9, 8 / 9, 1.0])
    assert progress["progress"] == 1.0 and len(progress["history"]) == 6
    assert store.list_artifacts(run_id, "analysis:landscape")
    # Progress is job status, not metric rows.
    assert store.get_metrics([run_id], keys=["analysis_landscape_progress"]).empty

    # A second job (reusing the artifact) has its own file, so what a job's status shows is always that job's.
    assert analysis.main([*argv, "--progress-file", str(second)]) == 0
    assert last_json(capsys.readouterr().out)["reused"] is True
    assert analysis.read_progress(second)["history"] == [0.0, 1.0]
    assert analysis.read_progress(first)["history"] == pytest.approx([0.0, 2 / 9, 4 / 9, 6 / 9, 8 / 9, 1.0])
    assert analysis.read_progress(analysis.progress_file(run_id, "job-3")) == {"progress": 0.0, "history": []}

    assert analysis.main(["--run-id", run_id, "--kind", "landscape", "--params", "{not json"]) == 2
    assert analysis.main(["--run-id", run_id, "--kind", "landscape", "--params", '{"grid": 0}']) == 2
    assert "landscape.grid" in capsys.readouterr().err
    # The Ray entrypoint survives the shell: the parameters come back as sent.
    words = shlex.split(analysis._entrypoint(run_id, "landscape", {"kind": "1d", "note": "it's"}))
    assert words[-6:] == ["--run-id", run_id, "--kind", "landscape", "--params", '{"kind": "1d", "note": "it\'s"}']


def test_summary_groups_seeds_with_mean_and_std(lab_env, capsys):
    """``summary`` averages the final accuracy over the seeds of one run name and leaves failed runs out."""
    accuracies = {0: 0.5, 1: 0.7}
    for seed, accuracy in accuracies.items():
        run_id = store.create_run(parse_spec(tiny_spec(name="sum-lora", train={"seed": seed})).model_dump(mode="json"))
        store.update_run(run_id, trainable_params=100, total_params=1000)
        store.mark_running(run_id, "cpu")
        summary = {"final_metrics": {"eval_accuracy": accuracy}, "timings": {"ms_per_step": 10.0 * (seed + 1),
                                                                             "peak_rss_mb": 500.0}}  # fmt: skip
        store.finish_run(run_id, "succeeded", summary=summary)
    failed = store.create_run(parse_spec(tiny_spec(name="sum-lora", train={"seed": 2})).model_dump(mode="json"))
    store.finish_run(failed, "failed", error="boom")

    assert main(["summary", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if r["name"] == "sum-lora"]
    assert len(rows) == 1 and rows[0]["runs"] == 2
    assert rows[0]["accuracy"] == pytest.approx(0.6) and rows[0]["accuracy_std"] == pytest.approx(
        np.std([0.5, 0.7], ddof=1)
    )
    assert rows[0]["ms_per_step"] == pytest.approx(15.0) and rows[0]["trainable_params"] == 100

    assert main(["summary"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "sum-lora" in x)
    assert "| 2 | 0.600 | 0.141 | [-0.671, 1.871] | 100 | 15 | 500 |" in line  # t(0.975, 1) = 12.706
