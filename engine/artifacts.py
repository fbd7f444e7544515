"""The adapter artifact: one typed record and one API to save, read, fingerprint and apply an adapter.

A run's artifact directory holds ``adapter.safetensors`` (the method's tensors and the task head) and
``adapter_config.json`` (an ``AdapterMeta``: method, config, structural state, base model, labels, spec). Training
writes them with ``save_adapter``; every reader (exports, imports, analyses, pages) goes through ``read_adapter``
and ``apply_adapter`` / ``load_adapted_model`` here, so there is one place that decides what a valid adapter is.

``AdapterMeta`` allows unknown keys (``extra="allow"``) so files written before a field was added, or enriched by
an export (``format``, ``target_layers``, ...), still load; ``AdapterMeta.to_json`` writes the keys back in the
order the file had them, so re-written files keep their bytes.

Security: weights are read only from safetensors files (no pickle), and nothing read from a file turns
``trust_remote_code`` on: every function that loads a base model takes it from its caller (the CLI's
``import --trust-remote-code``, or ``run_trusts_remote_code``: the run's spec in the database).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import UserError
from engine.methods import Method, build_method
from engine.models import TaskModel, load_model

if TYPE_CHECKING:
    from engine.train import Prepared

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"  # sha256 of every file of an export (``engine.export.paths.staged_directory``)
REQUIRED_KEYS = ("method", "method_config", "model", "num_labels")


class AdapterError(UserError):
    """An adapter that cannot be saved, read, applied or exported; the message says why and what to do."""


class AdapterFileError(AdapterError):
    """A missing, unreadable or corrupt adapter file; the message names the file."""


class BaseModelMismatch(AdapterError):
    """An adapter loaded into a different base model; the message names the file, both models and the first
    mismatched tensor."""


class ExportError(AdapterError):
    """An export or import that cannot be done; the message says why and what to do."""


class BaseModelRecord(BaseModel):
    """The base model a native export was made against; ``fingerprint`` is ``{name: [shape, sha256 prefix]}``."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str | None = None
    source: str | None = None
    kind: str | None = None
    revision: str | None = None
    options: dict[str, Any] | None = None
    fingerprint: dict[str, list[Any]] | None = None


class AdapterMeta(BaseModel):
    """``adapter_config.json``: what it takes to rebuild the adapted model (and to describe it in a model card)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    method: str
    method_config: dict[str, Any]
    method_state: dict[str, Any] = Field(default_factory=dict)
    model: str
    model_source: str | None = None
    num_labels: int
    label_names: list[Any] | None = None
    spec: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    model_options: dict[str, Any] | None = None  # older files and ``peftlab.json``; newer ones keep them in spec
    base_model: BaseModelRecord | None = None  # native exports
    target_layers: list[dict[str, Any]] | None = None  # native exports
    imported_from: dict[str, Any] | None = None  # imports from the PEFT layout

    _keys: list[str] = PrivateAttr(default_factory=list)
    _directory: Path | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler: Any) -> AdapterMeta:
        meta = handler(data)
        if isinstance(data, dict):
            meta._keys = list(data)
        return meta

    def to_json(self) -> dict[str, Any]:
        """The JSON object to write: the keys the record was built from, in their order, then any set since."""
        data = self.model_dump(exclude_unset=True)
        order = [k for k in self._keys if k in data] + [k for k in data if k not in self._keys]
        return {k: data[k] for k in order}

    @property
    def directory(self) -> Path | None:
        """The adapter directory this record was read from (None when built in memory)."""
        return self._directory

    @property
    def seed(self) -> int:
        """The run's seed: ``engine.train.prepare`` initialises the adapter from it."""
        return int(((self.spec or {}).get("train") or {}).get("seed", 0))

    @property
    def fingerprint(self) -> dict[str, list[Any]] | None:
        return self.base_model.fingerprint if self.base_model is not None else None

    def options(self) -> dict[str, Any]:
        """The base model's options (``init_seed``, timm's ``pretrained``, ...) recorded in the adapter."""
        return model_options(self.spec, self.model_options)

    def describe(self) -> str:
        return f"{self.model!r} (source {self.model_source or 'unknown'})"

    def file_prefix(self, name: str) -> str:
        """``"<directory>/<name>: "`` when the record came from a directory, so an error names the file."""
        return f"{self._directory / name}: " if self._directory is not None else ""


