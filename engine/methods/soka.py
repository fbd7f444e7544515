"""SoKA: SVD on Kronecker adaptation (Chong & Qu, arXiv 2506.15251).

The update is a sum of Kronecker products, initialised by the Kronecker-product SVD (KPSVD) of the frozen
weight and kept at a rank chosen from the spectrum::

    ΔW = Σ_{k=1..r} U_k ⊗ V_k,      U_k ∈ R^{m1×n1}, V_k ∈ R^{m2×n2},  d_out = m1·m2,  d_in = n1·n2

KPSVD (Van Loan & Pitsianis 1993): the rearrangement ``R`` maps the (i1, j1) block ``W[i1·m2:(i1+1)·m2,
j1·n2:(j1+1)·n2]`` of ``W`` to row ``i1·n1 + j1`` of ``R(W) ∈ R^{m1n1×m2n2}`` (the block flattened row-major).
It is linear and norm-preserving, and ``R(U ⊗ V) = vec(U) vec(V)ᵀ``, so the best sum of ``r`` Kronecker products
in Frobenius norm is read off the truncated SVD ``R(W) ≈ Σ σ_k u_k v_kᵀ`` (Eckart–Young), with the error
``‖W − Σ_{k≤r} U_k ⊗ V_k‖²_F = Σ_{k>r} σ_k²``. We split each σ_k evenly:
``U_k = √σ_k · unvec(u_k)``, ``V_k = √σ_k · unvec(v_k)``.

Our choices, where the paper does not say (all exposed in the config):

* which matrix: ``W0`` itself, PiSSA-style: the adapter starts at the top-r Kronecker components and the frozen
  weight becomes the residual ``W0 − Σ U_k ⊗ V_k``, so the adapted model starts equal to the pretrained one;
* rank: ``energy`` takes the smallest r with ``Σ_{k≤r} σ_k² / Σ_k σ_k² ≥ τ`` (τ = 0.9); ``elbow`` finds the
  point of the spectrum ``(k, σ_k)`` farthest below the chord from its first to its last point and keeps the
  components before it; ``fixed`` keeps ``max_rank``. Every criterion is capped by ``max_rank`` (8) and by the
  number of singular values ``min(m1n1, m2n2)``; the rank is chosen per layer;
* factor shapes: ``sqrt`` takes m1 (n1) as the largest divisor of d_out (d_in) not above its square root, so U_k
  is the smaller factor and ``R(W)`` is close to square; ``sqrt_swapped`` gives U_k the larger factor;
  ``u_rows``/``u_cols`` fix m1/n1 for every layer.

The forward takes the cheaper of two exact routes: the "vec trick" ``(U ⊗ V) x = vec(U X Vᵀ)`` with
``X = unvec(x) ∈ R^{n1×n2}``, at ``r·n1·m2·(n2 + m1)`` multiply-adds per token, which never builds the Kronecker
product, or the dense ``(W_res + Σ U_k ⊗ V_k) x`` when the rank makes the vec trick the dearer one (see
``SoKALinear.uses_dense_path``). Mergeable. Parameters per layer ``r (m1·n1 + m2·n2)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from engine.methods.base import AdaptedLinear, Method, TargetedConfig, register_method

FactorRule = Literal["sqrt", "sqrt_swapped"]
RankCriterion = Literal["energy", "elbow", "fixed"]


# --- Kronecker-product SVD ------------------------------------------------------------------------


def largest_divisor_at_most_sqrt(n: int) -> int:
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def kronecker_factor_shapes(
    d_out: int, d_in: int, rule: FactorRule = "sqrt", u_rows: int = 0, u_cols: int = 0
) -> tuple[int, int, int, int]:
    """``(m1, m2, n1, n2)`` with ``d_out = m1·m2`` and ``d_in = n1·n2``; U_k is m1×n1, V_k is m2×n2.

    ``sqrt``: m1, n1 are the largest divisors of d_out, d_in not above their square roots (``sqrt_swapped``:
    their cofactors). A non-zero ``u_rows``/``u_cols`` fixes m1/n1 and must divide d_out/d_in.
    """
    shapes = []
    for d, fixed, name in ((d_out, u_rows, "u_rows"), (d_in, u_cols, "u_cols")):
        if fixed:
            if d % fixed:
                raise ValueError(f"soka.{name} = {fixed} does not divide the layer dimension {d}")
            first = fixed
        else:
            small = largest_divisor_at_most_sqrt(d)
            first = small if rule == "sqrt" else d // small
        shapes.append((first, d // first))
    (m1, m2), (n1, n2) = shapes
    return m1, m2, n1, n2


def vlp_rearrange(weight: torch.Tensor, m1: int, m2: int, n1: int, n2: int) -> torch.Tensor:
    """Van Loan–Pitsianis ``R(W) ∈ R^{m1n1×m2n2}``: row ``i1·n1 + j1`` is block (i1, j1) of W, row-major."""
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kronecker_sum(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_k U_k ⊗ V_k`` as a dense (m1·m2)×(n1·n2) matrix, for U (r, m1, n1) and V (r, m2, n2)."""
    r, m1, n1 = u.shape
    _, m2, n2 = v.shape
    return torch.einsum("kab,kcd->acbd", u, v).reshape(m1 * m2, n1 * n2)


