"""Read an adapter directory back: native, or the Hugging Face PEFT LoRA layout mapped to our ``lora`` method.

``import_adapter`` gives what a run row needs (a validated spec, the ``AdapterMeta`` and tensors); ``plan_import``
loads it into its base model first so a corrupt or mismatched adapter is refused before anything is written, and
``write_imported_files`` stages the files of the run's new artifact directory. Recording the run in the database
is ``jobs.imports.record_import``'s (the engine never writes the database).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from engine.artifacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    AdapterFileError,
    AdapterMeta,
    ExportError,
    apply_adapter,
    build_model,
    read_adapter,
    read_json,
    read_safetensors,
    sha256_file,
    verify_manifest,
)
from engine.export.cards import LAB_META_FILE, README_FILE
from engine.export.paths import staging_dir
from engine.export.peft_format import PEFT_PREFIX, PEFT_WEIGHTS_FILE
from engine.methods import build_method
from engine.models import ROLES, TaskModel, count_parameters, load_model


def detect_layout(directory: str | Path) -> Literal["native", "peft"]:
    """``native`` (our ``adapter.safetensors``) or ``peft`` (``adapter_model.safetensors`` with a ``peft_type``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory")
    if (directory / ADAPTER_FILE).is_file():
        return "native"
    if (directory / PEFT_WEIGHTS_FILE).is_file() and "peft_type" in read_json(directory / ADAPTER_CONFIG_FILE):
        return "peft"
    raise AdapterFileError(
        f"{directory} holds neither a native adapter ({ADAPTER_FILE} + {ADAPTER_CONFIG_FILE}) nor a PEFT adapter "
        f"({PEFT_WEIGHTS_FILE} + {ADAPTER_CONFIG_FILE})"
    )


@dataclass
class ImportedAdapter:
    """What a run row needs: a validated RunSpec dict, our adapter config and tensors, and where they came from."""

    spec: dict[str, Any]
    meta: AdapterMeta  # our adapter_config.json (method, method_config, method_state, model, ...)
    tensors: dict[str, torch.Tensor]
    source_format: Literal["native", "peft"]
    directory: Path
    summary: dict[str, Any]
    base: TaskModel | None = None  # the fresh model a PEFT conversion built (reusable, still unadapted)


def _pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _peft_to_native(
    directory: Path, model: TaskModel | None, model_name: str | None, num_labels: int | None, trust_remote_code: bool
) -> tuple[AdapterMeta, dict[str, torch.Tensor], TaskModel]:
    """Map a PEFT LoRA directory to our ``lora`` method: config, tensors (our keys) and the base model used."""
    verify_manifest(directory, [PEFT_WEIGHTS_FILE, ADAPTER_CONFIG_FILE])
    cfg = read_json(directory / ADAPTER_CONFIG_FILE)
    if cfg.get("peft_type") != "LORA":
        raise ExportError(f"{directory}: PEFT type {cfg.get('peft_type')} cannot be imported (LoRA only)")
    for flag, why in (("use_dora", "DoRA magnitudes"), ("lora_bias", "bias on lora_B")):
        if cfg.get(flag):
            raise ExportError(f"{directory}: PEFT {flag} ({why}) has no equivalent in our lora method")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(("pissa", "corda", "olora", "loftq")):
        raise ExportError(
            f"{directory}: init_lora_weights={init!r} means the adapter belongs to a modified (residual) base model, "
            "not the pretrained one: save it from PEFT with path_initial_model_for_weight_conversion to get a plain "
            "LoRA on the pretrained weights"
        )
    tensors = read_safetensors(directory / PEFT_WEIGHTS_FILE)
    lab = read_json(directory / LAB_META_FILE) if (directory / LAB_META_FILE).is_file() else {}
    name = (
        model.info.name if model is not None else model_name or lab.get("model") or cfg.get("base_model_name_or_path")
    )
    if not name:
        raise ExportError(f"{directory}: no base model recorded; pass model_name")

    # PEFT's sequence-classification task adds the classifier to modules_to_save itself.
    saved_modules = list(cfg.get("modules_to_save") or [])
    if cfg.get("task_type") == "SEQ_CLS":
        saved_modules += ["classifier", "score"]
    adapted: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ExportError(f"{directory / PEFT_WEIGHTS_FILE}: key {key} lacks PEFT's {PEFT_PREFIX!r} prefix")
        path = key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.", ".")
        match = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", path)
        if match:
            adapted.setdefault(match.group(1), {})[match.group(2)] = value
        elif ".lora_" not in path and any(f".{m}." in f".{path}" for m in saved_modules):
            head["net." + path] = value
        else:
            raise ExportError(
                f"{directory / PEFT_WEIGHTS_FILE}: tensor {key} is neither a LoRA factor nor part of a module to "
                "save: it has no equivalent in our lora method"
            )
    if not adapted:
        raise ExportError(f"{directory / PEFT_WEIGHTS_FILE} holds no lora_A/lora_B tensors")
    labels_guess = next((v.shape[0] for k, v in head.items() if k.endswith(".weight")), None)
    n_labels = model.info.num_labels if model is not None else num_labels or lab.get("num_labels") or labels_guess
    if n_labels is None:
        raise ExportError(f"{directory}: the number of labels is unknown (no saved classifier); pass num_labels")
    if model is None:
        options = dict(lab.get("model_options") or {})
        model = load_model(name, int(n_labels), options=options, trust_remote_code=trust_remote_code)

    table = {l.name: l for l in model.adaptable_layers()}
    unknown = [p for p in adapted if "net." + p not in table]
    if unknown:
        raise ExportError(f"PEFT module {unknown[0]} is not an adaptable layer (q, k, v, o, fc1, fc2) of {name}")
    used = [table["net." + p] for p in adapted]
    roles = [r for r in ROLES if any(l.role == r for l in used)]
    all_blocks = sorted({l.block for l in table.values() if l.role in roles})
    used_blocks = sorted({l.block for l in used})
    blocks = None if used_blocks == all_blocks else used_blocks
    selected = {l.name for l in table.values() if l.role in roles and (blocks is None or l.block in blocks)}
    if selected != {l.name for l in used}:
        raise ExportError(
            f"the PEFT adapter's layers ({', '.join(sorted(adapted))}) are not a roles × blocks selection our "
            "lora config can express"
        )
    rslora = bool(cfg.get("use_rslora"))
    lora_alpha = float(cfg.get("lora_alpha", 8))
    rank = max(parts["lora_A"].shape[0] for parts in adapted.values())
    scaling = lora_alpha / (math.sqrt(rank) if rslora else rank)
    ours: dict[str, torch.Tensor] = {}
    for path, parts in adapted.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ExportError(f"PEFT module {path} lacks {({'lora_A', 'lora_B'} - set(parts)).pop()}")
        a, b = parts["lora_A"], parts["lora_B"]
        r = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), path, lora_alpha))
        layer_scaling = alpha / (math.sqrt(r) if rslora else r)
        if r < rank:  # zero rows/columns leave B A unchanged
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        if layer_scaling != scaling:
            b = b * (layer_scaling / scaling)
        ours[f"net.{path}.lora_A.weight"], ours[f"net.{path}.lora_B.weight"] = a, b
    ours.update(head)
    method_config = build_method("lora", {
        "rank": rank, "alpha": lora_alpha, "dropout": float(cfg.get("lora_dropout") or 0.0), "use_rslora": rslora,
        "target_roles": roles, "blocks": blocks,
    }).config.model_dump(mode="json")  # fmt: skip
    meta = AdapterMeta.model_validate({
        "method": "lora",
        "method_config": method_config,
        "method_state": {},
        "model": name,
        "model_source": model.info.source,
        "num_labels": int(n_labels),
        "label_names": lab.get("label_names") or [str(i) for i in range(int(n_labels))],
        "spec": lab.get("spec"),
        "summary": lab.get("summary") or {},
        "imported_from": {
            "format": "peft", "peft_version": cfg.get("peft_version"), "method": lab.get("method"),
            "conversion": lab.get("conversion"),
        },
    })  # fmt: skip
    return meta, ours, model


