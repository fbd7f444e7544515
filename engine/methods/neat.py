"""NEAT: nonlinear adaptation of the frozen weight (Zhong et al., arXiv 2410.01870; "PEANuT" in later versions).

A small bias-free network maps each column ``w_j`` of ``W0 ∈ R^{d_out×d_in}`` (the ``d_out``-vector leaving
input feature ``j``) to its update (the paper's eq. for ``ΔW = f_θ(W0)``)::

    h_j = σ(A w_j)                              A ∈ R^{r×d_out}
    deeper variant (depth k): for i = 1..k:      skip_i = h_j;  h_j = σ(E_i h_j)          E_i ∈ R^{r×r}
                              for i = 1..k:      h_j = σ(D_i h_j) + skip_{k+1-i}          D_i ∈ R^{r×r}
    Δw_j = s · B h_j                            B ∈ R^{d_out×r}, no activation after B

so ``ΔW = s · B σ(A W0)`` for ``k = 0``. The layer computes ``y = (W0 + ΔW) x + b0``: ΔW is built once per
forward (its cost does not grow with the number of tokens) and folded into one matmul. Parameters per module
``2·r·d_out + 2k·r²``, independent of ``d_in``. Mergeable, since ΔW depends only on ``W0`` and θ.

Initialisation as in the paper and Hugging Face PEFT's PEANuT: A, E_i, D_i with ``nn.Linear``'s default
(Kaiming-uniform, a = √5), B zero, so training starts from the pretrained model. Parameter names
(``neat_A``, ``neat_B``, ``neat_encoders.i``, ``neat_decoders.i``) mirror PEFT's ``peanut_*``; with the same
rank, depth, activation and scaling the forward equals PEFT's ``PeanutModel`` (tested to 1e-5). Differences
from PEFT: ``σ`` is chosen from a short list of activations (PEFT accepts any ``ACT2FN`` key), and our default
``rank`` is 8 (PEFT: 32) after the paper's ranks 1-8 on RoBERTa and ≈ 7 on ViT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from engine.methods.base import AdaptedLinear, Method, TargetedConfig, register_method

# Element-wise activations by name; each equals ``transformers.activations.ACT2FN[name]``.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
}


class NEATConfig(TargetedConfig):
    rank: int = Field(8, ge=1, le=4096, description="r, the hidden width of the weight-to-update network")
    scaling: float = Field(
        1.0, gt=0, description="s, multiplies ΔW (paper: 1 on ViT, 0.01-0.1 on RoBERTa); not divided by r"
    )
    depth: int = Field(
        0, ge=0, le=16, description="k: r×r encoder and decoder layers with U-Net skips (0: ΔW = s·B σ(A W0))"
    )
    activation: Literal["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"] = Field(
        "relu", description="σ, the nonlinearity after A and after every r×r layer (paper: ReLU)"
    )


class NEATLinear(AdaptedLinear):
    """A frozen linear layer whose update ``ΔW = f_θ(W0)`` is a small network applied to the columns of W0."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, depth: int, activation: str):
        super().__init__(base)
        w = base.weight
        d_out = base.out_features
        # nn.Linear's own init is the paper's (and PEFT's) Kaiming-uniform with a = √5.
        self.neat_A = nn.Linear(d_out, rank, bias=False, device=w.device, dtype=w.dtype)
        self.neat_encoders = nn.ModuleList(
            nn.Linear(rank, rank, bias=False, device=w.device, dtype=w.dtype) for _ in range(depth)
        )
        self.neat_decoders = nn.ModuleList(
            nn.Linear(rank, rank, bias=False, device=w.device, dtype=w.dtype) for _ in range(depth)
        )
        self.neat_B = nn.Linear(rank, d_out, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.neat_B.weight)
        self.scaling = scaling
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]

    def delta_weight(self) -> torch.Tensor:
        # Rows of W0ᵀ are the columns w_j of W0, so each nn.Linear below acts on every column at once.
        h = self.activation(self.neat_A(self.base.weight.t()))  # (d_in, r)
        skips = []
        for encoder in self.neat_encoders:
            skips.append(h)
            h = self.activation(encoder(h))
        for decoder, skip in zip(self.neat_decoders, reversed(skips), strict=True):
            h = self.activation(decoder(h)) + skip
        return self.scaling * self.neat_B(h).t()  # (d_out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)


@register_method
class NEAT(Method):
    """Nonlinear weight-to-update adaptation; see the module docstring for the maths and our choices."""

    name = "neat"
    config_cls = NEATConfig
    config: NEATConfig
    prefix = "neat_"
    mergeable = True
    summary = "Nonlinear update ΔW = s·B σ(A W0) computed from the frozen weight (optionally deeper, U-Net skips)"
    paper = "Zhong et al. 2024, NEAT/PEANuT: Nonlinear Parameter-efficient Adaptation (arXiv 2410.01870)"
    test_params = {"rank": 3, "depth": 1, "scaling": 0.5, "target_roles": ["q", "v", "fc2"]}

    def make_layer(self, base, layer, model):
        cfg: NEATConfig = self.config
        return NEATLinear(base, cfg.rank, cfg.scaling, cfg.depth, cfg.activation)

    def default_export_rank(self) -> int:
        """ΔW has no fixed rank (σ is nonlinear); the hidden width is the natural first guess for an SVD."""
        return self.config.rank

    def adapter_param_count(self, model) -> int:
        r, k = self.config.rank, self.config.depth
        return sum(2 * r * l.module.out_features + 2 * k * r * r for l in self.target_layers(model))
