"""Export trained adapters (native, Hugging Face PEFT, merged) and import them back.

A run's artifact directory holds ``adapter.safetensors`` and ``adapter_config.json`` (``engine.artifacts``: the one
place that saves, reads, fingerprints and applies an adapter). From it, ``export_run`` writes one of three formats
into a directory under an export root, one writer per format:

* ``native`` (every method, ``engine.export.native``): the adapter tensors byte for byte, ``adapter_config.json``
  enriched with the base model and its weight fingerprint, and a model card. ``load_adapter`` rebuilds the
  adapted model from it.
* ``peft`` (``engine.export.peft_format``): the Hugging Face PEFT LoRA layout, so
  ``PeftModel.from_pretrained(base, DIR)`` gives the lab's logits; exact from low-rank factors, or by truncated
  SVD of ΔW at a chosen rank.
* ``merged`` (``engine.export.merged``): the whole model with ΔW folded in, loadable with the Auto classes (timm:
  a safetensors state dict plus a config JSON).

Every export is staged beside its target and renamed into place with a ``manifest.json`` (``engine.export.paths``);
model cards come from ``engine.export.cards``. ``import_adapter`` reads a native or PEFT directory back
(``engine.export.importer``); ``plan_import`` and ``write_imported_files`` prepare an import for
``jobs.imports.record_import``, which records it as a run (the engine never writes the database).

No file read here turns ``trust_remote_code`` on: every function that loads a base model takes it from its caller
(the CLI's ``import --trust-remote-code``, or ``run_trusts_remote_code``: the run's spec in the database).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.artifacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    MANIFEST_FILE,
    AdapterError,
    AdapterFileError,
    AdapterMeta,
    BaseModelMismatch,
    ExportError,
    apply_adapter,
    base_fingerprint,
    build_model,
    check_adapter_fits,
    check_base_fingerprint,
    model_options,
    read_adapter,
    read_json,
    read_safetensors,
    run_trusts_remote_code,
    sha256_file,
    verify_manifest,
)
from engine.export.cards import LAB_META_FILE, README_FILE, lab_meta, merged_card, peft_card
from engine.export.importer import (
    ImportedAdapter,
    ImportPlan,
    detect_layout,
    import_adapter,
    plan_import,
    write_imported_files,
)
from engine.export.merged import load_merged, write_merged
from engine.export.native import target_layers, write_native
from engine.export.paths import (
    FORMAT_VERSION,
    UnsafePathError,
    command_line_export_root,
    lab_version,
    resolve_export_dir,
    staged_directory,
)
from engine.export.peft_format import (
    EXACT_TOLERANCE,
    PEFT_PREFIX,
    PEFT_WEIGHTS_FILE,
    LayerFactors,
    lora_factors,
    lora_scaling_convention,
    write_peft,
)
from engine.methods import Method
from engine.models import TaskModel, load_model

__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "EXACT_TOLERANCE", "FORMATS", "FORMAT_VERSION", "LAB_META_FILE",
    "MANIFEST_FILE", "PEFT_PREFIX", "PEFT_WEIGHTS_FILE", "README_FILE", "AdapterError", "AdapterFileError",
    "AdapterMeta", "BaseModelMismatch", "ExportError", "ExportFormat", "ExportResult", "ImportPlan",
    "ImportedAdapter", "LayerFactors", "UnsafePathError", "apply_adapter", "base_fingerprint", "build_model",
    "check_adapter_fits", "check_base_fingerprint", "command_line_export_root", "detect_layout", "export_model",
    "export_run", "fresh_model", "import_adapter", "lab_version", "load_adapter", "load_merged", "lora_factors",
    "lora_scaling_convention", "plan_import", "read_safetensors", "resolve_export_dir", "run_trusts_remote_code",
    "sha256_file", "staged_directory", "target_layers", "verify_manifest", "write_imported_files", "write_merged",
    "write_peft",
]  # fmt: skip

ExportFormat = Literal["native", "peft", "merged"]
FORMATS: tuple[str, ...] = ("native", "peft", "merged")


def fresh_model(meta: AdapterMeta | dict[str, Any], *, trust_remote_code: bool = False) -> TaskModel:
    """``engine.artifacts.build_model`` under its former name, also for a record held as a plain dict (only
    ``model``, ``num_labels`` and the model options are read, so a partial dict is enough)."""
    if isinstance(meta, dict):
        options = model_options(meta.get("spec"), meta.get("model_options"))
        return load_model(meta["model"], int(meta["num_labels"]), options=options, trust_remote_code=trust_remote_code)
    return build_model(meta, trust_remote_code=trust_remote_code)


@dataclass
class ExportResult:
    format: str
    path: Path
    files: dict[str, str]  # file name -> sha256 (as in manifest.json)
    relative_error: float | None = None  # LoRA conversions: ‖ΔW − ΔW_peft‖_F / ‖ΔW‖_F over all layers
    weight_error: float | None = None  # the same error relative to the dense weights ‖W0 + ΔW‖_F
    layer_errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_adapter(
    directory: str | Path, model: TaskModel | None = None, *, trust_remote_code: bool = False
) -> tuple[TaskModel, Method]:
    """Rebuild the adapted model from a native or PEFT adapter directory.

    The model is rebuilt by name (or ``model``, fresh and unadapted, is used), the method applied with its config,
    ``Method.load_state`` re-applies its structural state and ``load_adapter_state_dict`` its tensors. A different
    base model fails with ``BaseModelMismatch`` naming both models and the first mismatched tensor. The base model
    runs its repository's Python only with ``trust_remote_code=True`` from the caller, never because a file says so.
    """
    imported = import_adapter(directory, model=model, trust_remote_code=trust_remote_code)
    if model is not None:
        base = model
    elif imported.base is not None:
        base = imported.base
    else:
        base = build_model(imported.meta, trust_remote_code=trust_remote_code)
    return apply_adapter(imported.meta, imported.tensors, base)


def _write_peft_export(
    staging: Path, model: TaskModel, method: Method, base: TaskModel, meta: AdapterMeta, summary: dict | None,
    result: ExportResult, svd_rank: int | None, factor_rank: int | None,
) -> None:  # fmt: skip
    """The PEFT layout, ``peftlab.json`` with the conversion report, and the card; the errors go into ``result``."""
    report = write_peft(model, method, base, staging, meta, svd_rank=svd_rank, factor_rank=factor_rank)
    (staging / LAB_META_FILE).write_text(json.dumps(lab_meta(meta, summary, conversion=report), indent=2))
    (staging / README_FILE).write_text(peft_card(meta, model, report, summary))
    result.relative_error, result.weight_error = report["relative_error"], report["weight_error"]
    result.layer_errors = report["layer_errors"]
    if report["residual_components"]:
        result.notes.append("frozen residual folded into the factors (PiSSA-to-LoRA conversion)")
    if report["lora_bias"]:
        result.notes.append("bias updates carried by lora_bias")


def _write_merged_export(
    staging: Path, model: TaskModel, method: Method, base: TaskModel, meta: AdapterMeta, summary: dict | None,
    result: ExportResult,
) -> None:  # fmt: skip
    """The merged model, ``peftlab.json`` and the card; the backend's notes go into ``result``."""
    notes = write_merged(model, method, base, staging, meta)
    (staging / LAB_META_FILE).write_text(json.dumps(lab_meta(meta, summary, kind=model.kind), indent=2))
    (staging / README_FILE).write_text(merged_card(meta, model, summary, notes))
    result.notes.extend(notes)