def kronecker_sum_apply(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(Σ_k U_k ⊗ V_k) x`` for x (..., n1·n2) by the vec trick ``vec(U_k X V_kᵀ)``, never forming U ⊗ V."""
    _, m1, n1 = u.shape
    _, m2, n2 = v.shape
    x = x.reshape(*x.shape[:-1], n1, n2)
    xv = torch.einsum("...bd,kcd->...kbc", x, v)  # X V_kᵀ: (..., r, n1, m2)
    y = torch.einsum("kab,...kbc->...ac", u, xv)  # Σ_k U_k X V_kᵀ: (..., m1, m2)
    return y.reshape(*y.shape[:-2], m1 * m2)


def kronecker_svd(
    weight: torch.Tensor, m1: int, m2: int, n1: int, n2: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All Kronecker components of W: ``(U (K, m1, n1), V (K, m2, n2), σ (K,))`` with W = Σ_k U_k ⊗ V_k.

    Computed in float32 (float64 if W is float64); ``U_k``, ``V_k`` carry ``√σ_k`` each.
    """
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    left, sigma, right_t = torch.linalg.svd(vlp_rearrange(work, m1, m2, n1, n2), full_matrices=False)
    root = sigma.sqrt()
    u = (left * root).t().reshape(-1, m1, n1)
    v = (right_t * root.unsqueeze(1)).reshape(-1, m2, n2)
    return u, v, sigma


def select_rank(sigma: torch.Tensor, criterion: RankCriterion, energy_threshold: float, max_rank: int) -> int:
    """How many Kronecker components to keep, from the singular values σ_1 ≥ σ_2 ≥ ... of ``R(W)``.

    ``energy``: the smallest r with ``Σ_{k≤r} σ_k² / Σ σ² ≥ τ``. ``elbow``: the point ``(k, σ_k)`` farthest below
    the chord from ``(1, σ_1)`` to ``(K, σ_K)`` starts the flat tail; keep the components before it.
    ``fixed``: ``max_rank``. The result lies in ``[1, min(max_rank, K)]``.
    """
    count = sigma.numel()
    sigma = sigma.double()
    if criterion == "fixed":
        rank = max_rank
    elif criterion == "energy":
        energy = sigma.square()
        total = energy.sum()
        if total <= 0:
            return 1
        captured = energy.cumsum(0) / total
        rank = int((captured < energy_threshold - 1e-9).sum()) + 1
    elif criterion == "elbow":
        if count < 3:
            return 1
        position = torch.arange(count, dtype=torch.float64)
        chord = sigma[0] + (sigma[-1] - sigma[0]) * position / (count - 1)
        elbow = int(torch.argmax(chord - sigma))  # 0-based index of the first tail point
        rank = elbow  # the components before the elbow
    else:
        raise ValueError(f"unknown rank criterion {criterion!r}: use energy, elbow or fixed")
    return max(1, min(rank, max_rank, count))


# --- the method -----------------------------------------------------------------------------------


class SoKAConfig(TargetedConfig):
    rank_criterion: RankCriterion = Field(
        "energy", description="how each layer's rank is chosen: energy threshold τ, spectrum elbow, or max_rank"
    )
    energy_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="τ: keep the fewest components holding this share of Σσ² (energy)"
    )
    max_rank: int = Field(8, ge=1, le=4096, description="cap on the number of Kronecker components per layer")
    factor_rule: FactorRule = Field(
        "sqrt",
        description="factor shapes: sqrt (U_k gets the largest divisors ≤ √d_out, √d_in) or sqrt_swapped",
    )
    u_rows: int = Field(0, ge=0, description="m1, rows of every U_k (0: from factor_rule); must divide d_out")
    u_cols: int = Field(0, ge=0, description="n1, columns of every U_k (0: from factor_rule); must divide d_in")


