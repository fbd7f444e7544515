"""Lily: low-rank interconnected adaptation across layers (Zhong et al., arXiv 2407.09946).

Per module type ``t`` (q, v, fc1, ...), with ``L`` adapted layers of that type:

* layer-local low-dimensional projectors ``LP`` (``d_in → d``, no bias), one per ``stride`` consecutive layers;
* ``ne`` high-dimensional projector experts ``HP_e ∈ R^{d×d_out}``, zero-initialised and shared by all ``L``
  layers of the type (the "interconnection" across layers);
* a router per layer, ``R_l ∈ R^{ne×d}`` (no bias).

At layer ``l`` (the paper's forward pass)::

    h = LP_l(x)                            ReLU(LP_l(x)) when the target is an MLP layer (fc1, fc2)
    p = mean over batch and tokens of softmax(R_l h)          one mixing vector per layer per forward
    y = W0 x + b0 + s · h · Σ_e p_e HP_e

Parameters per type ``n_LP·d_in·d + ne·d·d_out + L·d·ne`` with ``n_LP = ⌈L / stride⌉``. Not mergeable: p depends
on the input. The "monoscale" ablation fixes ``p = 1/ne`` (no router, so ``L·d·ne`` fewer parameters); it is
then ``ΔW = s · (mean_e HP_e)ᵀ W_LP``, mergeable and linear in x, unless the ReLU of MLP targets is on.

MLP placement (``mlp_placement``, docs/METHODS.md#lily). ``"block"`` (default, the official code's): one adapter
beside the whole MLP block of each transformer block, reading the MLP's input and added to its output::

    h = ReLU(LP_l(x_mlp));   MLP(x_mlp) + s · h · Σ_e p_e HP_e        LP: d_model → d, HP_e: d → d_model

(the block's ``fc1`` posts ``x_mlp``, its ``fc2`` adds the branch; fc1 or fc2 in ``target_roles`` asks for it).
``"per_linear"`` wraps ``fc1`` and ``fc2`` separately, each with its own LP/HP type (ReLU after the LP).

Our choices where the paper is silent (the first is a config option):

* ``lp_stride = 0`` (the default) shares one LP over ``max(1, L // ne)`` consecutive layers, the official code's
  ``12 // ne`` for L layers (so ``⌈L / stride⌉`` LPs: ne of them when ne divides L); ``lp_stride = 1`` gives every
  layer its own LP.
* p averages over every token position the layer sees, padding included (the layer does not see the
  attention mask), as Hugging Face PEFT's LiLy does.
* Initialisation as PEFT: LP and router Kaiming-uniform (a = √5, ``nn.Linear``'s default), HP zero.
* Layers of one type are grouped also by weight shape, as PEFT does, so a type with mixed shapes gets one
  expert set per shape.

Equality with PEFT's ``LilyModel`` (``r = d``, ``num_B = ne``, ``stride_A = lp_stride``, same scaling; tested to
1e-5) holds where the configurations coincide: PEFT has no ReLU on MLP targets (ours with
``mlp_activation = "identity"``) and no monoscale ablation. PEFT stores the experts as one ``nn.Linear`` of
weight ``(ne·d, d_out)``; ours is the same tensor as ``(ne, d, d_out)``. Defaults differ: ours d = 32, ne = 4
(the paper's ViT setting) and ``lp_stride = 0``; PEFT's r = 32, num_B = 2, stride_A = 1.

Shared modules live in the model tree: every layer of a type holds a reference to the type's ``lily_hp``
(and its group's ``lily_lp``), so ``model.parameters()`` lists each once and the state dict names them once
per alias (``Method.adapter_state_dict`` keeps the first). During training each layer records its mixing
vectors p (``RouterLoads``); ``artifacts()`` returns their running means and a history for the router-load
plots.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from engine.methods.adapters import InputTap, Mailbox, paired_layers
from engine.methods.base import AdaptedLinear, Method, TargetedConfig, TrainContext, register_method

MLP_ROLES = ("fc1", "fc2", "gate", "up", "down")


class LilyConfig(TargetedConfig):
    rank: int = Field(32, ge=1, le=4096, description="d, the width between the LPs and the HP experts")
    num_experts: int = Field(4, ge=1, le=64, description="ne, HP experts shared by all layers of a module type")
    scaling: float = Field(1.0, gt=0, description="s, multiplies the adapter output (paper: tuned, 0.01-0.1 on GLUE)")
    lp_stride: int = Field(
        0, ge=0, le=1024, description="consecutive layers sharing one LP (0: L // ne, the official code's 12 // ne)"
    )
    mlp_placement: Literal["block", "per_linear"] = Field(
        "block", description="MLP targets: one adapter beside the whole MLP (official) or one per fc1/fc2 layer"
    )
    mlp_activation: Literal["relu", "identity"] = Field(
        "relu", description="applied to the LP output of MLP targets (fc1, fc2); attention targets use identity"
    )
    monoscale: bool = Field(False, description="ablation: fixed p = 1/ne, no router; the adapter becomes mergeable")

    def stride_for(self, num_layers: int) -> int:
        return self.lp_stride or max(1, num_layers // self.num_experts)


class LilyExperts(nn.Module):
    """The ``ne`` HP experts of one module type, ``weight[e] = HP_e ∈ R^{d×d_out}``, zero-initialised."""

    def __init__(self, num_experts: int, rank: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, rank, out_features, device=device, dtype=dtype))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def combine(self, mixing: torch.Tensor) -> torch.Tensor:
        """``Σ_e p_e HP_e`` (d × d_out)."""
        return torch.einsum("e,edo->do", mixing.to(self.weight.dtype), self.weight)


class RouterLoads:
    """Mixing vectors p one layer produced in training: a running mean, and a history of window means.

    Each training forward adds its p to the current window; ``close_window(step)`` (called after every
    optimizer step) turns the window into one history point. When the history passes ``max_points`` adjacent
    points are merged (forward-weighted means), so the history always spans the whole run at bounded size.
    Tensors stay on the model's device; they are read back only in ``summary()``.
    """

    def __init__(self, max_points: int = 64):
        self.max_points = max_points
        self.total: torch.Tensor | None = None
        self.forwards = 0
        self.window: torch.Tensor | None = None
        self.window_forwards = 0
        self.history: list[tuple[int, torch.Tensor, int]] = []  # (last step, mean p, forwards)

    def add(self, mixing: torch.Tensor) -> None:
        mixing = mixing.detach().float()
        self.total = mixing.clone() if self.total is None else self.total + mixing
        self.window = mixing.clone() if self.window is None else self.window + mixing
        self.forwards += 1
        self.window_forwards += 1

    def close_window(self, step: int) -> None:
        if not self.window_forwards:
            return
        assert self.window is not None  # add() sets it with the window's first forward
        self.history.append((step, self.window / self.window_forwards, self.window_forwards))
        self.window, self.window_forwards = None, 0
        if len(self.history) > self.max_points:
            merged = []
            for i in range(0, len(self.history) - 1, 2):
                (_, p1, n1), (s2, p2, n2) = self.history[i], self.history[i + 1]
                merged.append((s2, (p1 * n1 + p2 * n2) / (n1 + n2), n1 + n2))
            if len(self.history) % 2:
                merged.append(self.history[-1])
            self.history = merged

    def summary(self) -> dict[str, Any]:
        return {
            "mean": (self.total / self.forwards).tolist() if self.total is not None else None,
            "forwards": self.forwards,
            "history_steps": [s for s, _, _ in self.history],
            "history": [p.tolist() for _, p, _ in self.history],
        }


class LilyLinear(AdaptedLinear):
    """One adapted layer: its (possibly shared) LP, the type's shared HP experts and its own router."""

    def __init__(
        self,
        base: nn.Linear,
        lp: nn.Linear,
        hp: LilyExperts,
        router: nn.Linear | None,
        scaling: float,
        relu: bool,
        role: str,
        block: int,
    ):
        super().__init__(base)
        self.lily_lp = lp
        self.lily_hp = hp
        if router is not None:
            self.lily_router = router
        self.monoscale = router is None
        self.scaling = scaling
        self.relu = relu
        self.role, self.block = role, block
        self.linear_in_x = self.monoscale and not relu
        self.router_loads = RouterLoads()

    def mixing_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """p ∈ R^{ne}: the mean over all leading (batch, token) positions of the router's softmax."""
        ne = self.lily_hp.num_experts
        if self.monoscale:
            return torch.full((ne,), 1.0 / ne, device=hidden.device, dtype=torch.float32)
        probs = F.softmax(self.lily_router(hidden), dim=-1)
        mixing = probs.reshape(-1, ne).mean(dim=0)
        if self.training:
            self.router_loads.add(mixing)
        return mixing

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the LP reads: the layer's own input (the block placement reads the MLP's input instead)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lily_lp(self.adapter_input(x))
        if self.relu:
            hidden = F.relu(hidden)
        combined = self.lily_hp.combine(self.mixing_weights(hidden))
        return self.base(x) + (hidden @ combined) * self.scaling

    def delta_weight(self) -> torch.Tensor | None:
        if not self.linear_in_x:
            return None
        mixing = torch.full((self.lily_hp.num_experts,), 1.0 / self.lily_hp.num_experts, device=self.base.weight.device)
        return self.scaling * (self.lily_hp.combine(mixing).t() @ self.lily_lp.weight)


