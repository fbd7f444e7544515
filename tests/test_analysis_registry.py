"""Analysis kinds register like methods: a kind defined in one class (here, in the test) is available to
``compute_analysis``, Ray jobs' entrypoint and ``app.cli analyze`` without editing any other file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from app.cli import build_parser, main
from db import store
from engine.analysis.kinds import Analysis, AnalysisParams, analysis_kinds, get_analysis, register_analysis
from engine.analysis.kinds.base import _REGISTRY
from jobs import analysis
from tests.test_cli_analysis_export import cli, last_json, train_run


@pytest.fixture()
def toy_kind():
    """Registers the toy kind for one test (the class is all of its definition)."""

    @register_analysis
    class AdapterSize(Analysis):
        """Bytes of the run's adapter files, times ``scale``."""

        class Params(AnalysisParams):
            scale: int = Field(1, ge=1, description="multiply the byte count by this")
            unit: str = Field("B", description="unit label")

        kind = "adapter_size"
        params_cls = Params
        needs = ("adapter",)
        suffixes = (".json",)

        def compute(self, inputs, params, record, json_path: Path, progress) -> None:
            progress(0.5)
            size = sum(p.stat().st_size for p in inputs.adapter_dir.iterdir() if p.is_file())
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"bytes": size * params.scale, "unit": params.unit, "analysis": record}))

        def headline(self, json_path: Path) -> dict[str, Any]:
            data = self.load(json_path)
            return {"size": data["bytes"], "unit": data["unit"]}

    yield AdapterSize
    _REGISTRY.pop("adapter_size")


def test_toy_kind_is_computed_stored_reused_and_on_the_cli(lab_env, tmp_path, capsys, toy_kind):
    assert "adapter_size" in analysis_kinds() and isinstance(get_analysis("adapter_size"), toy_kind)
    run_id = train_run(tmp_path, capsys)["run_id"]
    seen: list[float] = []
    summary = analysis.compute_analysis(run_id, "adapter_size", {"scale": 2}, progress=seen.append)
    assert summary["reused"] is False and seen == [0.5, 1.0]
    assert summary["headline"]["size"] > 0 and summary["headline"]["size"] % 2 == 0
    assert summary["artifacts"] == [str(Path(summary["artifacts"][0]).parent / "adapter_size.json")]
    assert [a["kind"] for a in store.list_artifacts(run_id, "analysis:adapter_size")] == ["analysis:adapter_size"]
    with pytest.raises(analysis.AnalysisError, match=r"adapter_size\.scale"):
        analysis.compute_analysis(run_id, "adapter_size", {"scale": 0})

    # The CLI's --kind choices and flags come from the params class.
    help_text = build_parser()._subparsers._group_actions[0].choices["analyze"].format_help()  # type: ignore[union-attr]
    assert "adapter_size" in help_text and "--scale" in help_text and "--unit" in help_text
    code, out, _ = cli(capsys, "analyze", run_id, "--kind", "adapter_size", "--scale", "2", "--json")
    assert code == 0 and last_json(out)["reused"] is True and last_json(out)["headline"] == summary["headline"]
    code, out, _ = cli(capsys, "analyze", run_id, "--kind", "adapter_size", "--unit", "bytes", "--json")
    assert code == 0 and last_json(out)["reused"] is False and last_json(out)["headline"]["unit"] == "bytes"
    code, _, err = cli(capsys, "analyze", run_id, "--kind", "spectra", "--scale", "3")
    assert code == 2 and "--scale" in err and "--kind adapter_size" in err
    code, _, err = cli(capsys, "analyze", run_id, "--kind", "adapter_size", "--grid", "5")
    assert code == 2 and "--grid" in err and "--kind landscape" in err

    # The Ray job entrypoint knows it too.
    assert analysis.main(["--run-id", run_id, "--kind", "adapter_size", "--params", '{"unit": "bytes"}']) == 0
    assert last_json(capsys.readouterr().out)["reused"] is True
    assert main(["analyze", run_id, "--kind", "adapter_size"]) == 0
    assert "size:" in capsys.readouterr().out
