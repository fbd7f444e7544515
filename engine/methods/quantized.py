"""Low-precision adapters (Jie, Wang & Deng 2023, "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy", ICCV, arXiv 2307.16867): adapter weights quantised to 1–8 bits in the
forward pass, trained through a straight-through estimator, and stored bit-packed (docs/METHODS.md#lowbit).

Quantiser, per weight tensor ``w`` (one per-tensor scale, as the paper)::

    bits = 1:   Q(w) = α · sign(w),                 α = mean |w|                 (sign(0) = +1)
    bits ≥ 2:   Q(w) = Δ · clamp(round(w / Δ), −q, q),  Δ = max |w| / q,  q = 2^(bits−1) − 1

Backward (straight-through): ``∂L/∂w = ∂L/∂Q(w)``; the scale is treated as a constant (``w + (Q(w) − w).detach()``).

The quantiser is a ``torch.nn.utils.parametrize`` parametrization of each adapter weight, so the layers' maths
(LoRA's ``s B A``, a bottleneck's ``W_up σ(W_down x)``, HEAT's head masks) read the quantised weight through
``.weight`` and need no code of their own. The float latent (``...parametrizations.weight.original``) is what the
optimizer updates; training checkpoints keep it. The adapter file keeps only the packed integer codes
(``...parametrizations.weight.0.codes``, ``uint8``, ``bits`` bits per weight) and the scale (``...0.scale``):
loading sets the latent to the dequantised weight, whose quantisation is again the same weight.

Stored size: ``⌈n · bits / 8⌉`` bytes + one float32 scale per weight tensor (and full-precision biases), against
``4 n`` bytes for a float32 adapter (``stored_size``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from engine.methods.adapters import Bottleneck, InputTap, Mailbox, paired_layers
from engine.methods.base import (
    AdaptedLinear,
    BlockList,
    Method,
    PeftLoraOptions,
    StoredSize,
    TargetedConfig,
    register_method,
)
from engine.methods.lowrank import LowRankUpdateLinear, lora_scaling

if TYPE_CHECKING:
    from engine.models import TaskModel


# --- the quantiser and the packing ----------------------------------------------------------------


def levels(bits: int) -> int:
    """q: the largest code magnitude of the symmetric grid (bits ≥ 2); 1 for the sign quantiser."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def quantize_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, scale)`` with ``Q(w) = scale · k``: k ∈ {−1, +1} for 1 bit, k ∈ {−q..q} otherwise (see the module doc)."""
    w = w.detach()
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype), w.abs().mean()
    q = levels(bits)
    scale = w.abs().max() / q
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -q, q), scale


