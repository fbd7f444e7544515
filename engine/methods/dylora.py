"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al., 2023, EACL, arXiv 2210.07558, §3).

One LoRA of rank ``r_max`` is trained so that every leading truncation works: each training step samples
``b ~ U{r_min..r_max}`` and the layer computes ``W0 x + (α/b) B[:, :b] A[:b] x``. In ``frozen`` mode only the
b-th component (row b of A, column b of B) is updated at that step; the leading ``b − 1`` are used but detached.
After training the adapter can be evaluated (and merged) at any rank ``b ≤ r_max`` (``set_eval_rank``), which
is what the accuracy-versus-rank plot sweeps.

Our choices where the paper is silent:

* one ``b`` per step for the whole model, drawn in the method's hooks (``on_train_start`` for the first step,
  ``on_step_end`` for each next one) from a generator seeded by ``(rank_seed, step)``: the draw depends on the
  step only, not on how many draws came before (``on_train_start`` runs before a checkpoint is read, so the first
  step after a resume uses step 0's draw); in eval mode every layer uses the evaluation rank (default ``r_max``);
* each rank-one component ``(A[i], B[:, i])`` is its own Parameter. A component the step does not train then
  has no gradient at all (rather than a zero one), so AdamW leaves it untouched: no weight decay and no
  momentum step on the components above b (and, in frozen mode, below b). With single ``A``/``B`` tensors and a
  gradient mask, momentum from earlier steps and weight decay would still move them;
* A is Kaiming-uniform (as nn.Linear, LoRA and PEFT), B zero, so the adapted model starts as the base model;
  α defaults to our LoRA default (16), r_min to 1 and ``frozen`` to off (all gradients of the leading b).

The layer is the shared ``LowRankUpdateLinear`` (``engine/methods/lowrank.py``) with its factors stored as
components and the scaling taken at the rank in use; ``low_rank_factors(rank)`` gives any leading truncation
(``supports_rank_choice``).

Parameters ``r_max(d_in + d_out)`` per layer. Mergeable at the evaluation rank. ``dylora_A.<i>`` (1 × d_in) and
``dylora_B.<i>`` (d_out × 1) stack into LoRA's ``lora_A`` / ``lora_B`` (``factor_matrices``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from engine.methods.base import Method, PeftLoraOptions, TargetedConfig, TrainContext, register_method
from engine.methods.lowrank import LowRankUpdateLinear


class DyLoRAConfig(TargetedConfig):
    rank: int = Field(8, ge=1, le=4096, description="r_max, the largest rank trained (the stored factors' rank)")
    min_rank: int = Field(1, ge=1, le=4096, description="r_min, the smallest rank sampled during training")
    alpha: float = Field(16.0, gt=0, description="α; at rank b the update is scaled by α/b")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    frozen: bool = Field(False, description="train only the b-th component at each step (the paper's frozen mode)")
    eval_rank: int | None = Field(None, ge=1, description="rank used in evaluation and merging (None: r_max)")
    rank_seed: int = Field(0, ge=0, description="seed of the per-step rank sampling")

    @model_validator(mode="after")
    def _ranks_ordered(self) -> DyLoRAConfig:
        if self.min_rank > self.rank:
            raise ValueError(f"min_rank {self.min_rank} exceeds rank {self.rank}")
        if self.eval_rank is not None and self.eval_rank > self.rank:
            raise ValueError(f"eval_rank {self.eval_rank} exceeds rank {self.rank}")
        return self


class DyLoRALinear(LowRankUpdateLinear):
    """The shared low-rank layer with nested ranks: stored as rank-one components, scaled by α/b at rank b."""

    factor_prefix = "dylora_"
    supports_rank_choice = True

    def __init__(self, base: nn.Linear, max_rank: int, alpha: float, dropout: float, frozen: bool, eval_rank: int):
        super().__init__(base, max_rank, alpha / max_rank, dropout)
        self.alpha = alpha
        self.frozen = frozen
        self.train_rank = max_rank  # set each step by the method's hooks
        self.eval_rank = eval_rank

    def create_factors(self, rank: int) -> None:
        """A Kaiming-uniform over all r_max rows at once (as LoRA's A), then split; B zero, one column each."""
        w = self.base.weight
        a = torch.empty(rank, self.base.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dylora_A = nn.ParameterList([nn.Parameter(a[i : i + 1].clone()) for i in range(rank)])
        self.dylora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.base.out_features, 1, device=w.device, dtype=w.dtype)) for _ in range(rank)]
        )

    @property
    def max_rank(self) -> int:
        return self.rank

    def active_rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def scaling_at(self, rank: int) -> float:
        return self.alpha / rank

    def truncated_factors(self, rank: int, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B[:, :rank], A[:rank])``; with ``frozen`` only the last component keeps its gradient."""
        rows = [self.dylora_A[i] for i in range(rank)]
        cols = [self.dylora_B[i] for i in range(rank)]
        if frozen:
            rows = [p.detach() for p in rows[:-1]] + rows[-1:]
            cols = [p.detach() for p in cols[:-1]] + cols[-1:]
        return torch.cat(cols, dim=1), torch.cat(rows, dim=0)

    def factor_weights(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` at ``rank`` leading components (default: the evaluation rank), unscaled."""
        return self.truncated_factors(self.eval_rank if rank is None else rank)

    def factor_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(B, A)`` of rank r_max, as a LoRA would store them (no scaling)."""
        return self.truncated_factors(self.max_rank)

    def low_rank_update(self, h: torch.Tensor) -> torch.Tensor:
        rank = self.active_rank()
        b, a = self.truncated_factors(rank, frozen=self.frozen and self.training)
        return F.linear(F.linear(h, a), b) * self.scaling_at(rank)


@register_method
class DyLoRA(Method):
    name = "dylora"
    config_cls = DyLoRAConfig
    config: DyLoRAConfig
    prefix = "dylora_"
    mergeable = True
    summary = "LoRA trained at a random rank b ≤ r_max each step (scale α/b); evaluate at any rank afterwards"
    paper = (
        "Valipour et al. 2023, DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free "
        "Low-Rank Adaptation (arXiv 2210.07558)"
    )
    test_params = {"rank": 3, "alpha": 6.0, "target_roles": ["q", "v"]}

    def __init__(self, config: DyLoRAConfig | None = None):
        super().__init__(config)
        self.eval_rank = self.config.eval_rank or self.config.rank
        self.training_rank = self.config.rank
        self.training_rank_counts: Counter[int] = Counter()

    def make_layer(self, base, layer, model):
        cfg: DyLoRAConfig = self.config
        return DyLoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.frozen, self.eval_rank)

    def peft_lora_options(self) -> PeftLoraOptions:
        """LoRA at the evaluation rank b (scaling α/b): what the layers' factors give by default."""
        return PeftLoraOptions(r=self.eval_rank, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout)

    def default_export_rank(self) -> int:
        return self.config.rank

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        return sum(r * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))

    # -- ranks -----------------------------------------------------------------------------------
    def evaluation_ranks(self) -> list[int]:
        """The ranks the accuracy-versus-rank sweep should visit: those sampled in training, r_min..r_max."""
        return list(range(self.config.min_rank, self.config.rank + 1))

    def set_eval_rank(self, model: nn.Module, rank: int) -> None:
        """Evaluate (and merge) every layer at ``rank`` (any 1 ≤ rank ≤ r_max)."""
        if not 1 <= rank <= self.config.rank:
            raise ValueError(f"dylora eval rank {rank} must lie in 1..{self.config.rank}")
        self.eval_rank = rank
        for layer in self.adapted_layers(model).values():
            assert isinstance(layer, DyLoRALinear)  # DyLoRA adapts layers only with DyLoRALinear
            layer.eval_rank = rank

    def sample_training_rank(self, step: int) -> int:
        """``b ~ U{r_min..r_max}`` for the given step, from a generator seeded by (rank_seed, step)."""
        gen = torch.Generator().manual_seed((self.config.rank_seed << 32) + step)
        return int(torch.randint(self.config.min_rank, self.config.rank + 1, (1,), generator=gen))

    def set_training_rank(self, model: nn.Module, rank: int) -> None:
        self.training_rank = rank
        for layer in self.adapted_layers(model).values():
            assert isinstance(layer, DyLoRALinear)
            layer.train_rank = rank

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> bool:
        self.set_training_rank(ctx.model, self.sample_training_rank(ctx.step))
        return False

    def on_step_end(self, ctx: TrainContext) -> bool:
        self.training_rank_counts[self.training_rank] += 1  # the rank the finished step used
        self.set_training_rank(ctx.model, self.sample_training_rank(ctx.step))
        return False

    # -- state -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"eval_rank": self.eval_rank}

    def load_state(self, model, state: dict[str, Any]) -> None:
        if "eval_rank" in state:
            self.set_eval_rank(model, int(state["eval_rank"]))

    def artifacts(self, model) -> dict[str, Any]:
        """Rank range for the accuracy-versus-rank plot and how often each rank was trained in this process."""
        return {
            "min_rank": self.config.min_rank,
            "max_rank": self.config.rank,
            "eval_rank": self.eval_rank,
            "evaluation_ranks": self.evaluation_ranks(),
            "training_rank_counts": {str(b): n for b, n in sorted(self.training_rank_counts.items())},
        }