def import_adapter(
    directory: str | Path,
    *,
    model: TaskModel | None = None,
    model_name: str | None = None,
    num_labels: int | None = None,
    dataset: str | None = None,
    trust_remote_code: bool = False,
) -> ImportedAdapter:
    """Read a native or PEFT adapter directory: the spec for a run row, our config and tensors.

    A PEFT LoRA adapter becomes our ``lora`` method (rank, alpha, rsLoRA, dropout; target roles and blocks from
    the adapted module paths; per-layer ranks zero-padded with B rescaled so ``s·B A`` is unchanged; the
    ``modules_to_save`` head as the task head). Its base model comes from ``model``, ``model_name``, the lab
    metadata of our own PEFT exports, or ``base_model_name_or_path``.

    The returned spec's ``trust_remote_code`` is the caller's ``trust_remote_code``, whatever the files say: a
    directory cannot make its base model's Python run (loading a PEFT adapter's base model here included).
    """
    from engine.spec import parse_spec

    directory = Path(directory)
    base = None
    if detect_layout(directory) == "native":
        meta, tensors = read_adapter(directory)
        source_format: Literal["native", "peft"] = "native"
    else:
        meta, tensors, base = _peft_to_native(directory, model, model_name, num_labels, trust_remote_code)
        source_format = "peft"
    spec = copy.deepcopy(meta.spec or {})
    if not spec and dataset is None and base is not None and base.info.modality == "image":
        dataset = "digits"  # a foreign PEFT adapter: a bundled dataset of the model's modality to evaluate on
    spec["model"] = meta.model
    spec["method"] = {"name": meta.method, **meta.method_config}
    if dataset is not None:
        spec["dataset"] = {**(spec.get("dataset") or {}), "name": dataset}
    spec["tags"] = sorted({*(spec.get("tags") or []), "imported"})
    spec["trust_remote_code"] = trust_remote_code  # the caller's choice, never the file's
    spec = parse_spec(spec).model_dump(mode="json")
    summary = dict(meta.summary or {})
    return ImportedAdapter(spec, meta, tensors, source_format, directory, summary, base)