def export_model(
    model: TaskModel,
    method: Method,
    meta: AdapterMeta | dict[str, Any],
    fmt: ExportFormat,
    out: str | Path,
    *,
    root: str | Path,
    summary: dict[str, Any] | None = None,
    svd_rank: int | None = None,
    factor_rank: int | None = None,
    overwrite: bool = False,
    source_dir: Path | None = None,
    base: TaskModel | None = None,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export an adapted model (``meta``: its ``adapter_config.json``) in format ``fmt`` to ``root/out``.

    ``native`` copies ``source_dir``'s tensors when given (else writes ``Method.adapter_state_dict``); ``peft``
    and ``merged`` need the pretrained ``base`` (rebuilt from ``meta`` when not given, running the model's own
    Python only with ``trust_remote_code``). ``merged`` modifies ``model`` in place (the method is merged).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    meta = meta if isinstance(meta, AdapterMeta) else AdapterMeta.model_validate(meta)
    target = resolve_export_dir(out, root)
    if base is None:
        base = build_model(meta, trust_remote_code=trust_remote_code)
    summary = summary if summary is not None else meta.summary
    result = ExportResult(format=fmt, path=target, files={})
    with staged_directory(target, fmt=fmt, overwrite=overwrite) as staging:
        if fmt == "native":
            source_file = source_dir / ADAPTER_FILE if source_dir is not None else None
            write_native(staging, model, method, base, meta, summary, source_file)
        elif fmt == "peft":
            _write_peft_export(staging, model, method, base, meta, summary, result, svd_rank, factor_rank)
        else:
            _write_merged_export(staging, model, method, base, meta, summary, result)
    manifest = read_json(target / MANIFEST_FILE)
    result.files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    return result


def export_run(
    adapter_dir: str | Path,
    fmt: ExportFormat,
    out: str | Path,
    *,
    root: str | Path,
    summary: dict[str, Any] | None = None,
    svd_rank: int | None = None,
    factor_rank: int | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export a run's adapter directory (``adapter.safetensors`` + ``adapter_config.json``) to ``root/out``.

    ``summary`` is the run's summary (``final_metrics``, steps, parameter counts) for the model card. ``svd_rank``
    (``peft`` only) converts any mergeable method to LoRA by truncated SVD; ``factor_rank`` asks layers whose
    ``low_rank_factors`` take a rank (DyLoRA) for that rank. ``trust_remote_code`` comes from the caller (the run's
    spec in the database, ``run_trusts_remote_code``), never from the adapter's files. Nothing is left behind on
    error.
    """
    source = Path(adapter_dir)
    resolve_export_dir(out, root)  # refuse a bad name before any work
    if detect_layout(source) != "native":
        raise ExportError(
            f"{source} is a PEFT directory: import it first (jobs.imports.record_import), then export the run"
        )
    meta, tensors = read_adapter(source)
    base = build_model(meta, trust_remote_code=trust_remote_code)
    model, method = apply_adapter(meta, tensors, build_model(meta, trust_remote_code=trust_remote_code))
    return export_model(
        model, method, meta, fmt, out, root=root, summary=summary, svd_rank=svd_rank,
        factor_rank=factor_rank, overwrite=overwrite, source_dir=source, base=base,
    )  # fmt: skip
