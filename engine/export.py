"""Export trained adapters (native, Hugging Face PEFT, merged) and import them back.

A run's artifact directory holds ``adapter.safetensors`` and ``adapter_config.json`` (``engine.train.save_adapter``).
From it, ``export_run`` writes one of three formats into a directory under an export root:

* ``native`` (every method): the adapter tensors byte for byte, ``adapter_config.json`` enriched with the base model
  (name, source, revision, a per-tensor fingerprint of its weights), the adapted layers and the lab version, and a
  model card ``README.md`` with the run's metrics. ``load_adapter`` rebuilds the adapted model from it.
* ``peft``: the Hugging Face PEFT LoRA layout (``adapter_model.safetensors`` + ``adapter_config.json``), so
  ``PeftModel.from_pretrained(base, DIR)`` gives the lab's logits. Which tensors are written is decided from the
  method contract alone (``delta_weight``, ``effective_base_weight``, optional ``low_rank_factors``), never from
  the method's name:

  - a layer exposing ``low_rank_factors()`` (B with the scaling folded in, A) is written exactly;
  - if its frozen weight is not the pretrained one (PiSSA, CorDA keep a residual ``W_res = W0 − s B0 A0``), the
    residual difference ``W_res − W0`` is factored by SVD at its numerical rank and concatenated to the trained
    factors, ``[B, U_res] [A; V_res]``: PEFT's own PiSSA-to-LoRA conversion (``ΔW' = ΔW_trained − ΔW_init`` with
    rank-2r factors, ``path_initial_model_for_weight_conversion``), written against the pretrained ``W0``;
  - any mergeable method can instead be converted by truncated SVD of ``W_eff + ΔW − W0`` at a chosen rank
    (Eckart–Young: the best rank-k approximation in Frobenius norm); the relative reconstruction error
    ``‖ΔW − B A‖_F / ‖ΔW‖_F`` is returned and written into the README;
  - a non-zero ``Δb`` is carried exactly by PEFT's ``lora_bias`` (a bias on ``lora_B``);
  - DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5: ``W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row``) is written with
    ``use_dora`` and ``lora_magnitude_vector = m``.

  Every exact conversion is checked against the layer's dense weight ``W_eff + ΔW`` before anything is written.

  A variant PEFT computes differently from plain LoRA says how through its ``Method.peft_variant`` (the flags it
  needs, e.g. ``use_dora``, and the attributes holding its factors when its layers have no
  ``low_rank_factors()``); nothing here is keyed by method name.
* ``merged``: the whole model with ΔW folded in (``Method.merge``), saved with ``save_pretrained`` (safetensors)
  with its tokenizer or image processor, loadable with the Auto classes; timm models as a safetensors state dict
  (the split q/k/v fused back into timm's ``qkv``) plus a config JSON.

Every export is written into a temporary directory beside the target and renamed into place, with a
``manifest.json`` holding the sha256 of every file; output names that leave the export root (``..``, absolute
paths elsewhere, symlinks) are refused. ``import_adapter`` reads a native or PEFT directory back (PEFT LoRA keys
map to our ``lora`` method); ``plan_import`` and ``write_imported_files`` prepare an import for
``jobs.imports.record_import``, which records it as a succeeded run with executor ``import`` (the engine never
writes the database).

No file read here turns ``trust_remote_code`` on: every function that loads a base model takes it from its caller
(the CLI's ``import --trust-remote-code``, or ``run_trusts_remote_code``: the run's spec in the database).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engine.backends import get_backend, list_backends
from engine.errors import UserError
from engine.methods import Method, build_method
from engine.methods.base import AdaptedLinear, PeftVariant
from engine.models import ROLES, TaskModel, count_parameters, load_model
from engine.train import ADAPTER_CONFIG_FILE, ADAPTER_FILE

ExportFormat = Literal["native", "peft", "merged"]
FORMATS: tuple[str, ...] = ("native", "peft", "merged")
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
README_FILE = "README.md"
LAB_META_FILE = "peftlab.json"  # lab metadata beside a PEFT or merged export (PEFT and transformers ignore it)
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# An exact (non-SVD) LoRA export must reproduce each layer's dense weight to this relative Frobenius error
# (float32 rounding of ``W0 + ΔW`` is ~1e-7).
EXACT_TOLERANCE = 1e-5

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ExportError(UserError):
    """An export or import that cannot be done; the message says why and what to do."""


class AdapterFileError(ExportError):
    """A missing, unreadable or corrupt adapter file; the message names the file."""


class BaseModelMismatch(ExportError):
    """An adapter loaded into a different base model; the message names both and the first mismatched tensor."""


class UnsafePathError(ExportError):
    """An output name that would leave the export root."""


# --- versions, paths, atomic writes ----------------------------------------------------------------


def lab_version() -> str:
    """``peftlab <version>``, from the installed package metadata or the project's ``pyproject.toml``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"peftlab {version('peftlab')}"
    except PackageNotFoundError:
        pyproject = PROJECT_ROOT / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return f"peftlab {found.group(1) if found else 'unknown'}"


