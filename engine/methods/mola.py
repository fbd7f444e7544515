"""MoLA: a mixture of LoRA experts per layer, more experts in higher layers (Gao et al., arXiv 2402.08562).

Each adapted linear layer holds ``E_l`` LoRA experts and a bias-free router; every token picks its top-k
experts (Shazeer et al. 2017 top-k gating, as the paper)::

    p(x) = softmax(W_r x)                       W_r ∈ R^{E_l×d_in}, no bias
    T(x) = the k largest entries of p(x);  w_j = p_j(x) / Σ_{i∈T(x)} p_i(x)   (renormalised over the top k)
    y = W0 x + b0 + Σ_{j∈T(x)} w_j (α/r) B_j A_j x        A_j ∈ R^{r×d_in}, B_j ∈ R^{d_out×r}

The expert count depends on depth: ``experts_per_group`` splits the blocks into as many equal groups as it has
entries (the paper's 2,4,6,8 over four quarters of a 32-layer model is "2,4,6,8"; its uniform, inverted and
hourglass variants are e.g. "5,5,5,5", "8,6,4,2", "8,2,2,8"). Block ``b`` of ``L`` is in group
``⌊b·G/L⌋``; with fewer blocks than groups some groups are simply unused (a 2-block model with "2,4,6,8" gets
2 and 6 experts).

Our choices where the paper is silent or leaves options:

* routing is per token, including padding tokens (the layer does not see the attention mask);
* ``k`` is capped at ``E_l`` in layers with fewer experts than ``k``;
* experts as LoRA (A Kaiming-uniform with a = √5, B zero) and the router with ``nn.Linear``'s default init;
* all experts are evaluated and the unselected ones get weight 0 (same output as dispatching tokens, simpler,
  and every expert's tensors receive a gradient tensor, zero when unused);
* optional load-balancing loss (off by default, coefficient 0.001): the Switch Transformer auxiliary loss
  (Fedus et al. 2021, eq. 4) per layer, ``E_l Σ_i f_i P_i`` with ``f_i`` the share of the layer's top-k slots
  routed to expert ``i`` and ``P_i`` the mean router probability, averaged over the adapted layers.

Expert loads (the share of routing slots each expert receives during training) are recorded per layer, in
total and as a short history every ``load_log_every`` steps, for the importance view. Not mergeable: the mixing
weights depend on the input. Parameters per layer ``E_l r (d_in + d_out) + E_l d_in``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from engine.methods.base import AdaptedLinear, Method, TargetedConfig, TrainContext, register_method


def parse_expert_pattern(pattern: str) -> list[int]:
    """``"2,4,6,8"`` -> ``[2, 4, 6, 8]``: experts per depth group, shallowest first."""
    try:
        counts = [int(part) for part in pattern.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"experts_per_group {pattern!r} must be comma-separated integers, e.g. '2,4,6,8'") from None
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"experts_per_group {pattern!r} needs at least one group and ≥ 1 expert per group")
    return counts


def experts_for_block(block: int, num_blocks: int, counts: list[int]) -> int:
    """Experts of block ``block`` (0-based) of ``num_blocks``: groups of equal depth, ``⌊b·G/L⌋``."""
    group = min(len(counts) - 1, block * len(counts) // max(num_blocks, 1))
    return counts[group]


class MoLAConfig(TargetedConfig):
    rank: int = Field(8, ge=1, le=4096, description="r, the rank of each LoRA expert")
    alpha: float = Field(16.0, gt=0, description="α; each expert's update is scaled by α/r")
    experts_per_group: str = Field(
        "2,4,6,8",
        description="experts per layer group, shallow to deep, blocks split into equal groups (paper: 2,4,6,8)",
    )
    top_k: int = Field(2, ge=1, le=64, description="experts each token is routed to (capped at the layer's count)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the experts' input")
    load_balancing: bool = Field(False, description="add the Switch-Transformer load-balancing loss")
    load_balancing_coef: float = Field(0.001, ge=0.0, description="coefficient of the load-balancing loss")
    load_log_every: int = Field(10, ge=1, description="record a snapshot of the expert loads every N steps")
    max_load_history: int = Field(
        100, ge=2, description="snapshots kept; when full, every second one is dropped (the history thins out)"
    )

    @field_validator("experts_per_group")
    @classmethod
    def _pattern_valid(cls, v: str) -> str:
        parse_expert_pattern(v)
        return v

    def scaling(self) -> float:
        return self.alpha / self.rank


class MoLALinear(AdaptedLinear):
    """A frozen linear layer plus ``E`` LoRA experts mixed per token by a top-k router."""

    linear_in_x = False
    routed_total: torch.Tensor  # buffers registered in __init__
    routed_window: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        scaling: float,
        top_k: int,
        dropout: float = 0.0,
        load_balancing: bool = False,
    ):
        super().__init__(base)
        w = base.weight
        d_in, d_out = base.in_features, base.out_features
        self.num_experts = num_experts
        self.top_k = min(top_k, num_experts)
        self.scaling = scaling
        self.load_balancing = load_balancing
        self.mola_router = nn.Linear(d_in, num_experts, bias=False, device=w.device, dtype=w.dtype)
        self.mola_A = nn.Parameter(torch.empty(num_experts, rank, d_in, device=w.device, dtype=w.dtype))
        self.mola_B = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=w.device, dtype=w.dtype))
        for expert in range(num_experts):  # per expert, so the fan-in is d_in as for one LoRA A
            nn.init.kaiming_uniform_(self.mola_A.data[expert], a=math.sqrt(5))
        self.mola_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Routing-slot counts per expert during training (not saved with the adapter).
        self.register_buffer("routed_total", torch.zeros(num_experts, device=w.device), persistent=False)
        self.register_buffer("routed_window", torch.zeros(num_experts, device=w.device), persistent=False)
        self.balance_loss: torch.Tensor | None = None  # of the last training forward, read by extra_loss

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gates, probs, top indices): gates (..., E) hold the renormalised top-k weights, zero elsewhere."""
        probs = self.mola_router(x).float().softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(dim=-1, keepdim=True))
        return gates, probs, top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, probs, top_i = self.route(x)
        h = torch.einsum("...i,eri->...er", self.mola_dropout(x), self.mola_A.to(x.dtype))
        h = h * gates.to(h.dtype).unsqueeze(-1)
        update = torch.einsum("...er,eor->...o", h, self.mola_B.to(h.dtype))
        if self.training:
            self._record(probs, top_i)
        return self.base(x) + self.scaling * update

    def _record(self, probs: torch.Tensor, top_i: torch.Tensor) -> None:
        slots = torch.bincount(top_i.reshape(-1), minlength=self.num_experts).to(self.routed_total.dtype)
        self.routed_total += slots
        self.routed_window += slots
        if self.load_balancing:
            routed_share = slots / slots.sum()  # f_i, no gradient (as Switch Transformer)
            mean_prob = probs.reshape(-1, self.num_experts).mean(dim=0)  # P_i, carries the router's gradient
            self.balance_loss = self.num_experts * (routed_share * mean_prob).sum()

    @staticmethod
    def shares(counts: torch.Tensor) -> list[float]:
        total = float(counts.sum())
        return [float(c) / total if total > 0 else 0.0 for c in counts.tolist()]


