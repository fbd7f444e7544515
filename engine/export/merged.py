"""The merged format: the whole model with ΔW folded in (``Method.merge``), saved by its backend.

Hugging Face models are written with ``save_pretrained`` (safetensors) with their tokenizer or image processor,
loadable with the Auto classes; timm models as a safetensors state dict (the split q/k/v fused back into timm's
``qkv``) plus a config JSON. ``peftlab.json`` beside them lets ``load_merged`` rebuild a timm model by name.
"""

from __future__ import annotations

from pathlib import Path

from engine.artifacts import (
    AdapterMeta,
    ExportError,
    build_model,
    parse_meta,
    read_json,
    read_safetensors,
    verify_manifest,
)
from engine.backends import get_backend, list_backends
from engine.export.cards import LAB_META_FILE
from engine.methods import Method
from engine.models import TaskModel, load_model


def write_merged(model: TaskModel, method: Method, base: TaskModel, directory: Path, meta: AdapterMeta) -> list[str]:
    """Fold ΔW into the weights and save the plain model; returns notes for the card."""
    if method.adapted_layers(model):
        if not method.mergeable:
            raise ExportError(f"method {method.name} is not mergeable (no dense ΔW): use the native format")
        method.merge(model)
    if method.adapted_layers(model):
        raise ExportError(f"method {method.name} left adapted layers after merge")
    ours, plain = set(model.state_dict()), set(base.state_dict())
    if ours != plain:
        extra = sorted(ours - plain) or sorted(plain - ours)
        raise ExportError(f"the merged model's tensors differ from the plain model's (first: {extra[0]})")
    labels = [str(x) for x in meta.label_names or range(meta.num_labels)]
    return model.backend.save_merged(model, directory, labels=labels, lab_model=meta.model, options=meta.options())


def load_merged(directory: str | Path, *, trust_remote_code: bool = False) -> TaskModel:
    """A merged export as a plain ``TaskModel`` (Hugging Face: through the Auto classes; timm: rebuilt by name).

    The directory's own Python (a config's ``auto_map``) runs only with ``trust_remote_code=True`` from the caller.
    """
    directory = Path(directory)
    verify_manifest(directory)
    meta = parse_meta(read_json(directory / LAB_META_FILE), directory / LAB_META_FILE)
    for name in list_backends():
        model = get_backend(name).load_merged(
            directory, lambda: build_model(meta, trust_remote_code=trust_remote_code), read_safetensors
        )
        if model is not None:
            return model.eval()
    return load_model(str(directory), meta.num_labels, trust_remote_code=trust_remote_code).eval()
