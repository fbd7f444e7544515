"""LoRA (Hu et al., 2021, arXiv 2106.09685, eq. 3) with the rsLoRA scaling (Kalajdzievski, 2023).

``h = W0 x + s · B A dropout(x)``, ``A ∈ R^{r×d_in}`` Kaiming-uniform (a = √5, as nn.Linear and PEFT),
``B ∈ R^{d_out×r}`` zero, ``s = α/r`` (rsLoRA: ``α/√r``). Parameters ``r(d_in + d_out)`` per layer.
Mergeable: ``W = W0 + s B A``. Parameter names (``lora_A.weight``, ``lora_B.weight``) follow PEFT.
The layer is the shared ``LowRankUpdateLinear`` (``engine/methods/lowrank.py``) under the ``lora_`` names.
"""

from __future__ import annotations

from pydantic import Field

from engine.methods.base import Method, PeftLoraOptions, PeftVariant, TargetedConfig, register_method
from engine.methods.lowrank import LowRankUpdateLinear, lora_scaling


class LoRAConfig(TargetedConfig):
    rank: int = Field(8, ge=1, le=4096, description="r, the rank of ΔW")
    alpha: float = Field(16.0, gt=0, description="α; the update is scaled by α/r (α/√r with rsLoRA)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    use_rslora: bool = Field(False, description="rank-stabilised scaling α/√r")

    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def peft_lora_options(self, variant: PeftVariant | None = None, init: bool | str = True) -> PeftLoraOptions:
        """These fields under PEFT's names (the methods built on this config add their variant and init)."""
        return PeftLoraOptions(
            r=self.rank, lora_alpha=self.alpha, use_rslora=self.use_rslora, lora_dropout=self.dropout,
            variant=variant, init=init,
        )  # fmt: skip


class LoRALinear(LowRankUpdateLinear):
    """``LoRALinear(base, rank, scaling, dropout=0.0)``: the shared low-rank layer with PEFT's tensor names."""

    factor_prefix = "lora_"


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

    def peft_lora_options(self) -> PeftLoraOptions:
        return self.config.peft_lora_options()

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        return sum(r * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))
