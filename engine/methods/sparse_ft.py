"""LT-SFT: lottery-ticket sparse fine-tuning (Ansell, Ponti, Korhonen & Vulić 2022, "Composable Sparse
Fine-Tuning for Cross-Lingual Transfer", ACL, arXiv 2110.07560, §3.1; docs/METHODS.md#lt-sft).

Two phases inside the one training loop:

1. **Dense phase** (the first ``dense_fraction`` of the steps): every weight of the targeted linear layers trains,
   as a dense update ``ΔW`` (``sft_delta``, zero at init): ``y = (W0 + ΔW) x + b0``.
2. **Selection and reset** (``on_step_end`` at the end of that phase): the K entries with the largest ``|ΔW|`` —
   the weights that changed most, ranked over all targeted layers (``scope = "global"``, the paper's) or with
   the same share in each layer — form the mask; all weights go back to their pretrained values (ΔW = 0).
3. **Sparse phase**: only those K entries train. Each layer keeps ``sft_indices`` (flat positions in ``W0``,
   int32) and ``sft_values`` (the K_l trainable values): ``ΔW = scatter(indices, values)``, so every other entry
   is exactly zero and gets no gradient.

The update is exactly mergeable (``W0 + ΔW``), and stored as indices + values (``4 + 4`` bytes per entry). Its
ΔW is sparse and in general full-rank: the spectra analysis takes the dense ``delta_weight()``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from engine.methods.base import AdaptedLinear, Method, StoredSize, TargetedConfig, TrainContext, register_method


class SparseFTConfig(TargetedConfig):
    target_roles: list[str] = Field(
        ["q", "k", "v", "o", "fc1", "fc2"], description="layer roles whose weights may be selected"
    )
    num_params: int | None = Field(
        None, ge=1, description="K, the number of weights trained in the sparse phase (None: density × targeted)"
    )
    density: float = Field(
        0.01, gt=0.0, le=1.0, description="K as a share of the targeted weights (without num_params)"
    )
    dense_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="share of the training steps spent in the dense phase before selection"
    )
    scope: Literal["global", "per_layer"] = Field(
        "global", description="rank |ΔW| over all targeted layers (paper) or keep the same share in each layer"
    )


class SparseFTLinear(AdaptedLinear):
    """``(W0 + ΔW) x + b0`` with ΔW dense (``sft_delta``) before selection, ``scatter(indices, values)`` after."""

    sft_indices: torch.Tensor | None

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        w = base.weight
        self.sft_delta: nn.Parameter | None = nn.Parameter(torch.zeros_like(w))
        self.sft_values: nn.Parameter | None
        self.register_parameter("sft_values", None)
        self.register_buffer("sft_indices", None)

    @property
    def sparse(self) -> bool:
        return self.sft_values is not None

    def make_sparse(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Switch to the sparse phase with these flat positions (values: zero, i.e. reset to W0, unless given)."""
        w = self.base.weight
        indices = indices.to(device=w.device, dtype=torch.int32).sort().values
        self.sft_delta = None
        self.sft_indices = indices
        init = torch.zeros(indices.numel(), device=w.device, dtype=w.dtype) if values is None else values
        self.sft_values = nn.Parameter(init.to(device=w.device, dtype=w.dtype))

    def delta_weight(self) -> torch.Tensor:
        if self.sft_delta is not None:
            return self.sft_delta
        assert self.sft_values is not None and self.sft_indices is not None
        flat = torch.zeros(self.base.weight.numel(), device=self.sft_values.device, dtype=self.sft_values.dtype)
        return flat.index_add(0, self.sft_indices.long(), self.sft_values).view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)


def select_top_k(deltas: dict[str, torch.Tensor], k: int, scope: str) -> dict[str, torch.Tensor]:
    """Flat positions of the ``k`` largest ``|ΔW|`` entries: over all layers (``global``) or ``round(k · n_l / n)``
    per layer (``per_layer``). Ties go to the earlier layer and position (a stable sort)."""
    names = list(deltas)
    if scope == "per_layer":
        total = sum(d.numel() for d in deltas.values())
        out = {}
        for name in names:
            k_l = max(1, round(k * deltas[name].numel() / total))
            order = torch.argsort(deltas[name].detach().abs().flatten(), descending=True, stable=True)
            out[name] = order[:k_l]
        return out
    flat = torch.cat([deltas[n].detach().abs().flatten() for n in names])
    chosen = torch.argsort(flat, descending=True, stable=True)[:k]
    out, start = {}, 0
    for name in names:
        n = deltas[name].numel()
        mine = chosen[(chosen >= start) & (chosen < start + n)]
        out[name] = mine - start
        start += n
    return out