def command_line_export_root() -> Path:
    """The command line's export root: ``PEFTLAB_EXPORTS`` if set, else the current directory.

    Never derived from the output path itself (an output's own parent would let any absolute path through).
    """
    return Path(os.environ.get("PEFTLAB_EXPORTS") or Path.cwd())


def resolve_export_dir(out: str | Path, root: str | Path) -> Path:
    """The directory ``out`` (relative to ``root``, or absolute inside it), refusing anything that leaves ``root``.

    The caller chooses the root: the Export page's is ``db.config.exports_root()``, the command line's
    ``command_line_export_root()``.

    Refused, each with a one-line ``UnsafePathError`` naming the path and the fix: an empty name, any ``..``
    component (``../x``, ``/tmp/x/../../y``), an absolute path outside the root, the root itself, and a symlink
    anywhere between the root and the target (a link could redirect the write even when the name looks inside).
    The result is resolved (symlinks of the root itself included) and checked to lie inside the resolved root.
    """
    given_root = Path(root).expanduser().absolute()
    given_root.mkdir(parents=True, exist_ok=True)
    root_path = given_root.resolve()
    if not str(out).strip():
        raise UnsafePathError(f"the export name is empty: give a directory name inside the export root {root_path}")
    out_path = Path(out)
    if ".." in out_path.parts:
        raise UnsafePathError(
            f"export path {str(out)!r} contains '..': give a directory name inside the export root {root_path}"
        )
    relative = out_path
    if out_path.is_absolute():
        # An absolute path may name the root as given or with its symlinks resolved.
        inside = [out_path.relative_to(r) for r in (given_root, root_path) if out_path.is_relative_to(r)]
        if not inside:
            raise UnsafePathError(
                f"export path {out_path} is outside the export root {root_path}: give a name inside it "
                "(the command line's root is PEFTLAB_EXPORTS, or the current directory)"
            )
        relative = inside[0]
    if not relative.parts:
        raise UnsafePathError(
            f"export path {str(out)!r} is the export root {root_path} itself: give a directory name inside it"
        )
    current = root_path
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise UnsafePathError(
                f"export path {str(out)!r} goes through the symlink {current}: symlinks are refused, give a plain "
                f"directory inside the export root {root_path}"
            )
    resolved = (root_path / relative).resolve()
    if root_path not in resolved.parents:
        raise UnsafePathError(
            f"export path {str(out)!r} resolves to {resolved}, outside the export root {root_path}: give a directory "
            "name inside the root"
        )
    return resolved


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST_FILE:
            entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def _staging_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` (same filesystem, so the final rename is atomic), mode 0755."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users of a shared artifact root
    return staging


@contextmanager
def staged_directory(target: Path, *, fmt: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; on success add ``manifest.json`` and rename it.

    On any error the temporary directory is removed, so the target is either the complete export or untouched.
    An existing non-empty target is replaced only with ``overwrite`` (the old one is moved aside, then deleted).
    """
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"{target} already exists and is not empty: choose another name or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(target)
    try:
        yield staging
        manifest = {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "lab_version": lab_version(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": _file_entries(staging),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_manifest(directory: Path, names: list[str] | None = None) -> None:
    """Check the sha256 of the listed files (all of the manifest by default) against ``manifest.json``."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return
    files = _read_json(path).get("files", {})
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


# --- reading adapter files ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
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


def detect_layout(directory: str | Path) -> Literal["native", "peft"]:
    """``native`` (our ``adapter.safetensors``) or ``peft`` (``adapter_model.safetensors`` with a ``peft_type``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory")
    if (directory / ADAPTER_FILE).is_file():
        return "native"
    if (directory / PEFT_WEIGHTS_FILE).is_file() and "peft_type" in _read_json(directory / ADAPTER_CONFIG_FILE):
        return "peft"
    raise AdapterFileError(
        f"{directory} holds neither a native adapter ({ADAPTER_FILE} + {ADAPTER_CONFIG_FILE}) nor a PEFT adapter "
        f"({PEFT_WEIGHTS_FILE} + {ADAPTER_CONFIG_FILE})"
    )


def _read_native(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    verify_manifest(directory, [ADAPTER_FILE, ADAPTER_CONFIG_FILE])
    meta = _read_json(directory / ADAPTER_CONFIG_FILE)
    missing = [k for k in ("method", "method_config", "model", "num_labels") if k not in meta]
    if missing:
        raise AdapterFileError(f"{directory / ADAPTER_CONFIG_FILE} lacks {', '.join(missing)}: not a PEFT Lab adapter")
    return meta, read_safetensors(directory / ADAPTER_FILE)


# --- models ------------------------------------------------------------------------------------------


def model_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The base model's options (``init_seed``, timm's ``pretrained``, ...) recorded in an adapter's config."""
    spec = meta.get("spec") or {}
    return dict(spec.get("model_options") or meta.get("model_options") or {})


def run_trusts_remote_code(run: dict[str, Any]) -> bool:
    """Whether the base model of a run in the database may run its repository's Python (``trust_remote_code``).

    The one trusted source is the spec stored in the run's database row: for a run the lab trained it is the
    user's own spec, and for an imported run ``jobs.imports.record_import`` recorded ``false`` there unless the user
    passed ``--trust-remote-code`` at import. Files (an adapter's ``adapter_config.json``, ``peftlab.json``, a PEFT
    config, a model card), even those in the run's own artifact directory, are never asked: an imported run's
    directory holds the imported files byte for byte.
    """
    return bool((run.get("spec") or {}).get("trust_remote_code"))


def fresh_model(meta: dict[str, Any], *, trust_remote_code: bool = False) -> TaskModel:
    """The base model an adapter was trained on, rebuilt by name with a fresh task head.

    ``meta`` comes from a file, so a ``trust_remote_code`` in it (``spec.trust_remote_code``) is ignored: the
    model's own Python runs only when the caller passes ``trust_remote_code=True`` (see ``run_trusts_remote_code``).
    """
    return load_model(
        meta["model"], int(meta["num_labels"]), options=model_options(meta), trust_remote_code=trust_remote_code
    )


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def base_fingerprint(model: TaskModel) -> dict[str, list[Any]]:
    """``{name: [shape, sha256 prefix]}`` of every backbone parameter (task head excluded) of an unadapted model."""
    if Method.adapted_layers(model):
        raise ExportError("base_fingerprint needs the model before a method is applied")
    head = set(model.head_parameter_names())
    return {n: [list(p.shape), _tensor_digest(p)] for n, p in model.named_parameters() if n not in head}


def _describe(meta: dict[str, Any]) -> str:
    return f"{meta.get('model')!r} (source {meta.get('model_source') or 'unknown'})"


def _model_label(model: TaskModel) -> str:
    return f"{model.info.name!r} (source {model.info.source or 'unknown'})"


def check_base_fingerprint(meta: dict[str, Any], model: TaskModel, fingerprint: dict[str, list[Any]]) -> None:
    """Raise ``BaseModelMismatch`` naming the first backbone tensor that differs from the adapter's base."""
    expected = (meta.get("base_model") or {}).get("fingerprint")
    if not expected:
        return
    for name in list(fingerprint) + [n for n in expected if n not in fingerprint]:
        ours, theirs = fingerprint.get(name), expected.get(name)
        if ours == theirs:
            continue
        if ours is None:
            detail = f"{name} (shape {tuple(theirs[0])}) is in the adapter's base model but not in this model"
        elif theirs is None:
            detail = f"{name} (shape {tuple(ours[0])}) is in this model but not in the adapter's base model"
        elif ours[0] != theirs[0]:
            detail = f"{name}: shape {tuple(theirs[0])} in the adapter's base model, {tuple(ours[0])} in this model"
        else:
            detail = f"{name}: same shape {tuple(ours[0])}, different values"
        raise BaseModelMismatch(
            f"adapter was trained on base model {_describe(meta)} but this model is {_model_label(model)}: "
            f"their weights differ; first mismatched tensor {detail}"
        )


def check_adapter_fits(meta: dict[str, Any], model: TaskModel, method: Method, tensors: dict[str, torch.Tensor]):
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
            f"adapter was trained on base model {_describe(meta)} with method {meta['method']} and does not fit "
            f"model {_model_label(model)}: first mismatched tensor {problem}"
        )


def _seed(meta: dict[str, Any]) -> int:
    return int(((meta.get("spec") or {}).get("train") or {}).get("seed", 0))


def apply_adapter(meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: TaskModel) -> tuple[TaskModel, Method]:
    """Apply the adapter's method (config, structural state, tensors) to a fresh, unadapted ``model``."""
    if Method.adapted_layers(model):
        raise ExportError(f"model {model.info.name} already carries adapted layers: pass a fresh model")
    fingerprint = base_fingerprint(model) if (meta.get("base_model") or {}).get("fingerprint") else None
    method = build_method(meta["method"], meta["method_config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(meta))  # as engine.train.prepare: adapter init depends on the seed only
        try:
            method.apply(model)
        except ValueError as err:
            raise BaseModelMismatch(
                f"adapter trained on base model {_describe(meta)} cannot be applied to model {_model_label(model)}: "
                f"{err}"
            ) from None
    method.load_state(model, meta.get("method_state") or {})
    check_adapter_fits(meta, model, method, tensors)
    if fingerprint is not None:
        check_base_fingerprint(meta, model, fingerprint)
    device = next(model.parameters()).device
    method.load_adapter_state_dict(model, {k: v.to(device) for k, v in tensors.items()})
    model.eval()
    return model, method


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
        base = fresh_model(imported.meta, trust_remote_code=trust_remote_code)
    return apply_adapter(imported.meta, imported.tensors, base)


# --- layers, factors and the PEFT layout -------------------------------------------------------------


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


@dataclass
class LayerFactors:
    """One layer in PEFT's LoRA form: ``ΔW = (alpha / r) · lora_B @ lora_A`` (``/ √r`` with rsLoRA)."""

    name: str  # layer path in the TaskModel
    lora_A: torch.Tensor  # (r, d_in)
    lora_B: torch.Tensor  # (d_out, r), the PEFT scaling divided out
    alpha: float
    magnitude: torch.Tensor | None  # DoRA's m (d_out)
    bias: torch.Tensor | None  # lora_B.bias = Δb / scaling
    residual_rank: int  # components added for a frozen residual (PiSSA, CorDA)
    update_norm: float  # ‖W_eff + ΔW − W0‖_F, the update PEFT must reproduce
    weight_norm: float  # ‖W_eff + ΔW‖_F
    error_norm: float  # ‖(W_eff + ΔW − W0) − ΔW_peft‖_F

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def relative_error(self) -> float:
        """Error relative to the update (the SVD truncation error); 0 when both vanish."""
        return 0.0 if self.error_norm == 0.0 else self.error_norm / max(self.update_norm, 1e-300)

    @property
    def weight_error(self) -> float:
        """Error relative to the dense weight: what decides whether the outputs are reproduced."""
        return 0.0 if self.error_norm == 0.0 else self.error_norm / max(self.weight_norm, 1e-300)


def _aggregate(factors: list[LayerFactors], norm: str) -> float:
    """Error over all layers, ``√(Σ error_l²) / √(Σ norm_l²)``."""
    num = math.sqrt(sum(f.error_norm**2 for f in factors))
    den = math.sqrt(sum(getattr(f, norm) ** 2 for f in factors))
    return 0.0 if num == 0.0 else num / max(den, 1e-300)


def _svd_factors(matrix: torch.Tensor, rank: int | None, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U√S, √S Vᵀ) of the top ``rank`` components; ``rank=None``: the numerical rank.

    The numerical rank counts singular values above ``max(d_out, d_in) · ε_fp32 · σ_max(reference)``, the size of
    the rounding noise a float32 ``reference − s B0 A0`` carries (so a PiSSA residual keeps its r components).
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        sigma_max = float(torch.linalg.matrix_norm(reference, ord=2))
        tol = max(matrix.shape) * torch.finfo(torch.float32).eps * sigma_max
        rank = int((s > tol).sum())
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def lora_scaling_convention(method: Method, svd_rank: int | None) -> tuple[float | None, bool]:
    """(alpha, use_rslora) of the PEFT scaling to keep: the config's ``alpha``/``use_rslora`` when it has them.

    ``alpha = None`` means scaling 1 (``lora_alpha = r``), used for SVD conversions and configs without alpha.
    """
    if svd_rank is not None:
        return None, False
    alpha = getattr(method.config, "alpha", None)
    return alpha, alpha is not None and bool(getattr(method.config, "use_rslora", False))


def _scaling(alpha: float | None, rslora: bool, rank: int) -> float:
    return 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)


def _layer_factors(
    layer: nn.Module, variant: PeftVariant | None, factor_rank: int | None, alpha: float | None, rslora: bool
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(B, A, s) in float64 with the layer's low-rank update ``s · B A``, or None if the layer exposes none.

    From ``low_rank_factors()`` (scaled B, A; at ``factor_rank`` when the layer accepts a rank, as DyLoRA's does)
    with the scaling divided back out, else from the attributes the method's ``peft_variant`` names.
    """
    fn = getattr(layer, "low_rank_factors", None)
    if fn is not None:
        if factor_rank is None:
            b_scaled, a = fn()
        else:
            try:
                b_scaled, a = fn(rank=factor_rank)
            except TypeError:
                raise ExportError(
                    f"{type(layer).__name__}.low_rank_factors() takes no rank: convert at a chosen rank with svd_rank"
                ) from None
        s = _scaling(alpha, rslora, a.shape[0])
        return b_scaled.detach().double() / s, a.detach().double(), s
    if variant is not None and variant.factor_A and variant.factor_B:
        a = getattr(layer, variant.factor_A).weight.detach().double()
        b = getattr(layer, variant.factor_B).weight.detach().double()
        return b, a, _scaling(alpha, rslora, a.shape[0])
    return None


def lora_factors(
    model: TaskModel,
    method: Method,
    base: TaskModel,
    *,
    svd_rank: int | None = None,
    factor_rank: int | None = None,
    variant: PeftVariant | None = None,
) -> list[LayerFactors]:
    """Each adapted layer as PEFT LoRA factors against the pretrained weights of ``base`` (see the module doc).

    ``svd_rank``: convert ``W_eff + ΔW − W0`` by truncated SVD at that rank (any mergeable method); otherwise
    the layers' low-rank factors are written exactly, plus the residual components, and checked against the
    dense weight. ``factor_rank`` asks layers whose ``low_rank_factors`` take a rank (DyLoRA) for that rank: the
    update is then truncated by design and its difference from ``ΔW`` is reported, not refused.

    The scaling kept is the method's (its config's ``alpha`` and ``use_rslora`` when it has them, 1 otherwise;
    1 for SVD conversions), with ``alpha`` grown with the rank as PEFT's PiSSA conversion does.
    ``variant.magnitude`` (DoRA) writes ``W' = m ⊙ (W0 + sBA)/‖W0 + sBA‖_row`` instead of ``W0 + sBA``.
    """
    alpha, rslora = lora_scaling_convention(method, svd_rank)
    use_dora = variant is not None and dict(variant.flags).get("use_dora", False)
    layers = method.adapted_layers(model)
    if not layers:
        raise ExportError(f"method {method.name} has no adapted linear layers: there is nothing to write as LoRA")
    out = []
    with torch.no_grad():
        for name, layer in layers.items():
            delta = layer.delta_weight()
            if delta is None:
                raise ExportError(
                    f"layer {name} ({type(layer).__name__}) of method {method.name} has no dense ΔW (it is not "
                    "linear in its input): it cannot be written as LoRA; use the native format"
                )
            pretrained = base.get_submodule(name)
            assert isinstance(pretrained, nn.Linear)  # what the adapted layer wrapped, in the unadapted model
            w0 = pretrained.weight.double()
            w_eff = layer.effective_base_weight().double()
            if w_eff.shape != w0.shape:
                raise ExportError(f"layer {name}: weight {tuple(w_eff.shape)} vs pretrained {tuple(w0.shape)}")
            dense = w_eff + delta.double()
            target = dense - w0
            bias = _bias_update(layer, pretrained)
            residual_rank, magnitude = 0, None
            if svd_rank is not None:
                b, a = _svd_factors(target, svd_rank, w0)
                scaling = 1.0
            else:
                found = _layer_factors(layer, variant, factor_rank, alpha, rslora)
                if found is None:
                    raise ExportError(
                        f"layer {name} ({type(layer).__name__}) of method {method.name} exposes no "
                        "low_rank_factors(): convert it by truncated SVD of ΔW with svd_rank=<rank>"
                    )
                b, a, scaling = found
                residual = w_eff - w0
                if bool(residual.abs().max() > 0):
                    if use_dora:
                        raise ExportError(f"layer {name}: DoRA export needs the frozen weight to be the pretrained one")
                    u_res, v_res = _svd_factors(residual, None, w0)
                    residual_rank = u_res.shape[1]
                    b, a = torch.cat([b, u_res / scaling], 1), torch.cat([a, v_res], 0)
            approx = scaling * (b @ a)
            if use_dora:
                assert variant is not None  # use_dora is one of its flags
                direction = w0 + approx
                norms = direction.norm(dim=1)
                stored = getattr(layer, variant.magnitude or "", None)
                if stored is None:
                    raise ExportError(f"layer {name}: the DoRA magnitude attribute {variant.magnitude!r} is missing")
                magnitude = stored.detach().double()
                approx = (magnitude / norms)[:, None] * direction - w0
            factors = LayerFactors(
                name=name, lora_A=a, lora_B=b, alpha=scaling * (math.sqrt(a.shape[0]) if rslora else a.shape[0]),
                magnitude=magnitude, bias=None if bias is None else bias / scaling, residual_rank=residual_rank,
                update_norm=float(torch.linalg.matrix_norm(target)), weight_norm=float(torch.linalg.matrix_norm(dense)),
                error_norm=float(torch.linalg.matrix_norm(target - approx)),
            )  # fmt: skip
            exact = svd_rank is None and factor_rank is None  # a chosen rank truncates by design
            if exact and factors.weight_error > EXACT_TOLERANCE:
                raise ExportError(
                    f"layer {name}: its low-rank factors reproduce its weight only to relative error "
                    f"{factors.weight_error:.2e}; convert it by truncated SVD with svd_rank=<rank>"
                )
            dtype = layer.base.weight.dtype
            for attr in ("lora_A", "lora_B", "magnitude", "bias"):
                value = getattr(factors, attr)
                if value is not None:
                    setattr(factors, attr, value.to(dtype).contiguous())
            out.append(factors)
    return out


def _bias_update(layer: AdaptedLinear, pretrained: nn.Linear) -> torch.Tensor | None:
    """``b_eff + Δb − b0``, or None when it is zero."""
    d_out = pretrained.out_features
    b0 = pretrained.bias.double() if pretrained.bias is not None else torch.zeros(d_out, dtype=torch.float64)
    b_eff = layer.base.bias.double() if layer.base.bias is not None else torch.zeros(d_out, dtype=torch.float64)
    db = layer.delta_bias()
    update = b_eff - b0 + (db.double() if db is not None else 0)
    return update if bool(update.abs().max() > 0) else None


def _peft_targets(net: nn.Module, paths: list[str], exclude: list[str]) -> list[str]:
    """Module names as PEFT matches them: the leaf names if they select exactly ``paths``, else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    matched = {
        n for n, m in net.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in leaves)
        and not any(n == e or n.startswith(e + ".") or n.endswith("." + e) for e in exclude)
    }  # fmt: skip
    return leaves if matched == set(paths) else sorted(paths)


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _clean_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _peft_base_name(meta: dict[str, Any], model: TaskModel) -> str | None:
    """What PEFT's ``base_model_name_or_path`` should hold: a hub id or directory the Auto classes can load."""
    source = model.info.source
    if model.backend.supports_peft and source and source != "random init":
        return source
    return None


def write_peft(
    model: TaskModel,
    method: Method,
    base: TaskModel,
    directory: Path,
    meta: dict[str, Any],
    *,
    svd_rank: int | None = None,
    factor_rank: int | None = None,
) -> dict[str, Any]:
    """Write the PEFT LoRA layout of an adapted model into ``directory``; returns the conversion report."""
    from peft import LoraConfig

    if not model.backend.supports_peft:
        raise ExportError(
            f"PEFT export needs a Hugging Face transformers model; {model.info.name} is a {model.kind} model "
            "(PEFT's LoRA on timm's fused qkv differs from our split q/k/v): use the native or merged format"
        )
    if svd_rank is not None and svd_rank < 1:
        raise ExportError(f"svd_rank must be at least 1, got {svd_rank}")
    layers = method.adapted_layers(model)
    head = set(model.head_parameter_names())
    stray = [
        k for k in method.adapter_state_dict(model)
        if k not in head and not any(k.startswith(name + ".") for name in layers)
    ]  # fmt: skip
    if stray:
        raise ExportError(f"adapter tensor {stray[0]} lies outside every adapted layer: PEFT's LoRA cannot carry it")
    variant = method.peft_variant
    flags = dict(variant.flags) if variant is not None else {}
    use_dora = bool(flags.pop("use_dora", False))
    factors = lora_factors(model, method, base, svd_rank=svd_rank, factor_rank=factor_rank, variant=variant)
    use_bias = any(f.bias is not None for f in factors)
    if use_dora and use_bias:
        raise ExportError("PEFT cannot combine DoRA with lora_bias, and this adapter changes a bias")

    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        path = PEFT_PREFIX + f.name.removeprefix("net.")
        tensors[f"{path}.lora_A.weight"] = f.lora_A
        tensors[f"{path}.lora_B.weight"] = f.lora_B
        if use_bias:
            tensors[f"{path}.lora_B.bias"] = f.bias if f.bias is not None else torch.zeros_like(f.lora_B[:, 0])
        if f.magnitude is not None:
            tensors[f"{path}.lora_magnitude_vector"] = f.magnitude
    for key, value in model.state_dict().items():
        if key in head:
            tensors[PEFT_PREFIX + key.removeprefix("net.")] = value.detach()
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(directory / PEFT_WEIGHTS_FILE))

    paths = [f.name.removeprefix("net.") for f in factors]
    modules_to_save = [h.removeprefix("net.") for h in model.info.head_names]
    rank, alpha = _common([f.rank for f in factors]), _common([f.alpha for f in factors])
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=cast(int, _clean_number(alpha)),  # PEFT annotates int; it takes any number (α = s·r)
        target_modules=_peft_targets(base.net, paths, modules_to_save),
        lora_dropout=float(getattr(method.config, "dropout", 0.0)) if svd_rank is None else 0.0,
        use_rslora=lora_scaling_convention(method, svd_rank)[1],
        use_dora=use_dora,
        lora_bias=use_bias,
        modules_to_save=modules_to_save,
        rank_pattern={re.escape(p): f.rank for p, f in zip(paths, factors) if f.rank != rank},
        alpha_pattern={re.escape(p): _clean_number(f.alpha) for p, f in zip(paths, factors) if f.alpha != alpha},
        task_type=model.backend.peft_task_type,
        base_model_name_or_path=_peft_base_name(meta, model),
        revision=(meta.get("base_model") or {}).get("revision"),
        inference_mode=True,
        **flags,
    )
    lora_config.save_pretrained(str(directory))
    residual = sum(f.residual_rank for f in factors)
    return {
        "mode": "svd" if svd_rank is not None else "factors" if factor_rank is not None else "exact",
        "svd_rank": svd_rank,
        "factor_rank": factor_rank,
        "rank": rank,
        "lora_alpha": _clean_number(alpha),
        "use_dora": use_dora,
        "lora_bias": use_bias,
        "relative_error": _aggregate(factors, "update_norm"),
        "weight_error": _aggregate(factors, "weight_norm"),
        "layer_errors": {f.name: f.relative_error for f in factors},
        "residual_components": residual,
    }


# --- native, PEFT and merged exports -----------------------------------------------------------------


@dataclass
class ExportResult:
    format: str
    path: Path
    files: dict[str, str]  # file name -> sha256 (as in manifest.json)
    relative_error: float | None = None  # LoRA conversions: ‖ΔW − ΔW_peft‖_F / ‖ΔW‖_F over all layers
    weight_error: float | None = None  # the same error relative to the dense weights ‖W0 + ΔW‖_F
    layer_errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _metrics_lines(summary: dict[str, Any] | None) -> list[str]:
    summary = summary or {}
    rows = sorted(dict(summary.get("final_metrics") or {}).items())
    rows += [(k, summary[k]) for k in ("steps", "trainable_params", "adapter_params", "total_params", "majority_rate",
                                       "device") if summary.get(k) is not None]  # fmt: skip
    lines = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return ["| metric | value |", "|---|---|", *lines] if lines else ["No metrics were recorded for this run."]


def _card_header(meta: dict[str, Any], title: str) -> list[str]:
    cfg = json.dumps(meta.get("method_config", {}), sort_keys=True)
    spec = meta.get("spec") or {}
    dataset = (spec.get("dataset") or {}).get("name", "unknown")
    return [
        f"# {title}",
        "",
        f"- Method: `{meta['method']}` with config `{cfg}`",
        f"- Base model: `{meta['model']}` (source: {meta.get('model_source') or 'unknown'})",
        f"- Dataset: `{dataset}`; labels: {', '.join(map(str, meta.get('label_names') or [])) or 'unknown'}",
        f"- Exported by {lab_version()}",
        "",
        "## Metrics",
        "",
    ]


def _export_meta(meta: dict[str, Any], model: TaskModel, method: Method, base: TaskModel, fingerprint) -> dict:
    out = copy.deepcopy(meta)
    out.update({
        "format": "peftlab-native", "format_version": FORMAT_VERSION, "lab_version": lab_version(),
        "base_model": {
            "name": meta["model"], "source": model.info.source, "kind": model.kind,
            "revision": getattr(getattr(base.net, "config", None), "_commit_hash", None),
            "options": model_options(meta), "fingerprint": fingerprint,
        },
        "target_layers": target_layers(model, method, base),
        "mergeable": bool(method.mergeable),
    })  # fmt: skip
    return out


def _write_native(
    directory: Path, meta: dict[str, Any], summary: dict | None, source_file: Path | None, tensors: dict | None
) -> None:
    """Adapter tensors (``source_file`` copied byte for byte, else ``tensors`` saved), enriched config, card."""
    if source_file is not None:
        shutil.copyfile(source_file, directory / ADAPTER_FILE)
    else:
        assert tensors is not None  # callers give one of the two
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / ADAPTER_FILE))
    full = {**meta, "summary": summary or meta.get("summary") or {}}
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(full, indent=2, default=str))
    n_layers = len(meta.get("target_layers", []))
    card = _card_header(meta, f"PEFT Lab adapter: {meta['method']} on {meta['model']}") + _metrics_lines(summary)
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
    (directory / README_FILE).write_text("\n".join(card) + "\n")


def _write_peft_card(directory: Path, meta: dict, model: TaskModel, report: dict, summary: dict | None) -> None:
    base_name = _peft_base_name(meta, model) or meta["model"]
    auto = model.backend.auto_class
    card = [
        "---",
        f"base_model: {json.dumps(base_name)}",
        "library_name: peft",
        "tags:",
        "- lora",
        f"- peftlab-{meta['method']}",
        "---",
        "",
    ] + _card_header(meta, f"LoRA (PEFT layout) from a PEFT Lab {meta['method']} run on {meta['model']}")
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
    if hub_name is not None:
        load_call = f"{auto}.from_pretrained({json.dumps(hub_name)}, num_labels={meta['num_labels']})"
        build = [f"from transformers import {auto}", f"base = {load_call}"]
    else:  # a PEFT Lab test model built from a seed: only the lab can rebuild its weights
        build = [
            "from engine.models import load_model",
            f"base = load_model({meta['model']!r}, {meta['num_labels']}).net",
        ]
    card += ["", "## Load", "", "```python", *build, "from peft import PeftModel",
             "model = PeftModel.from_pretrained(base, '<this directory>')", "```"]  # fmt: skip
    (directory / README_FILE).write_text("\n".join(card) + "\n")


