"""The HTML report of a small experiment trained in-process: it parses, loads nothing from the network, and has the
tables and figures a comparison needs."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import yaml

from app.cli import main
from db import store
from tests.conftest import tiny_spec


class Tags(HTMLParser):
    """Every start tag with its attributes, the text of scripts, and whether the tags nest properly."""

    VOID = {"meta", "br", "img", "link", "input", "hr", "col", "source", "wbr", "area", "base", "embed"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self.mismatched.append(tag)

    def handle_data(self, data):
        if self.open and self.open[-1] == "script":
            self.scripts.append(data)


def test_report_of_a_small_experiment_is_self_contained_html_with_figures(lab_env, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(experiment="small", train={"max_steps": 4})))
    assert main(["run", str(path), "--seeds", "0", "1", "--json"]) == 0
    probe = tiny_spec(experiment="small", train={"max_steps": 4}) | {"method": {"name": "linear_probe"}}
    path.write_text(yaml.safe_dump(probe))
    assert main(["run", str(path), "--json"]) == 0
    capsys.readouterr()
    runs = store.list_runs(experiment="small", limit=None)
    assert len(runs) == 3 and {r["status"] for r in runs} == {"succeeded"}
    lora = next(r["id"] for r in runs if r["method"] == "lora")
    assert main(["analyze", lora, "--kind", "spectra", "--json"]) == 0

    out = tmp_path / "report.html"
    assert main(["report", "--experiment", "small", "--out", str(out)]) == 0
    text = Path(out).read_text(encoding="utf-8")
    parser = Tags()
    parser.feed(text)
    parser.close()
    assert text.startswith("<!DOCTYPE html>") and parser.mismatched == [] and parser.open == []
    external = [(t, a) for t, a in parser.tags if (t == "script" and a.get("src")) or (t == "link" and a.get("href"))]
    assert external == []  # no script or stylesheet is fetched
    assert any(len(s) > 1_000_000 and "Plotly" in s for s in parser.scripts)  # plotly.js inline, once
    figures = [a for t, a in parser.tags if t == "div" and "plotly-graph-div" in (a.get("class") or "")]
    assert len(figures) >= 5, len(figures)  # intervals, params ×2, curves ×2, time and memory, spectra
    for needle in ("Configurations", "Paired differences", "linear probe", "majority class",
                   "Configuration differences", "Spectra of ΔW", "Time and memory", "95 %"):  # fmt: skip
        assert needle in text, needle
    # Both LoRA seeds are one configuration with n = 2; the probe is its own.
    assert main(["summary", "--experiment", "small", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(r["n"] for r in rows) == [1, 2]

    assert main(["report", "--experiment", "nope", "--out", str(out)]) == 2
    assert "--experiment nope" in capsys.readouterr().err