class SoKALinear(AdaptedLinear):
    """``y = (W_res + Σ_k U_k ⊗ V_k) x + b0`` with the frozen residual ``W_res = W0 − Σ_k U_k^0 ⊗ V_k^0``."""

    def __init__(self, base: nn.Linear, shape: tuple[int, int, int, int], rank: int):
        super().__init__(base)
        self.factor_shape = shape
        self._take_components(base.weight.detach().clone(), rank)

    @property
    def rank(self) -> int:
        return self.soka_U.shape[0]

    @torch.no_grad()
    def _take_components(self, weight: torch.Tensor, rank: int) -> None:
        """Adapter := the top ``rank`` KPSVD components of ``weight``; frozen weight := the residual."""
        u, v, _ = kronecker_svd(weight, *self.factor_shape)
        u, v = u[:rank].to(weight.dtype).contiguous(), v[:rank].to(weight.dtype).contiguous()
        self.soka_U = nn.Parameter(u)
        self.soka_V = nn.Parameter(v)
        self.base.weight.copy_(weight - kronecker_sum(u, v))

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        """Re-split ``W_res + ΔW`` at another rank (the adapter restarts from its KPSVD)."""
        trainable = self.soka_U.requires_grad
        self._take_components(self.base.weight + self.delta_weight(), rank)
        self.soka_U.requires_grad_(trainable)
        self.soka_V.requires_grad_(trainable)

    def uses_dense_path(self) -> bool:
        """Whether the forward folds ``Σ U_k ⊗ V_k`` into the weight rather than applying the vec trick.

        The vec trick costs ``r·n1·m2·(n2 + m1)`` multiply-adds per token, forward, and about twice that backward;
        the dense path costs one extra ``d_out·d_in`` product per token (the weight gradient) plus building ΔW once
        per step. Measured on CPU for 384×384, r = 8: dense 2.2× faster. The vec trick wins for small ranks.
        """
        m1, m2, n1, n2 = self.factor_shape
        return 4 * self.rank * n1 * m2 * (n2 + m1) > m1 * m2 * n1 * n2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.soka_U.to(x.dtype), self.soka_V.to(x.dtype)
        if self.uses_dense_path():
            weight = self.base.weight.to(x.dtype) + kronecker_sum(u, v)
            return nn.functional.linear(x, weight, self.base.bias)
        return self.base(x) + kronecker_sum_apply(u, v, x)

    def delta_weight(self) -> torch.Tensor:
        return kronecker_sum(self.soka_U, self.soka_V)


@register_method
class SoKA(Method):
    """Sum-of-Kronecker-products update from the KPSVD of W0; see the module docstring for our choices."""

    name = "soka"
    config_cls = SoKAConfig
    config: SoKAConfig
    prefix = "soka_"
    mergeable = True
    summary = "ΔW = Σ U_k ⊗ V_k initialised by Kronecker-product SVD of W0, rank from the spectrum (PiSSA-style)"
    paper = "Chong & Qu 2025, Singular Value Decomposition on Kronecker Adaptation for LLMs (arXiv 2506.15251)"
    test_params = {"rank_criterion": "energy", "energy_threshold": 0.5, "max_rank": 3, "target_roles": ["q", "fc1"]}

    def __init__(self, config=None):
        super().__init__(config)
        self._layers: dict[str, SoKALinear] = {}

    def layer_plan(self, weight: torch.Tensor) -> tuple[tuple[int, int, int, int], int]:
        """(factor shape, rank) the config gives a frozen weight W0."""
        cfg: SoKAConfig = self.config
        shape = kronecker_factor_shapes(weight.shape[0], weight.shape[1], cfg.factor_rule, cfg.u_rows, cfg.u_cols)
        m1, m2, n1, n2 = shape
        sigma = torch.linalg.svdvals(vlp_rearrange(weight.detach().float(), m1, m2, n1, n2))
        return shape, select_rank(sigma, cfg.rank_criterion, cfg.energy_threshold, cfg.max_rank)

    def make_layer(self, base, layer, model):
        shape, rank = self.layer_plan(base.weight)
        return SoKALinear(base, shape, rank)

    def inject(self, model) -> None:
        super().inject(model)
        self._layers = {n: l for n, l in self.adapted_layers(model).items() if isinstance(l, SoKALinear)}

    def adapter_param_count(self, model) -> int:
        total = 0
        for layer in self.target_layers(model):
            if isinstance(layer.module, SoKALinear):
                (m1, m2, n1, n2), rank = layer.module.factor_shape, layer.module.rank
            else:
                (m1, m2, n1, n2), rank = self.layer_plan(layer.module.weight)
            total += rank * (m1 * n1 + m2 * n2)
        return total

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self._layers.items()}

    def artifacts(self, model) -> dict[str, Any]:
        return {
            "ranks": self.ranks(),
            "factor_shapes": {n: list(l.factor_shape) for n, l in self._layers.items()},
        }

    def state(self) -> dict[str, Any]:
        # The ranks are structural: a reload must rebuild the same factor shapes even if a re-computed
        # spectrum on another device would cross the threshold differently.
        return {"ranks": self.ranks()}

    def load_state(self, model, state: dict[str, Any]) -> None:
        layers = self.adapted_layers(model)
        for name, rank in state.get("ranks", {}).items():
            layer = layers.get(name)
            if not isinstance(layer, SoKALinear):
                raise ValueError(f"soka state names layer {name}, which this model does not adapt")
            if layer.rank != rank:
                layer.set_rank(int(rank))