def write_merged(model: TaskModel, method: Method, base: TaskModel, directory: Path, meta: dict) -> list[str]:
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
    labels = [str(x) for x in meta.get("label_names") or range(int(meta["num_labels"]))]
    return model.backend.save_merged(model, directory, labels=labels, lab_model=meta["model"],
                                     options=model_options(meta))  # fmt: skip


def _write_merged_card(directory: Path, meta: dict, model: TaskModel, summary: dict | None, notes: list[str]):
    card = _card_header(meta, f"Merged model: {meta['method']} on {meta['model']}") + _metrics_lines(summary)
    card += ["", "## Load", ""] + model.backend.merged_card()
    card += [""] + notes
    (directory / README_FILE).write_text("\n".join(card) + "\n")


def _lab_meta(meta: dict[str, Any], summary: dict | None, **extra: Any) -> dict[str, Any]:
    keys = ("method", "method_config", "method_state", "model", "model_source", "num_labels", "label_names", "spec")
    out = {k: meta.get(k) for k in keys}
    out.update({"lab_version": lab_version(), "model_options": model_options(meta), "summary": summary or {}})
    out.update(extra)
    return out


def export_model(
    model: TaskModel,
    method: Method,
    meta: dict[str, Any],
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
    target = resolve_export_dir(out, root)
    if base is None:
        base = fresh_model(meta, trust_remote_code=trust_remote_code)
    summary = summary if summary is not None else meta.get("summary")
    result = ExportResult(format=fmt, path=target, files={})
    with staged_directory(target, fmt=fmt, overwrite=overwrite) as staging:
        if fmt == "native":
            full = _export_meta(meta, model, method, base, base_fingerprint(base))
            source_file = source_dir / ADAPTER_FILE if source_dir is not None else None
            tensors = None if source_file is not None else method.adapter_state_dict(model)
            _write_native(staging, full, summary, source_file, tensors)
        elif fmt == "peft":
            report = write_peft(model, method, base, staging, meta, svd_rank=svd_rank, factor_rank=factor_rank)
            (staging / LAB_META_FILE).write_text(json.dumps(_lab_meta(meta, summary, conversion=report), indent=2))
            _write_peft_card(staging, meta, model, report, summary)
            result.relative_error, result.weight_error = report["relative_error"], report["weight_error"]
            result.layer_errors = report["layer_errors"]
            if report["residual_components"]:
                result.notes.append("frozen residual folded into the factors (PiSSA-to-LoRA conversion)")
            if report["lora_bias"]:
                result.notes.append("bias updates carried by lora_bias")
        else:
            notes = write_merged(model, method, base, staging, meta)
            (staging / LAB_META_FILE).write_text(json.dumps(_lab_meta(meta, summary, kind=model.kind), indent=2))
            _write_merged_card(staging, meta, model, summary, notes)
            result.notes.extend(notes)
    manifest = _read_json(target / MANIFEST_FILE)
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
    imported = import_adapter(source, trust_remote_code=trust_remote_code)
    if imported.source_format != "native":
        raise ExportError(
            f"{source} is a PEFT directory: import it first (jobs.imports.record_import), then export the run"
        )
    base = fresh_model(imported.meta, trust_remote_code=trust_remote_code)
    model, method = apply_adapter(
        imported.meta, imported.tensors, fresh_model(imported.meta, trust_remote_code=trust_remote_code)
    )
    return export_model(
        model, method, imported.meta, fmt, out, root=root, summary=summary, svd_rank=svd_rank,
        factor_rank=factor_rank, overwrite=overwrite, source_dir=source, base=base,
    )  # fmt: skip


def load_merged(directory: str | Path, *, trust_remote_code: bool = False) -> TaskModel:
    """A merged export as a plain ``TaskModel`` (Hugging Face: through the Auto classes; timm: rebuilt by name).

    The directory's own Python (a config's ``auto_map``) runs only with ``trust_remote_code=True`` from the caller.
    """
    directory = Path(directory)
    verify_manifest(directory)
    meta = _read_json(directory / LAB_META_FILE)
    for name in list_backends():
        model = get_backend(name).load_merged(
            directory, lambda: fresh_model(meta, trust_remote_code=trust_remote_code), read_safetensors
        )
        if model is not None:
            return model.eval()
    return load_model(str(directory), int(meta["num_labels"]), trust_remote_code=trust_remote_code).eval()


# --- import ------------------------------------------------------------------------------------------


@dataclass
class ImportedAdapter:
    """What a run row needs: a validated RunSpec dict, our adapter config and tensors, and where they came from."""

    spec: dict[str, Any]
    meta: dict[str, Any]  # our adapter_config.json schema (method, method_config, method_state, model, ...)
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
) -> tuple[dict[str, Any], dict[str, torch.Tensor], TaskModel]:
    """Map a PEFT LoRA directory to our ``lora`` method: config, tensors (our keys) and the base model used."""
    verify_manifest(directory, [PEFT_WEIGHTS_FILE, ADAPTER_CONFIG_FILE])
    cfg = _read_json(directory / ADAPTER_CONFIG_FILE)
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
    lab = _read_json(directory / LAB_META_FILE) if (directory / LAB_META_FILE).is_file() else {}
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
    meta = {
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
    }  # fmt: skip
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
        meta, tensors = _read_native(directory)
        source_format: Literal["native", "peft"] = "native"
    else:
        meta, tensors, base = _peft_to_native(directory, model, model_name, num_labels, trust_remote_code)
        source_format = "peft"
    spec = copy.deepcopy(meta.get("spec") or {})
    if not spec and dataset is None and base is not None and base.info.modality == "image":
        dataset = "digits"  # a foreign PEFT adapter: a bundled dataset of the model's modality to evaluate on
    spec["model"] = meta["model"]
    spec["method"] = {"name": meta["method"], **meta["method_config"]}
    if dataset is not None:
        spec["dataset"] = {**(spec.get("dataset") or {}), "name": dataset}
    spec["tags"] = sorted({*(spec.get("tags") or []), "imported"})
    spec["trust_remote_code"] = trust_remote_code  # the caller's choice, never the file's
    spec = parse_spec(spec).model_dump(mode="json")
    summary = dict(meta.get("summary") or {})
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
        base = fresh_model(imported.meta, trust_remote_code=trust_remote_code)
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
                          **(imported.meta.get("imported_from") or {})},
    }  # fmt: skip
    return ImportPlan(imported, spec, summary, trainable, total)


def write_imported_files(imported: ImportedAdapter, target: Path) -> None:
    """Write an imported adapter's files into the new directory ``target`` (a run's artifact directory).

    The files are staged in a hidden sibling of ``target`` and renamed into place: native files are copied byte
    for byte (checked by sha256), a PEFT adapter is written in the native layout, and a ``README.md`` is copied.
    On any error the staging directory is removed and ``target`` is not created.
    """
    staging = _staging_dir(target)
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
            (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(imported.meta, indent=2, default=str))
        if (source / README_FILE).is_file():
            shutil.copyfile(source / README_FILE, staging / README_FILE)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
