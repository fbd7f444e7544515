"""The contract every PEFT method satisfies, and the registry that names them.

A method is three small pieces, as in Hugging Face PEFT:

* a typed config (``MethodConfig`` subclass, pydantic): the hyper-parameters, with defaults from the paper;
* an adapted layer (``AdaptedLinear`` subclass): the maths, wrapping one frozen ``nn.Linear``;
* the method (``Method`` subclass): which layers to wrap, and anything model-wide (shared experts,
  schedules).

Everything outside ``engine/methods`` (the training loop, export, analyses, UI) talks to methods only through
this contract, so adding a method never adds a branch elsewhere:

* ``Method.apply(model)`` freezes the backbone, injects the adapters and unfreezes the task head;
* ``Method.adapted_layers(model)`` lists the adapted layers; each has ``delta_weight()`` (or ``None``),
  ``merged()`` and ``adapter_parameters()``;
* ``low_rank_factors_of(layer, rank)`` gives a layer's update as ``LowRankFactors`` (``ΔW = s·B A``) or None:
  layers that are ``LowRankLinear`` declare them, and ``supports_rank_choice`` says whether they can give
  fewer components (DyLoRA's nested ranks). ``Method.peft_lora_options()`` is the method's own PEFT LoRA form
  (r, α, rsLoRA, dropout, variant, init), or None; nobody outside the method reads its config fields by name;
* ``Method.adapter_state_dict`` / ``load_adapter_state_dict`` select tensors by the method's ``prefix``;
* ``Method.merge(model)`` folds ΔW into dense weights (mergeable methods only);
* ``Method.adapter_param_count(model)`` is the closed-form count from docs/METHODS.md, tested against reality;
* training hooks (``on_train_start``, ``on_step_end``, ``extra_loss``) and ``artifacts()`` let schedules
  (Pear's pruning, HEAT's calibration) and analyses run inside the one training loop.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.methods.lowrank import LowRankFactors
    from engine.models import AdaptableLayer, TaskModel


def _blocks_not_empty(v: list[int] | None) -> list[int] | None:
    if v is not None and not v:
        raise ValueError("blocks must name at least one block (or be None for all)")
    return v


# Transformer blocks a method adapts: None for all of them, else a non-empty list of block indices.
BlockList = Annotated[list[int] | None, AfterValidator(_blocks_not_empty)]


@dataclass(frozen=True)
class PeftVariant:
    """How a LoRA variant maps onto Hugging Face PEFT's LoRA, for the PEFT export: its ``LoraConfig`` flags and,
    for layers without ``low_rank_factors()``, the attributes holding A and B (``nn.Linear``, unscaled) and the
    DoRA magnitude. A method whose layers PEFT computes differently from plain LoRA sets ``Method.peft_variant``."""

    flags: tuple[tuple[str, Any], ...] = ()
    factor_A: str | None = None
    factor_B: str | None = None
    magnitude: str | None = None


@dataclass(frozen=True)
class PeftLoraOptions:
    """A method's own Hugging Face PEFT ``LoraConfig`` settings, stated by the method (``Method.peft_lora_options``).

    ``r`` is the rank of the factors its layers give by default (``low_rank_factors()``), so ``lora_alpha / r``
    (``/ √r`` with ``use_rslora``) is their scaling. ``variant`` is set when PEFT computes the method differently
    from plain LoRA (DoRA). ``init`` is PEFT's ``init_lora_weights`` for the same initialisation (``True``:
    Kaiming A and zero B; ``"pissa"``, ``"pissa_niter_<k>"``, ``"corda"``): a trained adapter is exported as
    plain factors on W0, so the export does not write it, but it says which PEFT run the method corresponds to.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    lora_dropout: float = 0.0
    variant: PeftVariant | None = None
    init: bool | str = True


@dataclass(frozen=True)
class StoredSize:
    """What a method's adapter file holds besides the task head: ``params`` values and ``bytes`` bytes
    (``Method.stored_size``). Packed low-bit codes count as the weights they encode; sparse indices as bytes only."""

    params: int
    bytes: int


