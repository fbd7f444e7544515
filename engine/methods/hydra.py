"""Hydra: a parallel and a sequential low-rank branch on one layer (Kim et al., arXiv 2309.06922).

The paper's layer output is the sum of the frozen layer, a parallel branch on the input (LoRA) and a sequential
branch on the frozen layer's output (an adapter that sees ``W0 x``)::

    y = W0 x + b0 + s · B_p A_p x + s · B_s A_s (W0 x + b0)

    A_p ∈ R^{r_p×d_in}, B_p ∈ R^{d_out×r_p}        (parallel branch)
    A_s ∈ R^{r_s×d_out}, B_s ∈ R^{d_out×r_s}       (sequential branch: a d_out → d_out map)

Our choice where the paper's equation is silent: the sequential branch sees the frozen layer's full output
``W0 x + b0``, bias included (the layer's output is what a sequential adapter placed after it receives). This
is the reading that makes the merge formula of the paper's reparameterisation exact::

    W' = W0 + s (B_p A_p + B_s A_s W0),      b' = b0 + s B_s A_s b0

so ``delta_weight()`` is ``s (B_p A_p + B_s A_s W0)`` and ``delta_bias()`` is ``s B_s A_s b0`` (None when the
layer has no bias). The public code's merge is not used: everything here follows the equation.

The branches follow the official layer (``extremebird/Hydra``, ``vtab1k/hydra.py``) by default: each projection
has a bias (``B (A z + a) + b``), the down-projection A is Xavier-uniform, the up-projection B and both biases
start at zero (so training starts from the pretrained model), and dropout sits between the two projections.
With the biases the merge keeps the same weight and collects every constant into the bias::

    b' = b0 + s (B_p a_p + b_p + B_s A_s b0 + B_s a_s + b_s)

``bias = False``, ``init = "kaiming"`` and ``dropout_at = "input"`` give the bias-free LoRA-style branches
(A Kaiming-uniform with a = √5, dropout on each branch's input). ``s`` is a plain multiplier (not divided by the
rank). Paper settings: the output projections (ViT ``attn.proj`` and ``mlp.fc2``, BERT/RoBERTa output dense),
rank 2 per branch on ViT, 4 (parallel) and 8 (sequential) on RoBERTa. Parameters per layer
``r_p (d_in + d_out) + 2 r_s d_out``, plus ``r_p + r_s + 2 d_out`` with biases. Mergeable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from engine.methods.base import AdaptedLinear, Method, TargetedConfig, register_method


class HydraConfig(TargetedConfig):
    target_roles: list[str] = Field(
        ["o", "fc2"], description="layer roles to adapt (paper: the output projections, attention output and fc2)"
    )
    parallel_rank: int = Field(2, ge=1, le=4096, description="r_p, rank of the parallel branch B_p A_p x (ViT: 2)")
    sequential_rank: int = Field(
        2, ge=1, le=4096, description="r_s, rank of the sequential branch B_s A_s (W0 x + b0) (ViT: 2)"
    )
    scaling: float = Field(1.0, gt=0, description="s, multiplies both branches; not divided by the rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in each branch (see dropout_at)")
    dropout_at: Literal["hidden", "input"] = Field(
        "hidden", description="dropout between the projections (official code) or on each branch's input"
    )
    bias: bool = Field(True, description="biases on both projections of each branch (official code: yes)")
    init: Literal["xavier", "kaiming"] = Field(
        "xavier", description="down-projection init: Xavier-uniform (official code) or Kaiming-uniform a=√5 (LoRA)"
    )


class HydraLinear(AdaptedLinear):
    """A frozen linear layer with a parallel (input-side) and a sequential (output-side) low-rank branch."""

    def __init__(self, base: nn.Linear, parallel_rank: int, sequential_rank: int, scaling: float, dropout: float,
                 dropout_at: str = "hidden", bias: bool = True, init: str = "xavier"):  # fmt: skip
        super().__init__(base)
        w = base.weight
        d_in, d_out = base.in_features, base.out_features

        def linear(n_in: int, n_out: int) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=bias, device=w.device, dtype=w.dtype)

        self.hydra_parallel_A = linear(d_in, parallel_rank)
        self.hydra_parallel_B = linear(parallel_rank, d_out)
        self.hydra_sequential_A = linear(d_out, sequential_rank)
        self.hydra_sequential_B = linear(sequential_rank, d_out)
        for down, up in (
            (self.hydra_parallel_A, self.hydra_parallel_B),
            (self.hydra_sequential_A, self.hydra_sequential_B),
        ):
            if init == "xavier":
                nn.init.xavier_uniform_(down.weight)
            else:
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            if bias:
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.bias)
        self.scaling = scaling
        self.dropout_at = dropout_at
        self.hydra_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def branch(self, down: nn.Linear, up: nn.Linear, z: torch.Tensor) -> torch.Tensor:
        if self.dropout_at == "input":
            return up(down(self.hydra_dropout(z)))
        return up(self.hydra_dropout(down(z)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.base(x)  # W0 x + b0: the input of the sequential branch
        parallel = self.branch(self.hydra_parallel_A, self.hydra_parallel_B, x)
        sequential = self.branch(self.hydra_sequential_A, self.hydra_sequential_B, frozen)
        return frozen + self.scaling * (parallel + sequential)

    def sequential_map(self) -> torch.Tensor:
        """``B_s A_s`` (d_out × d_out), the unscaled map the sequential branch applies to ``W0 x + b0``."""
        return self.hydra_sequential_B.weight @ self.hydra_sequential_A.weight

    def delta_weight(self) -> torch.Tensor:
        parallel = self.hydra_parallel_B.weight @ self.hydra_parallel_A.weight
        return self.scaling * (parallel + self.sequential_map() @ self.base.weight)

    def delta_bias(self) -> torch.Tensor | None:
        """``s (B_p a_p + b_p + B_s A_s b0 + B_s a_s + b_s)``, the terms that exist (None when none does)."""
        terms = []
        if self.base.bias is not None:
            terms.append(self.sequential_map() @ self.base.bias)
        for down, up in (
            (self.hydra_parallel_A, self.hydra_parallel_B),
            (self.hydra_sequential_A, self.hydra_sequential_B),
        ):
            if down.bias is not None:
                terms.append(up.weight @ down.bias + up.bias)
        return self.scaling * sum(terms[1:], terms[0]) if terms else None


@register_method
class Hydra(Method):
    """Parallel plus sequential low-rank branches; see the module docstring for the maths and our choices."""

    name = "hydra"
    config_cls = HydraConfig
    config: HydraConfig
    prefix = "hydra_"
    mergeable = True
    summary = "Parallel LoRA branch on the input plus a sequential low-rank branch on the frozen output"
    paper = (
        "Kim et al. 2023, Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning (arXiv 2309.06922)"
    )
    test_params = {"parallel_rank": 2, "sequential_rank": 3, "scaling": 0.5, "target_roles": ["q", "o", "fc2"]}

    def make_layer(self, base, layer, model):
        cfg: HydraConfig = self.config
        return HydraLinear(base, cfg.parallel_rank, cfg.sequential_rank, cfg.scaling, cfg.dropout, cfg.dropout_at,
                           cfg.bias, cfg.init)  # fmt: skip

    def adapter_param_count(self, model) -> int:
        """``r_p (d_in + d_out) + 2 r_s d_out`` per layer, plus ``r_p + r_s + 2 d_out`` biases (official layer)."""
        r_p, r_s, bias = self.config.parallel_rank, self.config.sequential_rank, self.config.bias
        return sum(
            r_p * (l.module.in_features + l.module.out_features) + 2 * r_s * l.module.out_features
            + (r_p + r_s + 2 * l.module.out_features if bias else 0)
            for l in self.target_layers(model)
        )  # fmt: skip
