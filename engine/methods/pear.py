"""Pear: prune and share adapters (Zhong & Zhou, arXiv 2409.19733).

What the paper makes public: adapters at many positions of a ViT are scored, the less important ones pruned;
each pruned position reuses ("shares") an important unpruned adapter and keeps adapting; a "knowledge
checkpoint" keeps what the pruned adapters had learnt. The rest is our design (docs/METHODS.md#pear):

* **Positions.** One parallel bottleneck adapter (``adapters.Bottleneck``) per block × site. Sites, each a
  branch parallel to one sub-layer of the block (read the sub-layer's input, add to its output before the
  residual add)::

      "attn":  o_out = W_o c + b_o + s·adapter(x_attn)     x_attn = the input of q/k/v
      "mlp":   fc2_out = W_2 h + b_2 + s·adapter(x_mlp)    x_mlp = the input of fc1 (AdaptFormer-style)

* **Warm-up.** All adapters train for ``warmup_fraction`` of the steps.
* **Importance.** First-order Taylor estimate of the loss change when a position's adapter is removed, i.e. the
  gradient of a gate ``α = 1`` on its output, accumulated over ``calibration_batches`` training batches::

      I_p = | Σ_batches ∂L/∂α_p | = | Σ_batches ⟨s·adapter_p(x), ∂L/∂out_p⟩ |

  The sum is signed before the absolute value (batches whose gradients disagree cancel). Scores are taken in
  evaluation mode (no dropout) and do not touch the parameters' ``.grad``.
* **Prune and share.** The ``⌊prune_ratio·n⌋`` lowest-scoring positions (per site by default, or over all
  positions; at least one adapter per site survives) are pruned. Each pruned position then uses the
  highest-scoring unpruned adapter of its site (or the nearest in depth, ties to the higher score): the same
  ``Parameter`` objects, so both positions train it.
* **Knowledge checkpoint** (on by default). The pruned adapter's weights at pruning time are frozen
  (``requires_grad=False``, still saved with the adapter) and its output keeps being added, scaled by a
  trainable scalar ``γ`` (init 1, so the pruned adapter's contribution is kept exactly at pruning time)::

      out_p = W0 x + b0 + s·(shared_adapter(x) + γ_p · frozen_adapter_p(x))

Trainable adapter parameters after pruning: ``Σ_p P_p − Σ_{pruned} P_p + (#pruned if checkpoint)``, with
``P_p = m(d_in + d_out) + m + d_out``. Stored parameters additionally hold the frozen checkpoints
(``parameter_counts``). The pruning runs inside the training loop through ``on_step_end``; ``state()`` records
the scores and the sharing map so a saved adapter loads into a fresh model. Not mergeable.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from engine.methods.adapters import Bottleneck, InputTap, Mailbox, paired_layers
from engine.methods.base import AdaptedLinear, BlockList, Method, MethodConfig, TrainContext, register_method

if TYPE_CHECKING:
    from engine.models import TaskModel

# site -> (role whose input the adapter reads, role whose output it adds to)
SITES: dict[str, tuple[str, str]] = {"attn": ("q", "o"), "mlp": ("fc1", "fc2")}

Position = tuple[str, int]  # (site, block)


class PearConfig(MethodConfig):
    sites: list[str] = Field(
        ["attn", "mlp"],
        description="adapter sites per block: attn (parallel to the attention sub-layer), mlp (parallel to the MLP)",
    )
    blocks: BlockList = Field(None, description="transformer blocks with adapters (None: all)")
    bottleneck: int = Field(8, ge=1, le=16384, description="m, each adapter's hidden size (our default)")
    scaling: float = Field(0.1, gt=0, description="s, multiplies each adapter's output (AdaptFormer's 0.1)")
    activation: Literal["relu", "gelu"] = Field("relu", description="σ inside the adapters")
    bias: bool = Field(True, description="biases in the down- and up-projections")
    warmup_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="share of the training steps before scoring and pruning (our default)"
    )
    prune_ratio: float = Field(0.5, ge=0.0, lt=1.0, description="share of the adapters pruned")
    calibration_batches: int = Field(8, ge=1, le=10_000, description="training batches the importance is summed over")
    ranking: Literal["per_site", "global"] = Field(
        "per_site", description="prune the lowest scores within each site, or over all positions"
    )
    share_with: Literal["best", "nearest"] = Field(
        "best", description="a pruned position uses the best unpruned adapter of its site, or the nearest in depth"
    )
    knowledge_checkpoint: bool = Field(
        True, description="keep each pruned adapter frozen, its output scaled by a trainable scalar"
    )
    checkpoint_scale_init: float = Field(1.0, description="initial value of the knowledge checkpoint's scalar γ")

    @field_validator("sites")
    @classmethod
    def _sites_known(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SITES]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"sites must be distinct names from {', '.join(SITES)}; got {v}")
        return v


class PearLinear(AdaptedLinear):
    """The output layer of one position: ``W0 x + b0 + s·(adapter(x_site) + γ·checkpoint(x_site))``.

    ``x_site`` is the sub-layer input posted by the site's ``InputTap``. Before pruning ``pear_adapter`` is the
    position's own adapter and there is no checkpoint; after pruning ``pear_adapter`` is another position's
    module (shared parameters) and ``pear_checkpoint`` the frozen former own adapter.
    """

    linear_in_x = False

    def __init__(self, base: nn.Linear, mailbox: Mailbox, site: str, block: int, d_in: int, size: int,
                 scaling: float, activation: str, bias: bool):  # fmt: skip
        super().__init__(base)
        w = base.weight
        self.site, self.block = site, block
        self.adapter_in_features = d_in
        self.mailbox = mailbox
        self.scaling = scaling
        self.pear_adapter = Bottleneck(d_in, base.out_features, size, activation, bias, device=w.device, dtype=w.dtype)
        self.register_module("pear_checkpoint", None)
        self.register_parameter("pear_checkpoint_scale", None)
        self.shares_block: int | None = None  # after pruning: the block whose adapter this position uses
        self.importance_gate: torch.Tensor | None = None  # α = 1 while importance is measured

    @property
    def is_pruned(self) -> bool:
        return self.shares_block is not None

    def prune_and_share(self, source: PearLinear, knowledge_checkpoint: bool, scale_init: float) -> None:
        """Point this position at ``source``'s adapter; keep the own one frozen as a checkpoint (or drop it)."""
        if source.is_pruned or source.site != self.site:
            raise ValueError(f"position {self.site}/{self.block} can only share an unpruned adapter of its site")
        own = self.pear_adapter
        if knowledge_checkpoint:
            own.requires_grad_(False)
            self.pear_checkpoint = own
            w = self.base.weight
            self.pear_checkpoint_scale = nn.Parameter(torch.tensor(float(scale_init), device=w.device, dtype=w.dtype))
        self.pear_adapter = source.pear_adapter
        self.shares_block = source.block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mailbox.take()
        branch = self.pear_adapter(z)
        if self.importance_gate is not None:
            branch = self.importance_gate * branch
        if self.pear_checkpoint is not None:
            branch = branch + self.pear_checkpoint_scale * self.pear_checkpoint(z)
        return self.base(x) + self.scaling * branch


