"""LoRA (Hu et al., 2021, arXiv 2106.09685, eq. 3) with the rsLoRA scaling (Kalajdzievski, 2023).

``h = W0 x + s · B A dropout(x)``, ``A ∈ R^{r×d_in}`` Kaiming-uniform (a = √5, as nn.Linear and PEFT),
``B ∈ R^{d_out×r}`` zero, ``s = α/r`` (rsLoRA: ``α/√r``). Parameters ``r(d_in + d_out)`` per layer.
Mergeable: ``W = W0 + s B A``. Parameter names (``lora_A.weight``, ``lora_B.weight``) follow PEFT.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from engine.methods.base import AdaptedLinear, Method, TargetedConfig, register_method


class LoRAConfig(TargetedConfig):
    rank: int = Field(8, ge=1, le=4096, description="r, the rank of ΔW")
    alpha: float = Field(16.0, gt=0, description="α; the update is scaled by α/r (α/√r with rsLoRA)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    use_rslora: bool = Field(False, description="rank-stabilised scaling α/√r")

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ΔW = B @ A (scaling folded into B): lets analyses avoid a dense SVD."""
        return self.scaling * self.lora_B.weight, self.lora_A.weight


@register_method
class LoRA(Method):
    name = "lora"
    config_cls = LoRAConfig
    config: LoRAConfig
    prefix = "lora_"
    mergeable = True
    summary = "Low-rank update ΔW = (α/r)·B A on the chosen layers"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685)"

    def make_layer(self, base, layer, model):
        cfg: LoRAConfig = self.config
        return LoRALinear(base, cfg.rank, cfg.scaling(), cfg.dropout)

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        return sum(r * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))