@dataclass
class ImportPlan:
    """An adapter to import, already loaded into its base model: the run's spec and summary, its parameter counts."""

    imported: ImportedAdapter
    spec: dict[str, Any]
    summary: dict[str, Any]
    trainable_params: int
    total_params: int


def plan_import(
    directory: str | Path,
    *,
    name: str | None = None,
    experiment: str | None = None,
    dataset: str | None = None,
    model_name: str | None = None,
    trust_remote_code: bool = False,
) -> ImportPlan:
    """Read an exported adapter and load it into its base model (so a corrupt or mismatched adapter is refused
    before anything is written): the spec, summary and parameter counts of the run ``jobs.imports.record_import``
    records.

    The base model runs its repository's Python only with ``trust_remote_code=True``; the spec holds that choice,
    and a ``trust_remote_code`` in the imported files is ignored.
    """
    imported = import_adapter(directory, model_name=model_name, dataset=dataset, trust_remote_code=trust_remote_code)
    if imported.base is not None:
        base = imported.base
    else:
        base = build_model(imported.meta, trust_remote_code=trust_remote_code)
    model, method = apply_adapter(imported.meta, imported.tensors, base)
    trainable, total = count_parameters(model)
    spec = dict(imported.spec)
    if name is not None:
        spec["name"] = name
    if experiment is not None:
        spec["experiment"] = experiment
    summary = {
        **imported.summary,
        "adapter_params": method.adapter_param_count(model),
        "imported_from": {"directory": str(imported.directory), "format": imported.source_format,
                          **(imported.meta.imported_from or {})},
    }  # fmt: skip
    return ImportPlan(imported, spec, summary, trainable, total)


def write_imported_files(imported: ImportedAdapter, target: Path) -> None:
    """Write an imported adapter's files into the new directory ``target`` (a run's artifact directory).

    The files are staged in a hidden sibling of ``target`` and renamed into place: native files are copied byte
    for byte (checked by sha256), a PEFT adapter is written in the native layout, and a ``README.md`` is copied.
    On any error the staging directory is removed and ``target`` is not created.
    """
    staging = staging_dir(target)
    try:
        source = imported.directory
        if imported.source_format == "native":
            shutil.copyfile(source / ADAPTER_FILE, staging / ADAPTER_FILE)
            shutil.copyfile(source / ADAPTER_CONFIG_FILE, staging / ADAPTER_CONFIG_FILE)
            for src, dst in ((source / ADAPTER_FILE, staging / ADAPTER_FILE),
                             (source / ADAPTER_CONFIG_FILE, staging / ADAPTER_CONFIG_FILE)):  # fmt: skip
                if sha256_file(src) != sha256_file(dst):
                    raise AdapterFileError(f"copying {src} changed its bytes")
        else:
            save_file({k: v.contiguous() for k, v in imported.tensors.items()}, str(staging / ADAPTER_FILE))
            (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(imported.meta.to_json(), indent=2, default=str))
        if (source / README_FILE).is_file():
            shutil.copyfile(source / README_FILE, staging / README_FILE)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