@register_method
class MoLA(Method):
    """Top-k mixture of LoRA experts with depth-dependent expert counts; see the module docstring."""

    name = "mola"
    config_cls = MoLAConfig
    config: MoLAConfig
    prefix = "mola_"
    mergeable = False
    summary = "Per-token top-k mixture of LoRA experts, more experts in deeper layers (e.g. 2-4-6-8)"
    paper = "Gao et al. 2024, Higher Layers Need More LoRA Experts (arXiv 2402.08562)"
    test_params = {"rank": 2, "experts_per_group": "2,3", "top_k": 2, "target_roles": ["q", "v", "fc2"]}

    def __init__(self, config=None):
        super().__init__(config)
        self.load_history: list[dict[str, Any]] = []
        self._layers: dict[str, MoLALinear] = {}  # the injected layers, so state() can read their counts

    def _num_blocks(self, model) -> int:
        return model.info.num_layers or (1 + max(l.block for l in model.adaptable_layers()))

    def experts_per_layer(self, model) -> dict[str, int]:
        counts = parse_expert_pattern(self.config.experts_per_group)
        num_blocks = self._num_blocks(model)
        return {l.name: experts_for_block(l.block, num_blocks, counts) for l in self.target_layers(model)}

    def make_layer(self, base, layer, model):
        cfg: MoLAConfig = self.config
        experts = experts_for_block(layer.block, self._num_blocks(model), parse_expert_pattern(cfg.experts_per_group))
        return MoLALinear(base, experts, cfg.rank, cfg.scaling(), cfg.top_k, cfg.dropout, cfg.load_balancing)

    def inject(self, model) -> None:
        super().inject(model)
        self._layers = {n: l for n, l in self.adapted_layers(model).items() if isinstance(l, MoLALinear)}

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        experts = self.experts_per_layer(model)
        return sum(
            experts[l.name] * (r * (l.module.in_features + l.module.out_features) + l.module.in_features)
            for l in self.target_layers(model)
        )

    # -- training hooks --------------------------------------------------------------------------
    def extra_loss(self, model) -> torch.Tensor | None:
        if not self.config.load_balancing:
            return None
        losses = []
        for layer in self.adapted_layers(model).values():
            if isinstance(layer, MoLALinear) and layer.balance_loss is not None:
                losses.append(layer.balance_loss)
                layer.balance_loss = None  # each forward's loss is used once
        if not losses:
            return None
        return self.config.load_balancing_coef * torch.stack(losses).mean()

    def on_step_end(self, ctx: TrainContext) -> bool:
        if ctx.step % self.config.load_log_every == 0 or ctx.step == ctx.total_steps:
            self._snapshot(ctx.model, ctx.step)
        return False

    def _snapshot(self, model, step: int) -> None:
        if self.load_history and self.load_history[-1]["step"] == step:
            return  # already recorded (the last step can also be a multiple of load_log_every)
        loads = {}
        for name, layer in self.adapted_layers(model).items():
            if isinstance(layer, MoLALinear):
                loads[name] = MoLALinear.shares(layer.routed_window)
                layer.routed_window.zero_()
        self.load_history.append({"step": step, "loads": loads})
        if len(self.load_history) > self.config.max_load_history:
            self.load_history = self.load_history[::2]

    # -- analyses and state ----------------------------------------------------------------------
    def expert_loads(self, model) -> dict[str, list[float]]:
        """Share of the training routing slots each expert received, per layer (sums to 1 once trained)."""
        return {
            name: MoLALinear.shares(layer.routed_total)
            for name, layer in self.adapted_layers(model).items()
            if isinstance(layer, MoLALinear)
        }

    def artifacts(self, model) -> dict[str, Any]:
        layers = {n: l for n, l in self.adapted_layers(model).items() if isinstance(l, MoLALinear)}
        return {
            "top_k": self.config.top_k,
            "experts_per_layer": {n: l.num_experts for n, l in layers.items()},
            "routed_slots": {n: int(l.routed_total.sum()) for n, l in layers.items()},
            "expert_loads": self.expert_loads(model),
            "load_history": self.load_history,
        }

    def state(self) -> dict[str, Any]:
        # Not structural, but kept so a resumed run's load statistics continue where they stopped.
        return {
            "load_history": self.load_history,
            "routed_total": {n: l.routed_total.tolist() for n, l in self._layers.items()},
        }

    def load_state(self, model, state: dict[str, Any]) -> None:
        self.load_history = list(state.get("load_history", []))
        layers = self.adapted_layers(model)
        for name, counts in state.get("routed_total", {}).items():
            layer = layers.get(name)
            if isinstance(layer, MoLALinear) and len(counts) == layer.num_experts:
                layer.routed_total.copy_(torch.tensor(counts))
