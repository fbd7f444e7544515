"""The native format, for every method: the adapter tensors byte for byte, ``adapter_config.json`` enriched with
the base model (name, source, revision, options, a per-tensor fingerprint of its weights), the adapted layers and
the lab version, and a model card. ``engine.export.load_adapter`` rebuilds the adapted model from it, and the
fingerprint lets it refuse a base model whose weights differ (``BaseModelMismatch``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from engine.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_FILE, AdapterMeta, base_fingerprint
from engine.export.cards import README_FILE, native_card
from engine.export.paths import FORMAT_VERSION, lab_version
from engine.methods import Method
from engine.models import TaskModel


def target_layers(model: TaskModel, method: Method, base: TaskModel) -> list[dict[str, Any]]:
    """The adapted layers with their role, block and shape (from the unadapted ``base``'s layer table)."""
    table = {l.name: l for l in base.adaptable_layers()}
    out = []
    for name, layer in method.adapted_layers(model).items():
        info = table.get(name)
        out.append({
            "name": name, "role": info.role if info else None, "block": info.block if info else None,
            "in_features": layer.in_features, "out_features": layer.out_features, "kind": type(layer).__name__,
        })  # fmt: skip
    return out


def export_meta(meta: AdapterMeta, model: TaskModel, method: Method, base: TaskModel) -> AdapterMeta:
    """``meta`` enriched with what a reader outside the run needs: the base model and its fingerprint, the adapted
    layers, whether the method merges, the format and lab versions."""
    data = meta.to_json()
    data.update({
        "format": "peftlab-native", "format_version": FORMAT_VERSION, "lab_version": lab_version(),
        "base_model": {
            "name": meta.model, "source": model.info.source, "kind": model.kind,
            "revision": getattr(getattr(base.net, "config", None), "_commit_hash", None),
            "options": meta.options(), "fingerprint": base_fingerprint(base),
        },
        "target_layers": target_layers(model, method, base),
        "mergeable": bool(method.mergeable),
    })  # fmt: skip
    return AdapterMeta.model_validate(data)


def write_native(
    directory: Path,
    model: TaskModel,
    method: Method,
    base: TaskModel,
    meta: AdapterMeta,
    summary: dict[str, Any] | None,
    source_file: Path | None,
) -> None:
    """Adapter tensors (``source_file`` copied byte for byte, else ``Method.adapter_state_dict`` saved), the
    enriched config and the card, into ``directory``."""
    if source_file is not None:
        shutil.copyfile(source_file, directory / ADAPTER_FILE)
    else:
        tensors = method.adapter_state_dict(model)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / ADAPTER_FILE))
    enriched = export_meta(meta, model, method, base)
    full = {**enriched.to_json(), "summary": summary or enriched.summary or {}}
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(full, indent=2, default=str))
    (directory / README_FILE).write_text(native_card(enriched, summary))