@register_method
class Pear(Method):
    """Prune and share adapters (Zhong & Zhou, arXiv 2409.19733); see the module docstring for our design."""

    name = "pear"
    config_cls = PearConfig
    config: PearConfig
    prefix = "pear_"
    summary = "Parallel adapters scored by Taylor importance; the weak half pruned and replaced by shared strong ones"
    paper = "Zhong & Zhou 2024, Pear: Pruning and Sharing Adapters in Visual Parameter-Efficient Fine-Tuning (arXiv 2409.19733)"  # noqa: E501
    test_params = {"bottleneck": 4, "calibration_batches": 2}

    def __init__(self, config: PearConfig | None = None):
        super().__init__(config)
        self.scores: dict[Position, float] = {}
        self.sources: dict[Position, int] = {}  # pruned position -> block of the adapter it shares
        self.pruned_at_step: int | None = None

    # -- injection -------------------------------------------------------------------------------
    def inject(self, model) -> None:
        cfg: PearConfig = self.config
        for site in cfg.sites:
            input_role, output_role = SITES[site]
            for block, tap, out in paired_layers(model, input_role, output_role, cfg.blocks):
                mailbox = Mailbox()
                model.set_submodule(tap.name, InputTap(tap.module, mailbox))
                model.set_submodule(
                    out.name,
                    PearLinear(out.module, mailbox, site, block, tap.module.in_features, cfg.bottleneck,
                               cfg.scaling, cfg.activation, cfg.bias),
                )  # fmt: skip

    @staticmethod
    def positions(model: nn.Module) -> dict[Position, PearLinear]:
        """Every adapter position of the model, keyed by (site, block), in model order."""
        return {(m.site, m.block): m for m in model.modules() if isinstance(m, PearLinear)}

    # -- counting --------------------------------------------------------------------------------
    def adapter_param_count(self, model) -> int:
        """Trainable adapter parameters: all positions' adapters, minus the pruned ones, plus their scalars γ."""
        cfg: PearConfig = self.config
        total = 0
        for layer in self.positions(model).values():
            own = Bottleneck.param_count(layer.adapter_in_features, layer.out_features, cfg.bottleneck, cfg.bias)
            if not layer.is_pruned:
                total += own
            elif cfg.knowledge_checkpoint:
                total += 1
        return total

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """Adapter parameters (task head excluded), each shared tensor once: trainable, frozen checkpoints, stored."""
        trainable = frozen = 0
        for name, p in model.named_parameters(remove_duplicate=True):
            if self.is_adapter_key(name):
                if p.requires_grad:
                    trainable += p.numel()
                else:
                    frozen += p.numel()
        return {"trainable": trainable, "frozen_checkpoint": frozen, "stored": trainable + frozen}

    # -- schedule --------------------------------------------------------------------------------
    def prune_step(self, total_steps: int) -> int:
        """The optimizer step after which scoring and pruning happen (at least 1)."""
        return max(1, round(self.config.warmup_fraction * total_steps))

    def on_step_end(self, ctx: TrainContext) -> bool:
        if self.pruned_at_step is not None or ctx.step < self.prune_step(ctx.total_steps):
            return False
        self.scores = self.importance_scores(ctx)
        sources = self.choose_sharing(self.scores)
        self.apply_sharing(ctx.model, sources)
        self.sources, self.pruned_at_step = sources, ctx.step
        if ctx.log is not None:
            ctx.log(
                f"pear: pruned {len(sources)} of {len(self.scores)} adapters at step {ctx.step}: "
                + ", ".join(f"{s}/{b}->{s}/{src}" for (s, b), src in sorted(sources.items()))
            )
        return bool(sources)

    def importance_scores(self, ctx: TrainContext) -> dict[Position, float]:
        """``I_p = |Σ_batches ∂L/∂α_p|`` for a gate ``α_p = 1`` on each position's adapter output."""
        model = ctx.model
        positions = self.positions(model)
        sums = dict.fromkeys(positions, 0.0)
        was_training = model.training
        model.eval()
        try:
            gates: list[torch.Tensor] = []
            for layer in positions.values():
                w = layer.base.weight
                layer.importance_gate = torch.ones((), device=w.device, dtype=w.dtype, requires_grad=True)
                gates.append(layer.importance_gate)
            for i, batch in enumerate(ctx.batches()):
                if i >= self.config.calibration_batches:
                    break
                grads = torch.autograd.grad(ctx.loss_fn(batch), gates, allow_unused=True)
                for key, g in zip(positions, grads, strict=True):
                    sums[key] += float(g) if g is not None else 0.0
        finally:
            for layer in positions.values():
                layer.importance_gate = None
            model.train(was_training)
        return {key: abs(total) for key, total in sums.items()}

    def choose_sharing(self, scores: dict[Position, float]) -> dict[Position, int]:
        """Which positions to prune, and for each the block of the unpruned adapter (same site) it will use."""
        cfg: PearConfig = self.config
        by_site: dict[str, list[Position]] = {}
        for pos in scores:
            by_site.setdefault(pos[0], []).append(pos)

        def ascending(group: list[Position]) -> list[Position]:
            return sorted(group, key=lambda p: (scores[p], p[1]))

        pruned: set[Position] = set()
        if cfg.ranking == "per_site":
            for group in by_site.values():
                k = min(math.floor(cfg.prune_ratio * len(group)), len(group) - 1)
                pruned.update(ascending(group)[:k])
        else:
            k = math.floor(cfg.prune_ratio * len(scores))
            left = {site: len(group) for site, group in by_site.items()}
            for pos in ascending(list(scores)):
                if len(pruned) >= k:
                    break
                if left[pos[0]] > 1:  # every site keeps at least one adapter to share
                    pruned.add(pos)
                    left[pos[0]] -= 1

        sources: dict[Position, int] = {}
        for site, block in sorted(pruned):
            kept = [p for p in by_site[site] if p not in pruned]
            if cfg.share_with == "best":
                best = max(kept, key=lambda p: (scores[p], -p[1]))
            else:
                best = min(kept, key=lambda p: (abs(p[1] - block), -scores[p], p[1]))
            sources[(site, block)] = best[1]
        return sources

    def apply_sharing(self, model: nn.Module, sources: dict[Position, int]) -> None:
        positions = self.positions(model)
        for (site, block), source_block in sources.items():
            if (site, block) not in positions or (site, source_block) not in positions:
                raise ValueError(f"pear: position {site}/{block} or {site}/{source_block} is not in this model")
            positions[(site, block)].prune_and_share(
                positions[(site, source_block)], self.config.knowledge_checkpoint, self.config.checkpoint_scale_init
            )

    # -- state and artifacts ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "pruned_at_step": self.pruned_at_step,
            "scores": [{"site": s, "block": b, "score": v} for (s, b), v in self.scores.items()],
            "shared": [{"site": s, "block": b, "source_block": src} for (s, b), src in self.sources.items()],
        }

    def load_state(self, model: TaskModel, state: dict[str, Any]) -> None:
        self.scores = {(d["site"], int(d["block"])): float(d["score"]) for d in state.get("scores", [])}
        self.pruned_at_step = state.get("pruned_at_step")
        sources = {(d["site"], int(d["block"])): int(d["source_block"]) for d in state.get("shared", [])}
        self.apply_sharing(model, sources)
        self.sources = sources

    def artifacts(self, model: TaskModel) -> dict[str, Any]:
        """Importance per position and the pruning/sharing map, as blocks × sites tables for the importance view."""
        positions = self.positions(model)
        sites = list(self.config.sites)
        blocks = sorted({b for _s, b in positions})

        def table(value):
            return [[value((s, b)) if (s, b) in positions else None for s in sites] for b in blocks]

        return {
            "sites": sites,
            "blocks": blocks,
            "importance": table(lambda p: self.scores.get(p)),
            "pruned": table(lambda p: positions[p].is_pruned),
            "shares_block": table(lambda p: positions[p].shares_block),
            "pruned_at_step": self.pruned_at_step,
            "parameter_counts": self.parameter_counts(model),
        }
