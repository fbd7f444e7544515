"""HEAT: head-level adaptation with Taylor importance (arXiv 2404.08894).

HEAT scores every attention head with a first-order Taylor importance (TIS) and masks the adaptation of the
least important heads. The paper's exact definitions are not public; ours (docs/METHODS.md#heat), per block b
and head h, with ``g = ∂L/∂θ`` on one calibration batch:

* ``weight``:  ``TIS = |Σ_{θ ∈ head h's slices of W_q, W_k, W_v, W_o} θ · g|`` (rows of q/k/v, columns of o;
  gradients of the frozen weights, taken with ``requires_grad`` switched on for the calibration only);
* ``gate``:    ``TIS = |∂L/∂ξ_h|`` for a gate ξ_h = 1 multiplying head h's output before the output projection
  (the importance of Michel et al. 2019, "Are Sixteen Heads Really Better than One?", eq. 2);
* ``adapter``: the sum of ``weight`` over the adapter's ΔW slices of the head, after a short warm-up.

Scores are ``|·|`` per batch, averaged over the calibration batches (as Michel et al. accumulate
``|∂L/∂ξ_h|``). The lowest ``mask_ratio`` of the heads (over all adapted blocks, or within each block) get
their adapter slices masked: rows of the q/k/v update, columns of the o update. The mask is a buffer applied
inside the forward, so a masked head receives exactly zero update and zero gradient.

The adapter under the mask is LoRA (Hu et al. 2021, eq. 3), reused from ``engine.methods.lora`` (the shared
low-rank layer of ``engine.methods.lowrank``, with the mask around its update), or a
per-linear parallel bottleneck ``h = W0 x + b + s · W_up ReLU(W_down x)`` (AdaptFormer's parallel adapter,
Chen et al. 2022, eq. 5, without the adapter biases and applied to each of q, k, v, o).

Two identities keep the ``adapter`` strategy cheap and base-agnostic. With ``G = ∂L/∂W`` the gradient of
the effective weight (equal for W0 and ΔW), LoRA's ``∂L/∂B = s G Aᵀ`` gives
``Σ_{rows of head h} B ⊙ ∂L/∂B = Σ_{rows of head h} ΔW ⊙ G`` (and the same for A's columns and o), so the
sum over the head's adapter *parameter* slices is the ΔW sum of the definition; for the bottleneck, which
has no dense ΔW, that parameter sum is the first-order Taylor change of the loss when the head's slice is
zeroed, which is what the ΔW sum measures for LoRA. Likewise the o part of ``weight`` equals the ``gate``
score before the absolute value: ``Σ W_o[:, h] ⊙ G_o[:, h] = Σ_tokens ⟨x_h, ∂L/∂x_h⟩ = ∂L/∂ξ_h``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from engine.methods.base import AdaptedLinear, Method, PeftLoraOptions, TargetedConfig, TrainContext, register_method
from engine.methods.lora import LoRA, LoRALinear
from engine.methods.lowrank import LowRankFactors, lora_scaling
from engine.methods.quantized import (
    latent_weight,
    packed_adapter_state_dict,
    quantize_weight,
    quantized_stored_size,
    unpack_into_latents,
)

HEAD_ROLES = ("q", "k", "v", "o")  # the roles whose weights split by head: rows of q/k/v, columns of o


class HEATConfig(TargetedConfig):
    target_roles: list[str] = Field(
        ["q", "k", "v", "o"], description="attention roles to adapt and mask by head: q, k, v, o"
    )
    base: Literal["lora", "adapter"] = Field(
        "lora", description="adapter under the head mask: LoRA or a parallel bottleneck adapter"
    )
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r (base lora)")
    alpha: float = Field(16.0, gt=0, description="LoRA α; the update is scaled by α/r (base lora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input (base lora)")
    adapter_dim: int = Field(8, ge=1, le=4096, description="bottleneck width of the parallel adapter (base adapter)")
    adapter_scale: float = Field(0.1, gt=0, description="s, the parallel adapter's output scale (AdaptFormer: 0.1)")
    bits: int | None = Field(
        None, ge=1, le=8,
        description="quantise the base adapter's weights to this many bits (1: Bi-LoRA / Bi-AdaptFormer); None: float",
    )  # fmt: skip
    strategy: Literal["weight", "gate", "adapter"] = Field(
        "weight", description="Taylor importance of a head: frozen weights, a head gate, or the warmed-up adapter"
    )
    mask_ratio: float = Field(0.25, ge=0.0, lt=1.0, description="share of the heads whose adaptation is masked")
    mask_scope: Literal["global", "per_layer"] = Field(
        "global", description="rank heads over all adapted blocks, or mask the same share in every block"
    )
    calibration_batches: int = Field(32, ge=1, description="training batches the importance is averaged over")
    adapter_warmup_ratio: float = Field(
        0.1, gt=0.0, lt=1.0, description="share of the training steps before the adapter strategy scores heads"
    )

    @field_validator("target_roles")
    @classmethod
    def _roles_split_by_head(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in HEAD_ROLES]
        if bad:
            raise ValueError(f"HEAT masks attention heads: role(s) {bad} do not split by head; choose from q, k, v, o")
        return v

    def lora_scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank)


class HeadMask(nn.Module):
    """A 0/1 mask per head over one feature axis of width ``num_heads · head_dim`` (head-major, as attention)."""

    heads: torch.Tensor  # buffer registered in __init__

    def __init__(self, num_heads: int, width: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        if num_heads < 1 or width % num_heads:
            raise ValueError(f"a width of {width} features does not split into {num_heads} attention heads")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        # Not persistent: the mask is structural state, saved through ``HEAT.state()``.
        self.register_buffer("heads", torch.ones(num_heads, device=device, dtype=dtype), persistent=False)

    def features(self) -> torch.Tensor:
        return self.heads.repeat_interleave(self.head_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Mask the last axis of ``t`` head by head."""
        return t * self.features().to(t.dtype)


