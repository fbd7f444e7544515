"""Model cards (``README.md``) and the lab metadata file (``peftlab.json``) written beside every export.

A card says what the adapter is (method and config, base model, dataset and labels, the lab version), the run's
metrics, and how to load the export; PEFT cards add the conversion report (exact, chosen rank, or truncated SVD
with its error) so a reader knows whether the metrics still hold.
"""

from __future__ import annotations

import json
from typing import Any

from engine.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_FILE, MANIFEST_FILE, AdapterMeta
from engine.export.paths import lab_version
from engine.export.peft_format import _peft_base_name
from engine.models import TaskModel

README_FILE = "README.md"
LAB_META_FILE = "peftlab.json"  # lab metadata beside a PEFT or merged export (PEFT and transformers ignore it)
LAB_META_KEYS = ("method", "method_config", "method_state", "model", "model_source", "num_labels", "label_names",
                 "spec")  # fmt: skip


def _metrics_lines(summary: dict[str, Any] | None) -> list[str]:
    summary = summary or {}
    rows = sorted(dict(summary.get("final_metrics") or {}).items())
    rows += [(k, summary[k]) for k in ("steps", "trainable_params", "adapter_params", "total_params", "majority_rate",
                                       "device") if summary.get(k) is not None]  # fmt: skip
    lines = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return ["| metric | value |", "|---|---|", *lines] if lines else ["No metrics were recorded for this run."]


def _card_header(meta: AdapterMeta, title: str) -> list[str]:
    cfg = json.dumps(meta.method_config, sort_keys=True)
    dataset = ((meta.spec or {}).get("dataset") or {}).get("name", "unknown")
    return [
        f"# {title}",
        "",
        f"- Method: `{meta.method}` with config `{cfg}`",
        f"- Base model: `{meta.model}` (source: {meta.model_source or 'unknown'})",
        f"- Dataset: `{dataset}`; labels: {', '.join(map(str, meta.label_names or [])) or 'unknown'}",
        f"- Exported by {lab_version()}",
        "",
        "## Metrics",
        "",
    ]


def native_card(meta: AdapterMeta, summary: dict[str, Any] | None) -> str:
    """The README of a native export: the run, the files, and the one call that loads it back."""
    n_layers = len(meta.target_layers or [])
    card = _card_header(meta, f"PEFT Lab adapter: {meta.method} on {meta.model}") + _metrics_lines(summary)
    card += [
        "",
        "## Contents",
        "",
        f"- `{ADAPTER_FILE}`: the method's tensors and the task head ({n_layers} adapted layers)",
        f"- `{ADAPTER_CONFIG_FILE}`: method, config, structural state, base model (with a weight fingerprint), "
        "adapted layers",
        f"- `{MANIFEST_FILE}`: sha256 of every file",
        "",
        "## Load",
        "",
        "```python",
        "from engine.export import load_adapter",
        "model, method = load_adapter('<this directory>')",
        "```",
    ]
    return "\n".join(card) + "\n"


def peft_card(meta: AdapterMeta, model: TaskModel, report: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """The README of a PEFT export: Hub metadata, the run, how it was converted and how to load it."""
    base_name = _peft_base_name(meta, model) or meta.model
    auto = model.backend.auto_class
    card = [
        "---",
        f"base_model: {json.dumps(base_name)}",
        "library_name: peft",
        "tags:",
        "- lora",
        f"- peftlab-{meta.method}",
        "---",
        "",
    ] + _card_header(meta, f"LoRA (PEFT layout) from a PEFT Lab {meta.method} run on {meta.model}")
    card += _metrics_lines(summary) + ["", "## Conversion", ""]
    if report["mode"] == "svd":
        card.append(
            f"ΔW of every layer (relative to the pretrained weights) was converted by truncated SVD at rank "
            f"{report['svd_rank']}: relative reconstruction error ‖ΔW − BA‖_F/‖ΔW‖_F = {report['relative_error']:.3e} "
            f"over all layers (worst layer {max(report['layer_errors'].values()):.3e}). The metrics above are the "
            "original run's; the converted adapter is an approximation unless the error is ~0."
        )
    elif report["mode"] == "factors":
        card.append(
            f"The layers' own low-rank factors at rank {report['factor_rank']} were written (e.g. DyLoRA's nested "
            "truncation): relative difference from the adapter as evaluated in the lab ‖ΔW − BA‖_F/‖ΔW‖_F = "
            f"{report['relative_error']:.3e}."
        )
    else:
        card.append(
            "The layers' low-rank factors were written exactly: they reproduce the lab's weights to relative "
            f"error {report['weight_error']:.1e}."
        )
    if report["residual_components"]:
        card.append(
            "\nResidual note: this method trains on a frozen residual weight that differs from the pretrained one "
            "(PiSSA/CorDA style). The difference was folded into the factors (PEFT's PiSSA-to-LoRA conversion, "
            f"{report['residual_components']} extra components in total), so load this adapter on the original "
            "pretrained base model."
        )
    if report["lora_bias"]:
        card.append("\nThe method changes biases: they are carried by `lora_bias` (a bias on lora_B).")
    hub_name = _peft_base_name(meta, model)
    labels_arg = f", num_labels={meta.num_labels}" if model.info.head_names else ""  # a causal LM has no task head
    if report.get("base_model_dir"):  # the bundled base travels with the export
        base_dir = report["base_model_dir"]
        build = [f"from transformers import {auto}", f"base = {auto}.from_pretrained('<this directory>/{base_dir}')"]
    elif hub_name is not None:
        load_call = f"{auto}.from_pretrained({json.dumps(hub_name)}{labels_arg})"
        build = [f"from transformers import {auto}", f"base = {load_call}"]
    else:  # a PEFT Lab test model built from a seed: only the lab can rebuild its weights
        build = [
            "from engine.models import load_model",
            f"base = load_model({meta.model!r}, {meta.num_labels}).net",
        ]
    card += ["", "## Load", "", "```python", *build, "from peft import PeftModel",
             "model = PeftModel.from_pretrained(base, '<this directory>')", "```"]  # fmt: skip
    return "\n".join(card) + "\n"


def merged_card(meta: AdapterMeta, model: TaskModel, summary: dict[str, Any] | None, notes: list[str]) -> str:
    """The README of a merged export: the run, how the backend's files load, and the backend's notes."""
    card = _card_header(meta, f"Merged model: {meta.method} on {meta.model}") + _metrics_lines(summary)
    card += ["", "## Load", ""] + model.backend.merged_card()
    card += [""] + notes
    return "\n".join(card) + "\n"


def lab_meta(meta: AdapterMeta, summary: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """``peftlab.json``: what the lab needs to rebuild the base model and describe the run (PEFT and transformers
    ignore the file)."""
    data = meta.to_json()
    out = {k: data.get(k) for k in LAB_META_KEYS}
    out.update({"lab_version": lab_version(), "model_options": meta.options(), "summary": summary or {}})
    out.update(extra)
    return out