def model_options(spec: dict[str, Any] | None, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The base model's options: the spec's ``model_options``, else the top-level ones older files recorded."""
    return dict((spec or {}).get("model_options") or recorded or {})


class AdaptedModel(NamedTuple):
    """An adapter applied to its base model: the record, the model (in eval mode) and its method."""

    meta: AdapterMeta
    model: TaskModel
    method: Method


# --- files -------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file (``hashlib.file_digest`` reads it in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or an ``AdapterFileError`` naming the file."""
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on the CPU), or an ``AdapterFileError`` naming the file."""
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def verify_manifest(directory: Path, names: list[str] | None = None) -> None:
    """Check the sha256 of the listed files (all of the manifest by default) against ``manifest.json``."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return
    files = read_json(path).get("files", {})
    for name in names if names is not None else list(files):
        if name not in files:
            continue
        file = directory / name
        if not file.is_file():
            raise AdapterFileError(f"{file} is listed in {path} but missing")
        digest = sha256_file(file)
        if digest != files[name]["sha256"]:
            raise AdapterFileError(
                f"{file} is corrupt: its sha256 {digest[:12]}… differs from {files[name]['sha256'][:12]}… in {path}"
            )


def parse_meta(data: dict[str, Any], path: Path) -> AdapterMeta:
    """``data`` (read from ``path``) as an ``AdapterMeta``; a missing or mistyped field names the file."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise AdapterFileError(f"{path} lacks {', '.join(missing)}: not a PEFT Lab adapter")
    try:
        return AdapterMeta.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise AdapterFileError(f"{path}: field {field!r} is invalid ({first['msg']}): fix or re-export it") from None


def save_adapter(prep: Prepared, out_dir: Path, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the adapter (safetensors) and its config (JSON) atomically: temp name, then rename."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config = out_dir / ADAPTER_FILE, out_dir / ADAPTER_CONFIG_FILE
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.cpu() for k, v in prep.method.adapter_state_dict(prep.model).items()}, str(tmp))
    os.replace(tmp, weights)
    meta = AdapterMeta.model_validate({
        "method": prep.method.name,
        "method_config": prep.method.config.model_dump(mode="json"),
        "method_state": prep.method.state(),
        "model": prep.spec.model,
        "model_source": prep.model.info.source,
        "num_labels": prep.data.num_labels,
        "label_names": prep.data.label_names,
        "spec": prep.spec.model_dump(mode="json"),
        **(extra or {}),
    })  # fmt: skip
    tmp = config.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta.to_json(), indent=2))
    os.replace(tmp, config)
    return weights, config


def read_adapter(directory: str | Path) -> tuple[AdapterMeta, dict[str, torch.Tensor]]:
    """The record and tensors of a native adapter directory (a run's, or a native export, checked against its
    manifest). A missing, corrupt or incomplete file raises ``AdapterFileError`` naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory")
    verify_manifest(directory, [ADAPTER_FILE, ADAPTER_CONFIG_FILE])
    meta = parse_meta(read_json(directory / ADAPTER_CONFIG_FILE), directory / ADAPTER_CONFIG_FILE)
    meta._directory = directory
    return meta, read_safetensors(directory / ADAPTER_FILE)


# --- the base model, its fingerprint and the adapter applied to it ---------------------------------


def run_trusts_remote_code(run: dict[str, Any]) -> bool:
    """Whether the base model of a run in the database may run its repository's Python (``trust_remote_code``).

    The one trusted source is the spec stored in the run's database row: for a run the lab trained it is the
    user's own spec, and for an imported run ``jobs.imports.record_import`` recorded ``false`` there unless the user
    passed ``--trust-remote-code`` at import. Files (an adapter's ``adapter_config.json``, ``peftlab.json``, a PEFT
    config, a model card), even those in the run's own artifact directory, are never asked: an imported run's
    directory holds the imported files byte for byte.
    """
    return bool((run.get("spec") or {}).get("trust_remote_code"))


def build_model(meta: AdapterMeta, *, trust_remote_code: bool = False) -> TaskModel:
    """The base model an adapter was trained on, rebuilt by name with a fresh task head.

    ``meta`` comes from a file, so a ``trust_remote_code`` in it (``spec.trust_remote_code``) is ignored: the
    model's own Python runs only when the caller passes ``trust_remote_code=True`` (see ``run_trusts_remote_code``).
    """
    return load_model(meta.model, meta.num_labels, options=meta.options(), trust_remote_code=trust_remote_code)


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def base_fingerprint(model: TaskModel) -> dict[str, list[Any]]:
    """``{name: [shape, sha256 prefix]}`` of every backbone parameter (task head excluded) of an unadapted model."""
    if Method.adapted_layers(model):
        raise AdapterError("base_fingerprint needs the model before a method is applied")
    head = set(model.head_parameter_names())
    return {n: [list(p.shape), _tensor_digest(p)] for n, p in model.named_parameters() if n not in head}