class LilyMLPLinear(LilyLinear):
    """The official MLP placement: the block's ``fc2`` plus ``s · ReLU(LP(x_mlp)) · Σ p_e HP_e``, with ``x_mlp`` the
    MLP's input posted by the block's ``fc1`` (an ``InputTap``). Not linear in the layer's input."""

    def __init__(self, base: nn.Linear, mailbox: Mailbox, *args: Any):
        super().__init__(base, *args)
        self.mailbox = mailbox
        self.linear_in_x = False

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.mailbox.take()

    def delta_weight(self) -> torch.Tensor | None:
        return None


@register_method
class Lily(Method):
    """Layer-local projectors, model-wide shared experts mixed by per-layer routers; see the module docstring."""

    name = "lily"
    config_cls = LilyConfig
    config: LilyConfig
    prefix = "lily_"
    summary = "LPs per layer (or stride of layers), HP experts shared across layers, mixed by per-layer routers"
    paper = "Zhong et al. 2024, Low-Rank Interconnected Adaptation across Layers (arXiv 2407.09946)"
    test_params = {"rank": 4, "num_experts": 3, "lp_stride": 2, "scaling": 0.5, "target_roles": ["q", "v", "fc1"]}

    @property
    def mergeable(self) -> bool:  # type: ignore[override]  # read-only here, a plain attribute on Method
        """Only the monoscale ablation without ReLU on per-layer placements is a fixed linear map, hence mergeable."""
        return self.config.monoscale and not self._uses_relu() and not self._block_mlp()

    def default_export_rank(self) -> int:
        """ΔW (monoscale) has rank at most d, the width between LPs and HPs: the SVD conversion's first guess."""
        return self.config.rank

    def _uses_relu(self) -> bool:
        cfg: LilyConfig = self.config
        return cfg.mlp_activation == "relu" and any(r in MLP_ROLES for r in cfg.target_roles)

    def _block_mlp(self) -> bool:
        """Whether MLP targets get the official adapter beside the whole MLP block."""
        cfg: LilyConfig = self.config
        return cfg.mlp_placement == "block" and any(r in MLP_ROLES for r in cfg.target_roles)

    def _groups(self, model) -> dict[tuple[str, int, int], list]:
        """Adapters by (role, d_in, d_out), in model order: each group shares HPs and strided LPs. With the block
        placement the MLP is one group ``("mlp", fc1's d_in, fc2's d_out)`` of ``(fc1, fc2)`` pairs."""
        groups: dict[tuple[str, int, int], list] = {}
        for layer in self.target_layers(model):
            if self._block_mlp() and layer.role in MLP_ROLES:
                continue
            key = (layer.role, layer.module.in_features, layer.module.out_features)
            groups.setdefault(key, []).append(layer)
        if self._block_mlp():
            for _block, fc1, fc2 in paired_layers(model, "fc1", "fc2", self.config.blocks):
                key = ("mlp", fc1.module.in_features, fc2.module.out_features)
                groups.setdefault(key, []).append((fc1, fc2))
        return groups

    def inject(self, model) -> None:
        cfg: LilyConfig = self.config
        for (role, d_in, d_out), layers in self._groups(model).items():
            w = (layers[0][1] if role == "mlp" else layers[0]).module.weight
            hp = LilyExperts(cfg.num_experts, cfg.rank, d_out, device=w.device, dtype=w.dtype)
            stride = cfg.stride_for(len(layers))
            relu = role in (*MLP_ROLES, "mlp") and cfg.mlp_activation == "relu"
            lp = None
            for i, layer in enumerate(layers):
                if i % stride == 0:
                    lp = nn.Linear(d_in, cfg.rank, bias=False, device=w.device, dtype=w.dtype)
                assert lp is not None  # made at i = 0
                router = None
                if not cfg.monoscale:
                    router = nn.Linear(cfg.rank, cfg.num_experts, bias=False, device=w.device, dtype=w.dtype)
                if role == "mlp":
                    fc1, fc2 = layer
                    mailbox = Mailbox()
                    model.set_submodule(fc1.name, InputTap(fc1.module, mailbox))
                    adapted: LilyLinear = LilyMLPLinear(fc2.module, mailbox, lp, hp, router, cfg.scaling, relu,
                                                        "mlp", fc2.block)  # fmt: skip
                    model.set_submodule(fc2.name, adapted)
                else:
                    adapted = LilyLinear(layer.module, lp, hp, router, cfg.scaling, relu, layer.role, layer.block)
                    model.set_submodule(layer.name, adapted)

    def adapter_param_count(self, model) -> int:
        cfg: LilyConfig = self.config
        d, ne = cfg.rank, cfg.num_experts
        total = 0
        for (_, d_in, d_out), layers in self._groups(model).items():
            n_layers = len(layers)
            n_lp = math.ceil(n_layers / cfg.stride_for(n_layers))
            total += n_lp * d_in * d + ne * d * d_out + (0 if cfg.monoscale else n_layers * d * ne)
        return total

    def on_step_end(self, ctx: TrainContext) -> bool:
        for layer in self._lily_layers(ctx.model).values():
            layer.router_loads.close_window(ctx.step)
        return False

    @staticmethod
    def _lily_layers(model) -> dict[str, LilyLinear]:
        return {n: m for n, m in Method.adapted_layers(model).items() if isinstance(m, LilyLinear)}

    def artifacts(self, model) -> dict[str, Any]:
        """Router loads per layer (running mean and history of p) and which layers share each LP."""
        layers = self._lily_layers(model)
        lp_sharing: dict[str, list[list[int]]] = {}
        seen: dict[int, list[int]] = {}
        for layer in layers.values():
            blocks = seen.get(id(layer.lily_lp))
            if blocks is None:
                blocks = seen[id(layer.lily_lp)] = []
                lp_sharing.setdefault(layer.role, []).append(blocks)
            blocks.append(layer.block)
        loads = {}
        if not self.config.monoscale:
            loads = {
                name: {"role": layer.role, "block": layer.block, **layer.router_loads.summary()}
                for name, layer in layers.items()
            }
        return {
            "num_experts": self.config.num_experts,
            "monoscale": self.config.monoscale,
            "lp_sharing": lp_sharing,
            "router_loads": loads,
        }