class RankChoiceError(UserError, TypeError):
    """A rank was asked of a layer whose factors cannot give it. Also a ``TypeError``: the rank is an argument
    this layer does not take (callers that caught the ``TypeError`` of a rank-less signature keep working)."""


# Hugging Face PEFT's names for the same fields, accepted so PEFT users' habits work (``r: 8``).
PEFT_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


class MethodConfig(BaseModel):
    """Base of every method's config. Unknown keys are errors (a typo must not be silently ignored). A method
    whose config has ``rank``, ``alpha`` or ``dropout`` also takes PEFT's ``r``, ``lora_alpha``, ``lora_dropout``."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _peft_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, name in PEFT_ALIASES.items():
            if alias in data and name in cls.model_fields:
                if name in data:
                    raise ValueError(f"{alias} and {name} are one setting (PEFT's name and ours): give only one")
                data[name] = data.pop(alias)
        return data


class TargetedConfig(MethodConfig):
    """Config of a method that adapts some roles of linear layers."""

    target_roles: list[str] = Field(["q", "v"], description="layer roles to adapt: q, k, v, o, fc1, fc2")
    blocks: list[int] | None = Field(None, description="transformer blocks to adapt (None: all)")

    @field_validator("target_roles")
    @classmethod
    def _roles_known(cls, v: list[str]) -> list[str]:
        from engine.models import ROLES

        bad = [r for r in v if r not in ROLES]
        if bad or not v:
            raise ValueError(f"unknown role(s) {bad}; choose from {', '.join(ROLES)}")
        return v


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``self.base``) plus an adaptation. Subclasses define the maths.

    ``linear_in_x`` is True when the adapted layer computes ``(W0 + ΔW) x + b0 (+ Δb)`` for a ΔW that
    does not depend on x; the contract test then checks ``delta_weight()`` against the forward.
    """

    linear_in_x: bool = True
    # True when ``low_rank_factors(rank)`` can give fewer components than stored (DyLoRA's nested ranks).
    supports_rank_choice: ClassVar[bool] = False

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor | None:
        """ΔW with ``W0 + ΔW`` the effective dense weight, or None when the method has no ΔW."""
        return None

    def delta_bias(self) -> torch.Tensor | None:
        return None

    def effective_base_weight(self) -> torch.Tensor:
        """The weight ΔW is added to (PiSSA/CorDA keep a residual here, not the pretrained W0)."""
        return self.base.weight

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (mergeable methods only)."""
        dw = self.delta_weight()
        if dw is None:
            raise TypeError(f"{type(self).__name__} has no dense ΔW and cannot be merged")
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None or self.delta_bias() is not None
        )
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + dw.to(self.base.weight.dtype))
        if out.bias is not None:
            bias = self.base.bias.clone() if self.base.bias is not None else torch.zeros_like(out.bias)
            db = self.delta_bias()
            out.bias.copy_(bias + (db if db is not None else 0))
        out.requires_grad_(False)
        return out

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]


class LowRankLinear(AdaptedLinear, metaclass=ABCMeta):
    """An adapted layer whose ΔW is a low-rank product it can give without a dense SVD (LoRA, PiSSA, DyLoRA...).

    ``low_rank_factors(rank)`` returns ``LowRankFactors`` (A, B, scaling) with ``ΔW = scaling · B A`` exactly;
    ``rank`` asks for the leading ``rank`` components (only where ``supports_rank_choice``), None for the
    layer's own rank. ``rank`` (the attribute) is the number of components stored. Any other adapted layer has
    no factors: ask through ``low_rank_factors_of``, which answers None for it.
    """

    rank: int

    @abstractmethod
    def low_rank_factors(self, rank: int | None = None) -> LowRankFactors:
        """``ΔW = scaling · B A`` as factors, at ``rank`` leading components when given (see the class doc)."""

    def check_rank_choice(self, rank: int | None) -> None:
        """Refuse a rank the layer cannot give: any rank without rank choice, else one outside 1..stored."""
        if rank is None:
            return
        if not self.supports_rank_choice:
            raise RankChoiceError(
                f"{type(self).__name__}.low_rank_factors() takes no rank: convert at a chosen rank with svd_rank"
            )
        if not 1 <= rank <= self.rank:
            raise RankChoiceError(f"rank {rank} of {type(self).__name__}: choose a rank in 1..{self.rank}")


def low_rank_factors_of(layer: nn.Module, rank: int | None = None) -> LowRankFactors | None:
    """The layer's ``LowRankFactors`` (at ``rank`` leading components when given), or None when it has none.

    The one way callers (analyses, export, UI) ask for factors. A rank for a layer with factors but no rank
    choice raises ``RankChoiceError``; a layer without factors answers None whatever the rank.
    """
    if not isinstance(layer, LowRankLinear):
        return None
    return layer.low_rank_factors(rank)


@dataclass
class TrainContext:
    """What the training loop hands to a method's hooks."""

    model: TaskModel
    step: int
    total_steps: int
    loss_fn: Any  # callable(batch) -> loss, for hooks that need gradients (importance scores)
    batches: Any  # callable() -> iterator of training batches (calibration)
    log: Any = None  # callable(str)
    state: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base of every method. Subclasses set the class attributes and ``make_layer`` (or override ``inject``)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    prefix: ClassVar[str]  # marks the method's tensors in the state dict (e.g. "lora_")
    mergeable: bool = False  # a class default; an instance may decide from its config (HEAT, Lily)
    peft_variant: ClassVar[PeftVariant | None] = None  # set when PEFT's LoRA needs flags to compute this method
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # Small settings for the shared contract test on tiny models (tests/test_methods_contract.py).
    test_params: ClassVar[dict[str, Any]] = {}
    config: MethodConfig  # an instance of config_cls; subclasses narrow the type (``config: LoRAConfig``)

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()

    # -- injection -------------------------------------------------------------------------------
    def target_layers(self, model: TaskModel) -> list[AdaptableLayer]:
        cfg = self.config
        roles = getattr(cfg, "target_roles", None)
        blocks = getattr(cfg, "blocks", None)
        layers = model.adaptable_layers(roles)
        if blocks is not None:
            layers = [l for l in layers if l.block in blocks]
        if roles is not None and not layers:
            raise ValueError(f"method.target_roles {roles}: no such layers in model {model.info.name}")
        return layers

    def make_layer(self, base: nn.Linear, layer: AdaptableLayer, model: TaskModel) -> AdaptedLinear:
        raise NotImplementedError(f"{type(self).__name__} must define make_layer or inject")

    def inject(self, model: TaskModel) -> None:
        for layer in self.target_layers(model):
            model.set_submodule(layer.name, self.make_layer(layer.module, layer, model))

    def apply(self, model: TaskModel) -> TaskModel:
        """Freeze the backbone, inject this method, keep the task head trainable."""
        model.requires_grad_(False)
        self.inject(model)
        head = set(model.head_parameter_names())
        for name, p in model.named_parameters():
            if self.is_adapter_key(name) or name in head:
                p.requires_grad_(True)
        return model

    def is_adapter_key(self, key: str) -> bool:
        return any(part.startswith(self.prefix) for part in key.split("."))

    # -- inspection ------------------------------------------------------------------------------
    @staticmethod
    def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}

    def peft_lora_options(self) -> PeftLoraOptions | None:
        """This instance as Hugging Face PEFT's LoRA (its ``LoraConfig`` fields), or None when it has no LoRA form.

        A method overrides this from its own config; callers never read ``rank`` or ``alpha`` by name.
        """
        return None

    def default_export_rank(self) -> int | None:
        """The rank a conversion to LoRA by truncated SVD starts from: the method's own rank setting, if any."""
        options = self.peft_lora_options()
        return options.r if options is not None else None

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.adapted_layers(model).items():
            dw = layer.delta_weight()
            if dw is not None:
                out[name] = dw.detach()
        return out

    def adapter_param_count(self, model: TaskModel) -> int:
        """Closed-form parameter count (docs/METHODS.md), excluding the task head. Tested against reality."""
        raise NotImplementedError

    def trainable_param_count(self, model: TaskModel) -> int:
        """Entries that training can change, task head included (HEAT leaves out its masked heads' slices)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)  # nn.Module counts a shared one once

    def stored_size(self, model: TaskModel) -> StoredSize:
        """Values and bytes of the adapter file without the task head (what a user stores per task)."""
        head = set(model.head_parameter_names())
        tensors = [t for k, t in self.adapter_state_dict(model).items() if k not in head]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return StoredSize(params=sum(t.numel() for t in tensors), bytes=nbytes)

    def artifacts(self, model: TaskModel) -> dict[str, Any]:
        """JSON-able analysis data the method wants stored with the run (scores, router loads, ...)."""
        return {}

    def state(self) -> dict[str, Any]:
        """JSON-able structural state needed to rebuild the adapted model (e.g. a pruning map)."""
        return {}

    def load_state(self, model: TaskModel, state: dict[str, Any]) -> None:
        """Re-apply structural state from ``state()`` to a freshly ``apply``-ed model."""

    # -- training hooks --------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> bool:
        """Called once before the first step; return True if the set of trainable parameters changed."""
        return False

    def on_step_end(self, ctx: TrainContext) -> bool:
        """Called after every optimizer step; return True if the set of trainable parameters changed."""
        return False

    def extra_loss(self, model: TaskModel) -> torch.Tensor | None:
        """An auxiliary loss added to the task loss (e.g. MoLA's load balancing), or None."""
        return None

    # -- state dict ------------------------------------------------------------------------------
    def adapter_state_dict(self, model: TaskModel) -> dict[str, torch.Tensor]:
        """The method's tensors and the task head, each shared tensor once (safetensors refuses aliases)."""
        head = set(model.head_parameter_names())
        out, seen = {}, set()
        for key, tensor in model.state_dict(keep_vars=False).items():
            if not (self.is_adapter_key(key) or key in head):
                continue
            ptr = (tensor.data_ptr(), tensor.shape)
            if ptr in seen:
                continue
            seen.add(ptr)
            out[key] = tensor.detach().contiguous().clone()
        return out

    def load_adapter_state_dict(self, model: TaskModel, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.adapter_state_dict(model))
        missing, unexpected = expected - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"adapter does not fit model {model.info.name} with method {self.name}: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        current = model.state_dict()
        for key, tensor in state.items():
            if current[key].shape != tensor.shape:
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(tensor.shape)}, model {model.info.name} "
                    f"expects {tuple(current[key].shape)}"
                )
        model.load_state_dict(state, strict=False)

    # -- merging ---------------------------------------------------------------------------------
    def merge(self, model: TaskModel) -> TaskModel:
        """Replace each adapted layer by a dense ``nn.Linear`` with ΔW folded in (in place)."""
        if not self.mergeable:
            raise TypeError(f"method {self.name} is not mergeable")
        for name, layer in self.adapted_layers(model).items():
            model.set_submodule(name, layer.merged())
        return model


# --- registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method by its ``name``; names and prefixes must be unique."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is already registered")
    for other in _REGISTRY.values():
        if cls.prefix and other.prefix == cls.prefix:
            raise ValueError(f"method {cls.name!r} reuses the parameter prefix {cls.prefix!r} of {other.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"method.name {name!r} is not a registered method; choose from {', '.join(_REGISTRY)}"
        ) from None


def method_config(name: str, params: dict[str, Any] | None) -> MethodConfig:
    cls = get_method(name)
    try:
        return cls.config_cls.model_validate(params or {})
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            parts.append(f"method{'.' + loc if loc else ''}: {e['msg'].removeprefix('Value error, ')}")
        raise ValueError(f"{name}: " + "; ".join(parts)) from None


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    return get_method(name)(method_config(name, params))