def _model_label(model: TaskModel) -> str:
    return f"{model.info.name!r} (source {model.info.source or 'unknown'})"


def check_base_fingerprint(meta: AdapterMeta, model: TaskModel, fingerprint: dict[str, list[Any]]) -> None:
    """Raise ``BaseModelMismatch`` naming the first backbone tensor that differs from the adapter's base."""
    expected = meta.fingerprint
    if not expected:
        return
    for name in list(fingerprint) + [n for n in expected if n not in fingerprint]:
        ours, theirs = fingerprint.get(name), expected.get(name)
        if ours == theirs:
            continue
        if ours is None:
            assert theirs is not None
            detail = f"{name} (shape {tuple(theirs[0])}) is in the adapter's base model but not in this model"
        elif theirs is None:
            detail = f"{name} (shape {tuple(ours[0])}) is in this model but not in the adapter's base model"
        elif ours[0] != theirs[0]:
            detail = f"{name}: shape {tuple(theirs[0])} in the adapter's base model, {tuple(ours[0])} in this model"
        else:
            detail = f"{name}: same shape {tuple(ours[0])}, different values"
        raise BaseModelMismatch(
            f"{meta.file_prefix(ADAPTER_CONFIG_FILE)}adapter was trained on base model {meta.describe()} but this "
            f"model is {_model_label(model)}: their weights differ; first mismatched tensor {detail}"
        )


def check_adapter_fits(meta: AdapterMeta, model: TaskModel, method: Method, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``BaseModelMismatch`` naming the first adapter tensor missing from, or misshapen in, the model."""
    expected = {k: tuple(v.shape) for k, v in method.adapter_state_dict(model).items()}
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = None
    for key, shape in expected.items():
        if key not in tensors:
            problem = f"{key} (shape {shape}) is expected by the model but missing from the adapter"
        elif tuple(tensors[key].shape) != shape:
            problem = f"{key}: adapter {tuple(tensors[key].shape)}, model {shape}"
        if problem:
            break
    if problem is None:
        extra = [k for k in tensors if k not in model_shapes]
        if extra:
            problem = f"{extra[0]} (shape {tuple(tensors[extra[0]].shape)}) is in the adapter but not in the model"
    if problem:
        raise BaseModelMismatch(
            f"{meta.file_prefix(ADAPTER_FILE)}adapter was trained on base model {meta.describe()} with method "
            f"{meta.method} and does not fit model {_model_label(model)}: first mismatched tensor {problem}"
        )


def apply_adapter(meta: AdapterMeta, tensors: dict[str, torch.Tensor], model: TaskModel) -> tuple[TaskModel, Method]:
    """Apply the adapter's method (config, structural state, tensors) to a fresh, unadapted ``model``.

    The method is initialised at the run's seed (as ``engine.train.prepare`` did) before its state and tensors are
    loaded; a base model the adapter does not fit, or whose weights differ from the recorded fingerprint, raises
    ``BaseModelMismatch`` naming the adapter's file and the first mismatched tensor.
    """
    if Method.adapted_layers(model):
        raise AdapterError(f"model {model.info.name} already carries adapted layers: pass a fresh model")
    fingerprint = base_fingerprint(model) if meta.fingerprint else None
    method = build_method(meta.method, meta.method_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(meta.seed)  # as engine.train.prepare: adapter init depends on the seed only
        try:
            method.apply(model)
        except ValueError as err:
            raise BaseModelMismatch(
                f"{meta.file_prefix(ADAPTER_CONFIG_FILE)}adapter trained on base model {meta.describe()} cannot be "
                f"applied to model {_model_label(model)}: {err}"
            ) from None
    method.load_state(model, meta.method_state)
    check_adapter_fits(meta, model, method, tensors)
    if fingerprint is not None:
        check_base_fingerprint(meta, model, fingerprint)
    device = next(model.parameters()).device
    method.load_adapter_state_dict(model, {k: v.to(device) for k, v in tensors.items()})
    model.eval()
    return model, method


def load_adapted_model(
    directory: str | Path, model: TaskModel | None = None, *, trust_remote_code: bool = False
) -> AdaptedModel:
    """A native adapter directory applied to its base model: ``model`` (fresh, unadapted) or the base rebuilt by
    name, running the model's own Python only with ``trust_remote_code`` from the caller."""
    meta, tensors = read_adapter(directory)
    base = model if model is not None else build_model(meta, trust_remote_code=trust_remote_code)
    adapted, method = apply_adapter(meta, tensors, base)
    return AdaptedModel(meta, adapted, method)