@register_method
class SparseFT(Method):
    """LT-SFT (arXiv 2110.07560): a short dense fine-tuning phase picks the K weights that changed most; the model
    is reset to its pretrained weights and only those K train. Mergeable; stored as indices + values."""

    name = "lt_sft"
    config_cls = SparseFTConfig
    config: SparseFTConfig
    prefix = "sft_"
    mergeable = True
    summary = "Sparse fine-tuning: train only the K weights that changed most in a short dense phase (LT-SFT)"
    paper = (
        "Ansell, Ponti, Korhonen & Vulić 2022, Composable Sparse Fine-Tuning for Cross-Lingual Transfer "
        "(arXiv 2110.07560)"
    )
    test_params = {"target_roles": ["q", "v"], "num_params": 40}

    def __init__(self, config: SparseFTConfig | None = None):
        super().__init__(config)
        self.selected_at_step: int | None = None
        self.sizes: dict[str, int] | None = None  # K_l per layer once selected
        self.dense_change: dict[str, float] = {}  # per layer, ‖ΔW‖_F of the dense phase (for the record)

    def make_layer(self, base, layer, model):
        return SparseFTLinear(base)

    def layers(self, model) -> dict[str, SparseFTLinear]:
        return {n: l for n, l in self.adapted_layers(model).items() if isinstance(l, SparseFTLinear)}

    def num_selected(self, model) -> int:
        cfg: SparseFTConfig = self.config
        total = sum(l.base.weight.numel() for l in self.layers(model).values())
        k = cfg.num_params if cfg.num_params is not None else round(cfg.density * total)
        return max(1, min(k, total))

    @torch.no_grad()
    def select(self, model) -> dict[str, int]:
        """Pick the K entries that changed most, reset ΔW to zero and switch every layer to the sparse phase."""
        layers = self.layers(model)
        deltas = {n: l.delta_weight() for n, l in layers.items()}
        self.dense_change = {n: float(d.norm()) for n, d in deltas.items()}
        chosen = select_top_k(deltas, self.num_selected(model), self.config.scope)
        for name, layer in layers.items():
            layer.make_sparse(chosen[name])
        self.sizes = {n: int(c.numel()) for n, c in chosen.items()}
        return self.sizes

    def dense_steps(self, total_steps: int) -> int:
        return max(1, round(self.config.dense_fraction * total_steps))

    def on_step_end(self, ctx: TrainContext) -> bool:
        if self.selected_at_step is not None or ctx.step < self.dense_steps(ctx.total_steps):
            return False
        counts = self.select(ctx.model)
        self.selected_at_step = ctx.step
        if ctx.log is not None:
            ctx.log(f"LT-SFT at step {ctx.step}: kept {sum(counts.values()):,} weights, reset to the pretrained model")
        return True

    def adapter_param_count(self, model) -> int:
        """Dense phase: ``Σ d_out d_in`` over the targeted layers; sparse phase: K (``Σ_l K_l``)."""
        return sum(
            l.sft_values.numel() if l.sft_values is not None else l.base.weight.numel()
            for l in self.layers(model).values()
        )

    def stored_size(self, model) -> StoredSize:
        """Sparse phase: K values (float32) and K int32 indices; dense phase: the dense update."""
        size = super().stored_size(model)
        indices = sum(l.sft_indices.numel() for l in self.layers(model).values() if l.sft_indices is not None)
        return StoredSize(params=size.params - indices, bytes=size.bytes)

    def state(self) -> dict[str, Any]:
        return {"selected_at_step": self.selected_at_step, "sizes": self.sizes}

    def load_state(self, model, state: dict[str, Any]) -> None:
        """Rebuild the sparse layers at their stored sizes (their indices and values come with the tensors)."""
        self.selected_at_step = state.get("selected_at_step")
        sizes = state.get("sizes")
        if not sizes:
            return
        layers = self.layers(model)
        unknown = set(sizes) - set(layers)
        if unknown:
            raise ValueError(f"LT-SFT state names layers this model does not adapt: {sorted(unknown)[:3]}")
        self.sizes = {name: int(sizes.get(name, 0)) for name in layers}
        for name, layer in layers.items():
            layer.make_sparse(torch.zeros(self.sizes[name], dtype=torch.int32))

    def artifacts(self, model) -> dict[str, Any]:
        if self.selected_at_step is None:
            return {}
        layers = self.layers(model)
        return {
            "selected_at_step": self.selected_at_step,
            "kept_per_layer": {n: int(l.sft_values.numel()) for n, l in layers.items() if l.sft_values is not None},
            "density_per_layer": {
                n: l.sft_values.numel() / l.base.weight.numel() for n, l in layers.items() if l.sft_values is not None
            },
            "dense_phase_change": self.dense_change,
        }