def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(w)`` in the forward pass, the identity in the backward pass (straight-through estimator)."""
    k, scale = quantize_codes(w, bits)
    return w + (scale * k - w).detach()


def code_offset(bits: int) -> int:
    """Codes are stored unsigned: ``u = (k + 1) / 2`` for 1 bit, ``u = k + q`` otherwise."""
    return levels(bits)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes ``< 2^bits`` packed little-endian into ``⌈n · bits / 8⌉`` bytes (``uint8``)."""
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, device=flat.device)
    bitstream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).reshape(-1, 8)
    return (bitstream << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: the first ``n`` codes, as int64."""
    bitstream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    groups = bitstream[: n * bits].reshape(n, bits)
    return (groups << torch.arange(bits, device=packed.device)).sum(1)


def packed_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


class QuantizeSTE(nn.Module):
    """The parametrization ``weight = Q(latent)``; it also holds the packed codes and scale the file stores."""

    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, shape: torch.Size, bits: int, device: torch.device | None = None):
        super().__init__()
        self.bits, self.shape = bits, tuple(shape)
        n = math.prod(self.shape)
        self.register_buffer("codes", torch.zeros(packed_bytes(n, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32, device=device))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return quantize(latent, self.bits)

    @torch.no_grad()
    def pack(self, latent: torch.Tensor) -> None:
        """Refresh ``codes`` and ``scale`` from the latent weight."""
        k, scale = quantize_codes(latent, self.bits)
        unsigned = (k + 1) / 2 if self.bits == 1 else k + code_offset(self.bits)
        self.codes.copy_(pack_bits(unsigned.round().long(), self.bits))
        self.scale.copy_(scale.float())

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """``scale · k`` from the stored codes: the quantised weight the file describes."""
        u = unpack_bits(self.codes, self.bits, math.prod(self.shape)).to(torch.float32)
        k = 2 * u - 1 if self.bits == 1 else u - code_offset(self.bits)
        return (self.scale * k).reshape(self.shape)


def quantize_weight(linear: nn.Linear, bits: int) -> nn.Linear:
    """Make ``linear.weight`` read ``Q(latent)`` (the latent is the current weight)."""
    parametrize.register_parametrization(
        linear, "weight", QuantizeSTE(linear.weight.shape, bits, linear.weight.device), unsafe=True
    )
    return linear


def _weight_parametrization(module: nn.Module) -> Any:
    """``module.parametrizations["weight"]`` (a ``ParametrizationList``: ``.original`` and its modules)."""
    return module.parametrizations["weight"]  # type: ignore[index]


def latent_weight(linear: nn.Linear) -> torch.Tensor:
    """The Parameter an optimizer updates for ``linear.weight``: the float latent when quantised, else the weight."""
    if parametrize.is_parametrized(linear, "weight"):
        return _weight_parametrization(linear).original
    return linear.weight


def quantizers(model: nn.Module) -> list[tuple[nn.Module, QuantizeSTE]]:
    """Every quantised weight of ``model``: ``(owner module, its QuantizeSTE)``."""
    out = []
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            q = _weight_parametrization(module)[0]
            if isinstance(q, QuantizeSTE):
                out.append((module, q))
    return out


def packed_adapter_state_dict(method: Method, model: TaskModel) -> dict[str, torch.Tensor]:
    """The adapter state dict with every quantised weight as packed codes + scale (latents left out)."""
    for module, q in quantizers(model):
        q.pack(_weight_parametrization(module).original)
    state = Method.adapter_state_dict(method, model)
    return {k: v for k, v in state.items() if not k.endswith(".parametrizations.weight.original")}


@torch.no_grad()
def unpack_into_latents(model: nn.Module) -> None:
    """After loading codes and scales: set each latent to its dequantised weight (Q of it is the same weight)."""
    for module, q in quantizers(model):
        latent = _weight_parametrization(module).original
        latent.copy_(q.dequantized().to(latent.dtype))


def quantized_stored_size(method: Method, model: TaskModel) -> StoredSize:
    """Values and bytes of the adapter file without the task head: packed codes count as the weights they encode."""
    head = set(model.head_parameter_names())
    params = nbytes = 0
    for key, tensor in packed_adapter_state_dict(method, model).items():
        if key in head:
            continue
        if key.endswith(".codes"):
            q = model.get_submodule(key.removesuffix(".codes"))
            assert isinstance(q, QuantizeSTE)
            params += math.prod(q.shape)
        else:
            params += tensor.numel()
        nbytes += tensor.numel() * tensor.element_size()
    return StoredSize(params=params, bytes=nbytes)


# --- the method -------------------------------------------------------------------------------------


class LowBitConfig(TargetedConfig):
    base: Literal["lora", "adaptformer"] = Field(
        "lora", description="adapter whose weights are quantised: LoRA (Bi-LoRA) or AdaptFormer (Bi-AdaptFormer)"
    )
    bits: int = Field(1, ge=1, le=8, description="bits per adapter weight (1: sign × mean|w|)")
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r (base lora)")
    alpha: float = Field(16.0, gt=0, description="LoRA α; the update is scaled by α/r (base lora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input (base lora)")
    bottleneck: int = Field(64, ge=1, le=16384, description="AdaptFormer's hidden size m (base adaptformer)")
    scaling: float = Field(0.1, gt=0, description="AdaptFormer's output scale s (base adaptformer)")
    blocks: BlockList = Field(None, description="transformer blocks to adapt (None: all)")


class LowBitLoRALinear(LowRankUpdateLinear):
    """LoRA with quantised factors: ``ΔW = s · Q(B) Q(A)``. Mergeable; its factors are the quantised ones."""

    factor_prefix = "lowbit_"

    def __init__(self, base: nn.Linear, rank: int, scaling: float, bits: int, dropout: float = 0.0):
        super().__init__(base, rank, scaling, dropout)
        quantize_weight(self.factor_A, bits)
        quantize_weight(self.factor_B, bits)


class LowBitAdaptFormerLinear(AdaptedLinear):
    """AdaptFormer's branch with quantised projections: ``W0 x + b0 + s (Q(W_up) ReLU(Q(W_down) x_mlp + b_d) + b_u)``.

    The biases stay in full precision (they are ``m + d_out`` values). Not mergeable."""

    linear_in_x = False

    def __init__(self, base: nn.Linear, mailbox: Mailbox, d_in: int, size: int, scaling: float, bits: int):
        super().__init__(base)
        w = base.weight
        self.lowbit_adapter = Bottleneck(d_in, base.out_features, size, "relu", True, device=w.device, dtype=w.dtype)
        quantize_weight(self.lowbit_adapter.down, bits)
        quantize_weight(self.lowbit_adapter.up, bits)
        self.mailbox, self.scaling = mailbox, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lowbit_adapter(self.mailbox.take())


@register_method
class LowBit(Method):
    """Low-precision adapters (arXiv 2307.16867): LoRA or AdaptFormer with 1–8-bit weights, stored packed.

    See the module docstring for the quantiser; docs/METHODS.md#lowbit for our choices (the b ≥ 2 grid, biases
    in full precision, the scale without gradient)."""

    name = "lowbit"
    config_cls = LowBitConfig
    config: LowBitConfig
    prefix = "lowbit_"
    summary = "Adapters (LoRA or AdaptFormer) with 1–8-bit weights (straight-through), stored bit-packed"
    paper = (
        "Jie, Wang & Deng 2023, Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision "
        "Redundancy (arXiv 2307.16867)"
    )
    test_params = {"rank": 2, "bottleneck": 4, "bits": 2}

    def __init__(self, config: LowBitConfig | None = None):
        super().__init__(config)
        self.mergeable = self.config.base == "lora"

    def inject(self, model) -> None:
        cfg: LowBitConfig = self.config
        if cfg.base == "lora":
            for layer in self.target_layers(model):
                scaling = lora_scaling(cfg.alpha, cfg.rank)
                adapted = LowBitLoRALinear(layer.module, cfg.rank, scaling, cfg.bits, cfg.dropout)
                model.set_submodule(layer.name, adapted)
            return
        for _block, fc1, fc2 in paired_layers(model, "fc1", "fc2", cfg.blocks):
            mailbox = Mailbox()
            model.set_submodule(fc1.name, InputTap(fc1.module, mailbox))
            branch = LowBitAdaptFormerLinear(
                fc2.module, mailbox, fc1.module.in_features, cfg.bottleneck, cfg.scaling, cfg.bits
            )
            model.set_submodule(fc2.name, branch)

    def peft_lora_options(self) -> PeftLoraOptions | None:
        """The LoRA base exports as PEFT's LoRA with the quantised factors (in float); AdaptFormer has no LoRA form."""
        cfg: LowBitConfig = self.config
        if cfg.base != "lora":
            return None
        return PeftLoraOptions(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout)

    def adapter_param_count(self, model) -> int:
        """LoRA: ``r (d_in + d_out)`` per layer; AdaptFormer: ``m (d_in + d_out) + m + d_out`` per block."""
        cfg: LowBitConfig = self.config
        if cfg.base == "lora":
            return sum(cfg.rank * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))
        return sum(
            Bottleneck.param_count(fc1.module.in_features, fc2.module.out_features, cfg.bottleneck, True)
            for _block, fc1, fc2 in paired_layers(model, "fc1", "fc2", cfg.blocks)
        )

    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        return packed_adapter_state_dict(self, model)

    def load_adapter_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(model, state)
        unpack_into_latents(model)

    def stored_size(self, model) -> StoredSize:
        return quantized_stored_size(self, model)

    def artifacts(self, model) -> dict[str, Any]:
        """Stored bytes against the same adapter in float32 (the paper's storage comparison), and the scale of
        each quantised weight (one per tensor: the step of its grid)."""
        stored = self.stored_size(model)  # packs every weight: the scales below are the stored ones
        full = 4 * self.adapter_param_count(model)
        names = {id(module): name for name, module in model.named_modules()}
        scales = {names[id(module)]: float(q.scale) for module, q in quantizers(model)}
        return {"bits": self.config.bits, "stored_bytes": stored.bytes, "float32_bytes": full,
                "compression": full / max(stored.bytes, 1), "scales": scales}  # fmt: skip
