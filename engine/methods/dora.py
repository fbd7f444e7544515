"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353, eq. 5 and §4.3).

``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row``: the adapted weight is split into a direction (LoRA-updated
``W0``, normalised per output row) and a trainable magnitude ``m ∈ R^{d_out}`` initialised to ``‖W0‖_row``,
so ``W' = W0`` at init (``B = 0``). As §4.3 of the paper and PEFT do, the norm is treated as a constant in the
backward pass (detached): gradients reach ``m``, ``A`` and ``B`` only through the numerator.

Dropout (the paper is silent; we follow PEFT's ``DoraLinearLayer``): with dropout ``d`` active in training the
output is ``W0 x + b0 + (m/‖·‖)(W0 + s B A) d(x) − W0 d(x)``; without dropout (or in eval) this is exactly
``(m/‖·‖)(W0 + s B A) x + b0``. The bias is never rescaled.

The factors, their init, scaling and dropout are the shared ``LoRAStyleLinear`` (``engine/methods/lowrank.py``);
its layers declare no ``low_rank_factors`` (ΔW is not ``s B A``): the PEFT export reads A, B and ``m`` through
``DoRA.peft_variant``.

Parameters ``r(d_in + d_out) + d_out`` per layer. Mergeable: ``W' `` is a dense matrix. Tensor names map to
PEFT's as in ``PEFT_NAMES`` (``dora_A.weight`` ↔ ``lora_A.<adapter>.weight``, ...).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.methods.base import Method, PeftLoraOptions, PeftVariant, register_method
from engine.methods.lora import LoRAConfig
from engine.methods.lowrank import LoRAStyleLinear

# Our attribute name -> PEFT's (``LoraConfig(use_dora=True)``); the magnitude is PEFT's
# ``lora_magnitude_vector.<adapter>.weight``.
PEFT_NAMES = {"dora_A": "lora_A", "dora_B": "lora_B", "dora_magnitude_vector": "lora_magnitude_vector"}


class DoRAConfig(LoRAConfig):
    """LoRA's fields: rank and α of the directional update ``s B A``, its input dropout, rsLoRA scaling."""


class DoRALinear(LoRAStyleLinear):
    """The shared LoRA-style factors (``dora_A``, ``dora_B``, ``dora_dropout``) plus the magnitude ``m``."""

    factor_prefix = "dora_"

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, rank, scaling, dropout)
        w = base.weight
        with torch.no_grad():
            magnitude = torch.linalg.norm(w.float(), dim=1).to(w.dtype)  # ‖W0‖_row (B = 0 at init)
        self.dora_magnitude_vector = nn.Parameter(magnitude)

    def _low_rank_weight(self) -> torch.Tensor:
        b, a = self.factor_weights()
        return b @ a

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output row, without gradient (the paper's §4.3 constant)."""
        with torch.no_grad():
            return torch.linalg.norm(self.base.weight + self.scaling * self._low_rank_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, bias = self.base.weight, self.base.bias
        magnitude_scale = self.dora_magnitude_vector / self.weight_norm().to(x.dtype)
        base_out = F.linear(x, w0)
        if self.training and isinstance(self.adapter_dropout, nn.Dropout):
            # As in PEFT: the magnitude-scaled direction sees d(x), the kept base output sees x.
            dropped = self.adapter_dropout(x)
            base_on_dropped = F.linear(dropped, w0)
        else:
            dropped, base_on_dropped = x, base_out
        lora_out = self.low_rank_update(dropped)
        out = base_out + (magnitude_scale - 1) * base_on_dropped + magnitude_scale * lora_out
        return out if bias is None else out + bias

    def adapted_weight(self) -> torch.Tensor:
        """``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row`` (eq. 5)."""
        direction = self.base.weight + self.scaling * self._low_rank_weight()
        return (self.dora_magnitude_vector / self.weight_norm()).unsqueeze(1) * direction

    def delta_weight(self) -> torch.Tensor:
        return self.adapted_weight() - self.base.weight


@register_method
class DoRA(Method):
    name = "dora"
    config_cls = DoRAConfig
    config: DoRAConfig
    prefix = "dora_"
    mergeable = True
    peft_variant = PeftVariant(
        flags=(("use_dora", True),), factor_A="dora_A", factor_B="dora_B", magnitude="dora_magnitude_vector"
    )
    summary = "Magnitude-direction split: W' = m·(W0 + sBA)/‖W0 + sBA‖_row, m and B A trainable"
    paper = "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353)"
    test_params = {"rank": 2, "alpha": 4.0, "target_roles": ["q", "v"]}

    def make_layer(self, base, layer, model):
        cfg: DoRAConfig = self.config
        return DoRALinear(base, cfg.rank, cfg.scaling(), cfg.dropout)

    def peft_lora_options(self) -> PeftLoraOptions:
        return self.config.peft_lora_options(variant=self.peft_variant)

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        return sum(
            r * (l.module.in_features + l.module.out_features) + l.module.out_features
            for l in self.target_layers(model)
        )
