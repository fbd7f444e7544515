"""The LoRA-style low-rank layer the LoRA family shares: ``h = W x + b + s · B A dropout(x)``.

LoRA (Hu et al. 2021, eq. 3), DoRA's directional update, PiSSA's and CorDA's residual layers, DyLoRA's nested
ranks and HEAT's head-masked LoRA all hold the same two factors ``A ∈ R^{r×d_in}`` and ``B ∈ R^{d_out×r}``
with a scaling ``s``. ``LoRAStyleLinear`` owns that part once, so the methods differ only where their papers do:

* creation and init: ``A`` Kaiming-uniform with ``a = √5`` (as nn.Linear, loralib and PEFT), ``B`` zero, so the
  adapted layer starts as the base layer. The factors are ``nn.Linear`` modules named ``<factor_prefix>A`` and
  ``<factor_prefix>B``, which keeps PEFT's tensor names (``lora_A.weight``). A data-driven init (PiSSA's SVD,
  CorDA's covariance SVD) replaces them afterwards with ``set_factors``; DyLoRA stores them differently by
  overriding ``create_factors`` and ``factor_weights``;
* the scaling ``s = α/r``, or rsLoRA's ``α/√r`` (Kalajdzievski 2023) through ``lora_scaling``;
* dropout on the adapter's input only (``<factor_prefix>dropout``);
* the forward term ``s · B A dropout(x)`` (``low_rank_update``) and ``ΔW = s B A`` (``delta_weight``);
* the factors as one value, ``LowRankFactors``, the form analyses and the PEFT export read.

Merging needs nothing more: ``AdaptedLinear.merged()`` folds ``delta_weight()`` into a dense ``nn.Linear``.

``LoRAStyleLinear`` does not itself promise that its factors are the layer's whole ΔW (DoRA rescales rows, so
they are not). ``LowRankUpdateLinear`` is the LoRA-style layer whose ΔW is exactly ``s B A``; it declares the
method contract ``LowRankLinear.low_rank_factors`` (``engine/methods/base.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from engine.methods.base import AdaptedLinear, LowRankLinear, RankChoiceError


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """``α/r``, or rsLoRA's rank-stabilised ``α/√r`` (Kalajdzievski 2023, eq. 4), the scaling PEFT uses too."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclass(frozen=True)
class LowRankFactors:
    """A low-rank update ``ΔW = scaling · B A`` with ``A`` (rank × d_in) and ``B`` (d_out × rank), unscaled.

    Iterating gives ``(scaling · B, A)``, the pair ``low_rank_factors()`` returned before it returned this value,
    so ``b, a = layer.low_rank_factors()`` still reads ``ΔW = b @ a``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scaled_B(self) -> torch.Tensor:
        """``scaling · B``: ``ΔW = scaled_B @ A`` without forming the scaling twice."""
        return self.scaling * self.B

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.scaled_B, self.A))


class LoRAStyleLinear(AdaptedLinear):
    """``y = W x + b + s · B A dropout(x)`` with ``W``, ``b`` the frozen ``self.base``.

    Subclasses set ``factor_prefix``. ``rank`` is the number of stored components, ``scaling`` the ``s`` of the
    full-rank update (DyLoRA scales by the rank it runs at, see ``scaling_at``).
    """

    factor_prefix: ClassVar[str]

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base)
        self.rank = rank
        self.scaling = scaling
        self.create_factors(rank)
        setattr(self, self.factor_prefix + "dropout", nn.Dropout(dropout) if dropout > 0 else nn.Identity())

    # -- the factors -------------------------------------------------------------------------------
    def create_factors(self, rank: int) -> None:
        """``A`` Kaiming-uniform (a = √5), ``B`` zero, as ``nn.Linear`` modules (the RNG draws of nn.Linear's own
        init come first, as in PEFT, so a seed gives PEFT's factors)."""
        w = self.base.weight
        factor_a = nn.Linear(self.base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        factor_b = nn.Linear(rank, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(factor_a.weight, a=math.sqrt(5))
        nn.init.zeros_(factor_b.weight)
        setattr(self, self.factor_prefix + "A", factor_a)
        setattr(self, self.factor_prefix + "B", factor_b)

    @property
    def factor_A(self) -> nn.Linear:
        return getattr(self, self.factor_prefix + "A")

    @property
    def factor_B(self) -> nn.Linear:
        return getattr(self, self.factor_prefix + "B")

    @property
    def adapter_dropout(self) -> nn.Module:
        return getattr(self, self.factor_prefix + "dropout")

    def factor_weights(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` unscaled, at ``rank`` leading components (default: all stored)."""
        if rank is not None and rank != self.rank:
            raise RankChoiceError(f"{type(self).__name__} keeps its factors at rank {self.rank} only")
        return self.factor_B.weight, self.factor_A.weight

    def scaling_at(self, rank: int) -> float:
        """The scaling of the update at ``rank`` components (fixed here; DyLoRA's is α/rank)."""
        return self.scaling

    @torch.no_grad()
    def set_factors(self, factor_a: torch.Tensor, factor_b: torch.Tensor) -> None:
        """Overwrite ``A`` and ``B`` in place (same Parameters, so an optimizer built before still holds them):
        the hook data-driven inits (PiSSA, CorDA) use."""
        dtype = self.base.weight.dtype
        self.factor_A.weight.copy_(factor_a.to(dtype))
        self.factor_B.weight.copy_(factor_b.to(dtype))

    def lora_factors(self, rank: int | None = None) -> LowRankFactors:
        """The factors of the ``s B A`` term (for DoRA the directional update, for the others ΔW itself)."""
        b, a = self.factor_weights(rank)
        return LowRankFactors(A=a, B=b, scaling=self.scaling_at(a.shape[0]))

    # -- the maths ---------------------------------------------------------------------------------
    def low_rank_update(self, h: torch.Tensor) -> torch.Tensor:
        """``s · B A h`` for an input ``h`` that already went through the adapter's dropout."""
        return self.factor_B(self.factor_A(h)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.low_rank_update(self.adapter_dropout(x))

    def delta_weight(self) -> torch.Tensor:
        return self.lora_factors().delta_weight()


class LowRankUpdateLinear(LoRAStyleLinear, LowRankLinear):
    """A LoRA-style layer whose whole ΔW is ``s B A``: its factors are the contract's ``low_rank_factors``."""

    def low_rank_factors(self, rank: int | None = None) -> LowRankFactors:
        self.check_rank_choice(rank)
        return self.lora_factors(rank)