def layer_heads(role: str, num_heads: int, num_kv_heads: int | None) -> int:
    """Heads a layer's features split into: key/value heads for k and v under grouped-query attention."""
    return (num_kv_heads or num_heads) if role in ("k", "v") else num_heads


def to_query_heads(scores: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scores of ``n_kv`` key/value heads spread over the ``num_heads`` query heads that share them: query head h
    of group g = h // (num_heads / n_kv) gets ``score_g / group size`` (the group's total is kept)."""
    group = num_heads // scores.numel()
    return scores.repeat_interleave(group) / group if group > 1 else scores


def group_mask(query_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """A layer's head mask from the query heads' one: a key/value head is masked only when every query head of its
    group is (it still serves any kept query head)."""
    if heads == query_mask.numel():
        return query_mask
    return query_mask.reshape(heads, -1).amax(1)


def _head_axis(role: str) -> int:
    """0 when heads split the layer's outputs (rows of W: q, k, v), 1 when they split its inputs (o)."""
    return 1 if role == "o" else 0


class HeadMaskedLoRALinear(LoRALinear):
    """LoRA with head h's slice of ΔW masked: ``ΔW = s · diag(m) B A`` (q/k/v) or ``s · B A diag(m)`` (o).

    The mask multiplies the LoRA output (rows) or input (columns), so masked rows of B (columns of A) get
    exactly zero gradient and the masked ΔW slice is exactly zero. Mergeable.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float, num_heads: int, head_axis: int):
        super().__init__(base, rank, scaling, dropout)
        self.head_axis = head_axis
        width = base.out_features if head_axis == 0 else base.in_features
        self.heat_mask = HeadMask(num_heads, width, base.weight.device, base.weight.dtype)

    def low_rank_update(self, h: torch.Tensor) -> torch.Tensor:
        if self.head_axis == 1:
            h = self.heat_mask(h)
        update = super().low_rank_update(h)
        return self.heat_mask(update) if self.head_axis == 0 else update

    def low_rank_factors(self, rank: int | None = None) -> LowRankFactors:
        """LoRA's factors with the masked heads' rows of B (q/k/v) or columns of A (o) zeroed."""
        f = super().low_rank_factors(rank)
        m = self.heat_mask.features()
        if self.head_axis == 0:
            return LowRankFactors(A=f.A, B=f.B * m[:, None], scaling=f.scaling)
        return LowRankFactors(A=f.A * m[None, :], B=f.B, scaling=f.scaling)

    def delta_weight(self) -> torch.Tensor:
        f = self.low_rank_factors()
        return f.scaled_B @ f.A

    def head_sliced_parameters(self) -> list[tuple[torch.Tensor, int]]:
        """The tensors whose slices belong to one head, with the axis the heads split."""
        return [(latent_weight(self.factor_B), 0)] if self.head_axis == 0 else [(latent_weight(self.factor_A), 1)]


class HeadMaskedAdapterLinear(AdaptedLinear):
    """Parallel bottleneck ``h = W0 x + b + s · m ⊙ W_up ReLU(W_down x)`` (q/k/v: mask m on the outputs) or
    ``h = W0 x + b + s · W_up ReLU(W_down (m ⊙ x))`` (o: mask on the inputs, i.e. W_down's columns).

    ``W_down`` is Kaiming-uniform (a = √5, as nn.Linear), ``W_up`` zero, so training starts from the base model.
    Parameters ``m (d_in + d_out)``. Not linear in x (ReLU): no ΔW, not mergeable.
    """

    linear_in_x = False

    def __init__(self, base: nn.Linear, dim: int, scale: float, num_heads: int, head_axis: int):
        super().__init__(base)
        w = base.weight
        self.heat_down = nn.Linear(base.in_features, dim, bias=False, device=w.device, dtype=w.dtype)
        self.heat_up = nn.Linear(dim, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.heat_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.heat_up.weight)
        self.scale = scale
        self.head_axis = head_axis
        width = base.out_features if head_axis == 0 else base.in_features
        self.heat_mask = HeadMask(num_heads, width, w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.heat_mask(x) if self.head_axis == 1 else x
        update = self.scale * self.heat_up(torch.relu(self.heat_down(h)))
        if self.head_axis == 0:
            update = self.heat_mask(update)
        return self.base(x) + update

    def head_sliced_parameters(self) -> list[tuple[torch.Tensor, int]]:
        return [(latent_weight(self.heat_up), 0)] if self.head_axis == 0 else [(latent_weight(self.heat_down), 1)]


HeadMaskedLayer = HeadMaskedLoRALinear | HeadMaskedAdapterLinear


# --- Taylor importance ---------------------------------------------------------------------------


def per_head_sum(t: torch.Tensor, num_heads: int, axis: int) -> torch.Tensor:
    """Sum a 2-D tensor over each head's rows (axis 0) or columns (axis 1): a vector of ``num_heads``."""
    if axis == 0:
        return t.reshape(num_heads, -1).sum(1)
    return t.reshape(t.shape[0], num_heads, -1).sum((0, 2))


def taylor_scores(
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    tensors: list[torch.Tensor],
    signed_scores: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
) -> torch.Tensor:
    """``mean over batches of |signed_scores(∂L/∂tensors)|``; gradients via ``autograd.grad`` (no ``.grad``
    is touched, so calibration leaves the training state as it was)."""
    total, n = None, 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(batch), tensors)
        scores = signed_scores(grads).detach().float().abs()
        total, n = (scores if total is None else total + scores), n + 1
    if total is None:
        raise ValueError("HEAT calibration got no batch: the training set is empty")
    return (total / n).cpu()


def _dense_weight(module: nn.Linear | AdaptedLinear) -> torch.Tensor:
    return module.base.weight if isinstance(module, AdaptedLinear) else module.weight


@contextmanager
def _calibration_mode(model: nn.Module, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Eval mode (no dropout) and ``requires_grad`` on ``tensors``, both restored afterwards."""
    was_training = model.training
    flags = [t.requires_grad for t in tensors]
    model.eval()
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
        model.train(was_training)


def weight_importance(model, blocks: list[int], num_heads: int, batches, loss_fn) -> torch.Tensor:
    """Strategy ``weight``: ``|Σ θ · ∂L/∂θ|`` over head h's rows of W_q, W_k, W_v and columns of W_o (frozen
    W0), per block in ``blocks``. Returns (len(blocks), num_heads)."""
    row = {b: i for i, b in enumerate(blocks)}
    layers = [l for l in model.adaptable_layers(HEAD_ROLES) if l.block in row]
    weights = [_dense_weight(l.module) for l in layers]

    def signed(grads):
        out = torch.zeros(len(blocks), num_heads, device=weights[0].device)
        for layer, w, g in zip(layers, weights, grads):
            heads = layer_heads(layer.role, num_heads, model.info.num_kv_heads)
            out[row[layer.block]] += to_query_heads(per_head_sum(w.detach() * g, heads, _head_axis(layer.role)),
                                                    num_heads).float()  # fmt: skip
        return out

    with _calibration_mode(model, weights):
        return taylor_scores(batches, loss_fn, weights, signed)


def gate_importance(model, blocks: list[int], num_heads: int, batches, loss_fn) -> torch.Tensor:
    """Strategy ``gate``: ``|∂L/∂ξ_h|`` with ξ = 1 gating each head's output at the input of the o layer
    (a forward pre-hook that views the input as heads, so it is the same for BERT, ViT and timm)."""
    row = {b: i for i, b in enumerate(blocks)}
    o_layers = [l for l in model.adaptable_layers(["o"]) if l.block in row]
    if len(o_layers) != len(blocks):
        raise ValueError(f"HEAT gate strategy: model {model.info.name} has no output projection in some block")
    device = _dense_weight(o_layers[0].module).device
    gates = [torch.ones(num_heads, device=device) for _ in blocks]

    def gate_hook(gate: torch.Tensor):
        def hook(module, args):
            x = args[0]
            gated = x.reshape(*x.shape[:-1], num_heads, -1) * gate[:, None].to(x.dtype)
            return (gated.reshape(x.shape), *args[1:])

        return hook

    handles = [l.module.register_forward_pre_hook(gate_hook(gates[row[l.block]])) for l in o_layers]
    try:
        with _calibration_mode(model, gates):
            return taylor_scores(batches, loss_fn, gates, lambda grads: torch.stack(list(grads)))
    finally:
        for handle in handles:
            handle.remove()


def adapter_importance(model, layers: list[tuple[int, HeadMaskedLayer]], blocks: list[int], num_heads: int,
                       batches, loss_fn) -> torch.Tensor:  # fmt: skip
    """Strategy ``adapter``: ``|Σ θ · ∂L/∂θ|`` over head h's slices of the adapters of its block (LoRA: equal
    to the sum over the ΔW slices, see the module docstring)."""
    row = {b: i for i, b in enumerate(blocks)}
    sliced = [
        (block, p, axis, layer.heat_mask.num_heads)
        for block, layer in layers
        for p, axis in layer.head_sliced_parameters()
    ]
    params = [p for _, p, _, _ in sliced]

    def signed(grads):
        out = torch.zeros(len(blocks), num_heads, device=params[0].device)
        for (block, p, axis, heads), g in zip(sliced, grads):
            out[row[block]] += to_query_heads(per_head_sum(p.detach() * g, heads, axis), num_heads).float()
        return out

    with _calibration_mode(model, params):
        return taylor_scores(batches, loss_fn, params, signed)


def head_mask_from_scores(scores: torch.Tensor, mask_ratio: float, scope: str = "global") -> torch.Tensor:
    """1 for kept heads, 0 for the ``round(mask_ratio · n)`` lowest-scoring ones, n counted over the whole
    matrix (``global``) or per row (``per_layer``). Ties keep the earlier head."""
    mask = torch.ones_like(scores, dtype=torch.float32)
    if scope == "global":
        k = math.floor(mask_ratio * scores.numel() + 0.5)
        lowest = torch.argsort(scores.flatten(), stable=True)[:k]
        mask.view(-1)[lowest] = 0.0
    else:
        k = math.floor(mask_ratio * scores.shape[1] + 0.5)
        lowest = torch.argsort(scores, dim=1, stable=True)[:, :k]
        mask.scatter_(1, lowest, 0.0)
    return mask


# --- the method ----------------------------------------------------------------------------------


@register_method
class HEAT(Method):
    """HEAT (arXiv 2404.08894): LoRA or a parallel adapter on q, k, v, o, with the adaptation of the least
    Taylor-important heads masked. Choices where the paper is silent: the three TIS definitions above,
    ``|·|`` per batch averaged over 32 calibration batches in eval mode, a global ranking over the adapted
    blocks, and ``adapter`` scoring after ``adapter_warmup_ratio`` of the training steps; at that point the
    masked slices are zeroed and the optimizer is rebuilt (``on_step_end`` returns True) so Adam's moments
    from the warm-up cannot move them again."""

    name = "heat"
    config_cls = HEATConfig
    config: HEATConfig
    prefix = "heat_"
    mergeable = True  # with the default LoRA base; an instance with the adapter base sets it False
    summary = "LoRA/adapter on q,k,v,o with the least Taylor-important attention heads' updates masked"
    paper = (
        "HEAT: Head-level Parameter Efficient Adaptation of Vision Transformers with Taylor-expansion "
        "Importance Scores (arXiv 2404.08894)"
    )
    test_params = {"rank": 2, "adapter_dim": 2, "calibration_batches": 2}

    def __init__(self, config: HEATConfig | None = None):
        super().__init__(config)
        self.mergeable = self.config.base == "lora"
        self.blocks: list[int] = []
        self.num_heads = 0
        self.scores: torch.Tensor | None = None  # (len(blocks), num_heads), set by calibration
        self.head_mask: torch.Tensor | None = None  # same shape, 1 keep / 0 masked
        self.calibrated_at_step: int | None = None

    def is_adapter_key(self, key: str) -> bool:
        # The LoRA base keeps LoRA's parameter names (lora_A, lora_B); the mask and bottleneck use heat_.
        return any(part.startswith((self.prefix, LoRA.prefix)) for part in key.split("."))

    # -- injection -------------------------------------------------------------------------------
    def make_layer(self, base, layer, model):
        cfg: HEATConfig = self.config
        axis = _head_axis(layer.role)
        heads = layer_heads(layer.role, model.info.num_heads, model.info.num_kv_heads)
        adapted: HeadMaskedLayer
        if cfg.base == "lora":
            adapted = HeadMaskedLoRALinear(base, cfg.rank, cfg.lora_scaling(), cfg.dropout, heads, axis)
            projections = [adapted.factor_A, adapted.factor_B]
        else:
            adapted = HeadMaskedAdapterLinear(base, cfg.adapter_dim, cfg.adapter_scale, heads, axis)
            projections = [adapted.heat_down, adapted.heat_up]
        if cfg.bits is not None:  # Bi-LoRA / Bi-AdaptFormer bases (engine/methods/quantized.py)
            for projection in projections:
                quantize_weight(projection, cfg.bits)
        return adapted

    def peft_lora_options(self) -> PeftLoraOptions | None:
        """The LoRA base as PEFT's LoRA (masked heads are zero rows or columns of its factors); the bottleneck
        base has no LoRA form."""
        cfg: HEATConfig = self.config
        if cfg.base != "lora":
            return None
        return PeftLoraOptions(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout)

    def inject(self, model) -> None:
        if model.info.num_heads < 1:
            raise ValueError(f"HEAT needs the attention head count, and model {model.info.name} does not give it")
        layers = self.target_layers(model)
        self.blocks = sorted({l.block for l in layers})
        self.num_heads = model.info.num_heads
        for layer in layers:
            model.set_submodule(layer.name, self.make_layer(layer.module, layer, model))

    def _masked_layers(self, model) -> list[tuple[int, HeadMaskedLayer]]:
        return [(l.block, l.module) for l in self.target_layers(model)]

    def adapter_param_count(self, model) -> int:
        """``Σ_layers r (d_in + d_out)`` (r: LoRA rank or bottleneck width) minus the masked heads' slices, which
        get no gradient once masked (they are still stored, as zeros)."""
        cfg: HEATConfig = self.config
        width = cfg.rank if cfg.base == "lora" else cfg.adapter_dim
        total = sum(width * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))
        return total - self.masked_adapter_params(model)

    def masked_adapter_params(self, model) -> int:
        """Entries of the adapter tensors that belong to masked heads (0 before masking)."""
        masked = 0
        for _, layer in self._masked_layers(model):
            n_masked = int((layer.heat_mask.heads == 0).sum())
            heads = layer.heat_mask.num_heads  # a grouped key/value projection has fewer heads than the queries
            masked += sum(p.numel() // heads * n_masked for p, _ in layer.head_sliced_parameters())
        return masked

    def trainable_param_count(self, model) -> int:
        return super().trainable_param_count(model) - self.masked_adapter_params(model)

    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        if self.config.bits is None:
            return super().adapter_state_dict(model)
        return packed_adapter_state_dict(self, model)

    def load_adapter_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(model, state)
        if self.config.bits is not None:
            unpack_into_latents(model)

    def stored_size(self, model):
        return super().stored_size(model) if self.config.bits is None else quantized_stored_size(self, model)

    # -- calibration and masking -----------------------------------------------------------------
    def head_importance(self, model, batches, loss_fn) -> torch.Tensor:
        """The (blocks × heads) Taylor importance of the configured strategy."""
        strategy = self.config.strategy
        if strategy == "weight":
            return weight_importance(model, self.blocks, self.num_heads, batches, loss_fn)
        if strategy == "gate":
            return gate_importance(model, self.blocks, self.num_heads, batches, loss_fn)
        return adapter_importance(model, self._masked_layers(model), self.blocks, self.num_heads, batches, loss_fn)

    @torch.no_grad()
    def set_head_mask(self, model, head_mask: torch.Tensor) -> None:
        """Install a (blocks × heads) 0/1 mask into the layers and zero the masked adapter slices."""
        head_mask = head_mask.float().cpu()
        if tuple(head_mask.shape) != (len(self.blocks), self.num_heads):
            raise ValueError(f"HEAT head mask of shape {tuple(head_mask.shape)} does not fit "
                             f"{len(self.blocks)} blocks × {self.num_heads} heads")  # fmt: skip
        self.head_mask = head_mask
        row = {b: i for i, b in enumerate(self.blocks)}
        for block, layer in self._masked_layers(model):
            layer.heat_mask.heads.copy_(group_mask(head_mask[row[block]], layer.heat_mask.num_heads))
            keep = layer.heat_mask.features()
            for p, axis in layer.head_sliced_parameters():
                p.mul_(keep[:, None] if axis == 0 else keep[None, :])

    def calibrate(self, ctx: TrainContext) -> None:
        cfg: HEATConfig = self.config
        batches = islice(ctx.batches(), cfg.calibration_batches)
        self.scores = self.head_importance(ctx.model, batches, ctx.loss_fn)
        self.calibrated_at_step = ctx.step
        self.set_head_mask(ctx.model, head_mask_from_scores(self.scores, cfg.mask_ratio, cfg.mask_scope))
        if ctx.log is not None:
            masked = ", ".join(f"block {b} head {h}" for b, h in self.masked_heads()) or "none"
            ctx.log(f"HEAT ({cfg.strategy}) at step {ctx.step}: masked {masked}")

    def masked_heads(self) -> list[tuple[int, int]]:
        if self.head_mask is None:
            return []
        return [(self.blocks[i], int(h)) for i, h in (self.head_mask == 0).nonzero().tolist()]

    def adapter_warmup_steps(self, total_steps: int) -> int:
        return max(1, round(self.config.adapter_warmup_ratio * total_steps))

    def on_train_start(self, ctx: TrainContext) -> bool:
        if self.config.strategy == "adapter":
            return False
        self.calibrate(ctx)
        return True

    def on_step_end(self, ctx: TrainContext) -> bool:
        if self.config.strategy != "adapter" or self.scores is not None:
            return False
        if ctx.step < self.adapter_warmup_steps(ctx.total_steps):
            return False
        self.calibrate(ctx)
        return True

    # -- state and analysis ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "num_heads": self.num_heads,
            "scores": None if self.scores is None else self.scores.tolist(),
            "head_mask": None if self.head_mask is None else self.head_mask.tolist(),
            "calibrated_at_step": self.calibrated_at_step,
        }

    def load_state(self, model, state: dict[str, Any]) -> None:
        if state.get("blocks") is not None and (state["blocks"] != self.blocks or state["num_heads"] != self.num_heads):
            raise ValueError(f"HEAT state for blocks {state['blocks']} × {state['num_heads']} heads does not fit "
                             f"this model's {self.blocks} × {self.num_heads}")  # fmt: skip
        self.scores = None if state.get("scores") is None else torch.tensor(state["scores"])
        self.calibrated_at_step = state.get("calibrated_at_step")
        if state.get("head_mask") is not None:
            self.set_head_mask(model, torch.tensor(state["head_mask"]))

    def artifacts(self, model) -> dict[str, Any]:
        """The blocks × heads score matrix (a heatmap), the strategy and the mask."""
        if self.scores is None:
            return {}
        assert self.head_mask is not None  # installed together with the scores (calibrate, load_state)
        masked_params = self.masked_adapter_params(model)
        return {
            "strategy": self.config.strategy,
            "blocks": self.blocks,
            "num_heads": self.num_heads,
            "scores": self.scores.tolist(),
            "head_mask": self.head_mask.tolist(),
            "masked_heads": [list(bh) for bh in self.masked_heads()],
            "mask_ratio": self.config.mask_ratio,
            "calibrated_at_step": self.calibrated_at_step,
            "masked_adapter_params": masked_params,
        }
