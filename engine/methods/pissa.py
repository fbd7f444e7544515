"""PiSSA: principal singular values and singular vectors adaptation (Meng et al., 2024, arXiv 2404.02948, §3).

SVD ``W0 = U S Vᵀ``; the adapter takes the top-r principal components, ``B = U_r √(S_r/s)``,
``A = √(S_r/s) V_rᵀ``, and the frozen weight becomes the residual ``W_res = W0 − s B A``. At init the adapted
layer computes ``W_res x + s B A x = W0 x``: PiSSA changes where training starts, not the function.
The ``/s`` inside the root is PEFT's convention (``Sr /= scaling``), so ``s B A = U_r S_r V_rᵀ`` for any α.

The paper uses a full SVD; ``svd_niter > 0`` uses PEFT's fast randomized alternative (``torch.svd_lowrank``
with that many subspace iterations, PEFT's ``init_lora_weights="pissa_niter_<k>"``).

Also here: ``ResidualLowRankLinear``, the layer PiSSA and CorDA share (both move a rank-r part of ``W0`` into
the adapter and freeze the residual). It keeps the initial factors ``A0, B0`` as buffers, so
``pretrained_weight() = W_res + s B0 A0`` recovers ``W0`` exactly. They go into the adapter file only where a
fresh model cannot rebuild them (``keep_initial``): CorDA's come from calibration data, and PiSSA's randomized SVD
(``svd_niter > 0``) from a random draw; loading such a file rebuilds the matching residual (see
``_load_from_state_dict``). PiSSA's full SVD is recomputed from ``W0`` when the adapter is applied, so its file
holds only A and B (and the task head): half the size. The PEFT export needs neither (it compares the residual
with the pretrained model itself, ``engine/export/peft_format.py``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from engine.methods.base import Method, PeftLoraOptions, register_method
from engine.methods.lora import LoRAConfig
from engine.methods.lowrank import LowRankUpdateLinear

# Our attribute names -> PEFT's LoRA names (``pissa_A.weight`` ↔ ``lora_A.<adapter>.weight``). The initial
# factors have no PEFT counterpart (PEFT writes the residual into the base model instead).
PEFT_NAMES = {"pissa_A": "lora_A", "pissa_B": "lora_B"}


class ResidualLowRankLinear(LowRankUpdateLinear):
    """``y = W_res x + b0 + s B A dropout(x)`` with ``W_res = W0 − s B0 A0`` stored as ``base.weight``.

    The shared low-rank layer (``engine/methods/lowrank.py``): subclasses set ``factor_prefix``; the tensors are
    ``<prefix>A`` (nn.Linear d_in→r), ``<prefix>B`` (nn.Linear r→d_out) and the buffers ``<prefix>initial_A``,
    ``<prefix>initial_B``. Until ``initialise_from`` (the data-driven init hook) is called the layer is a plain
    LoRA (A Kaiming-uniform, B = 0, ``W_res = W0``). Its ``low_rank_factors()`` are ΔW relative to the residual.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0, keep_initial: bool = True):
        super().__init__(base, rank, scaling, dropout)
        # Saved with the adapter only when a fresh model cannot recompute them (``keep_initial``).
        for name, weight in (("initial_A", self.factor_A.weight), ("initial_B", self.factor_B.weight)):
            self.register_buffer(self.factor_prefix + name, weight.detach().clone(), persistent=keep_initial)

    @property
    def initial_A(self) -> torch.Tensor:
        return getattr(self, self.factor_prefix + "initial_A")

    @property
    def initial_B(self) -> torch.Tensor:
        return getattr(self, self.factor_prefix + "initial_B")

    def pretrained_weight(self) -> torch.Tensor:
        """The original ``W0 = W_res + s B0 A0`` (``effective_base_weight()`` is the residual ``W_res``)."""
        return self.base.weight + self.scaling * (self.initial_B @ self.initial_A).to(self.base.weight.dtype)

    @torch.no_grad()
    def initialise_from(self, factor_a: torch.Tensor, factor_b: torch.Tensor) -> None:
        """Move ``s B A`` out of ``W0``: set A, B (and A0, B0) and the residual ``W0 − s B A``, in place."""
        w0 = self.pretrained_weight().float()
        dtype = self.base.weight.dtype
        self.set_factors(factor_a, factor_b)
        self.initial_A.copy_(factor_a.to(dtype))
        self.initial_B.copy_(factor_b.to(dtype))
        self.base.weight.copy_((w0 - self.scaling * factor_b.float() @ factor_a.float()).to(dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Loading other initial factors (an adapter saved from a calibrated or randomized init) changes which
        # residual belongs to them: W_res ← W_res + s(B0_old A0_old − B0_new A0_new) keeps W0 = W_res + s B0 A0.
        # The layer's own tensors load before its children's, so a state dict that also holds ``base.weight``
        # (a full-model state) overwrites this adjustment with its own, already consistent, residual.
        key_a, key_b = prefix + self.factor_prefix + "initial_A", prefix + self.factor_prefix + "initial_B"
        old = None
        if key_a in state_dict and key_b in state_dict:
            old = (self.initial_B.clone(), self.initial_A.clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if old is None or (torch.equal(old[0], self.initial_B) and torch.equal(old[1], self.initial_A)):
            return
        with torch.no_grad():
            w = self.base.weight
            old_part = (old[0].float() @ old[1].float()) - (self.initial_B.float() @ self.initial_A.float())
            w.copy_((w.float() + self.scaling * old_part).to(w.dtype))


class PiSSAConfig(LoRAConfig):
    rank: int = Field(8, ge=1, le=4096, description="r, the number of principal components moved into the adapter")
    alpha: float = Field(8.0, gt=0, description="α; scaling s = α/r (PiSSA uses s = 1, i.e. α = r)")
    svd_niter: int = Field(
        0, ge=0, le=100, description="0: full SVD (the paper); k > 0: randomized SVD with k subspace iterations"
    )


def principal_factors(
    weight: torch.Tensor, rank: int, scaling: float, svd_niter: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B) = (√(S_r/s) V_rᵀ, U_r √(S_r/s))`` from the SVD of ``weight`` (float32)."""
    w = weight.detach().float()
    if rank > min(w.shape):
        raise ValueError(f"pissa rank {rank} exceeds min(d_out, d_in) = {min(w.shape)} of a {tuple(w.shape)} weight")
    if svd_niter == 0:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u_r, s_r, vh_r = u[:, :rank], s[:rank], vh[:rank]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, q=rank, niter=svd_niter)
        vh_r = v_r.T
    root = torch.sqrt(s_r / scaling)
    return root[:, None] * vh_r, u_r * root[None, :]


class PiSSALinear(ResidualLowRankLinear):
    factor_prefix = "pissa_"


@register_method
class PiSSA(Method):
    name = "pissa"
    config_cls = PiSSAConfig
    config: PiSSAConfig
    prefix = "pissa_"
    mergeable = True
    summary = "LoRA initialised on the top-r singular components of W0; the residual W0 − sBA is frozen"
    paper = (
        "Meng, Wang & Zhang 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large "
        "Language Models (arXiv 2404.02948)"
    )
    test_params = {"rank": 2, "alpha": 2.0, "target_roles": ["q", "v"]}

    def make_layer(self, base, layer, model):
        cfg: PiSSAConfig = self.config
        # A full SVD is a function of W0: a fresh model recomputes A0, B0, so the file does not carry them.
        adapted = PiSSALinear(base, cfg.rank, cfg.scaling(), cfg.dropout, keep_initial=cfg.svd_niter > 0)
        adapted.initialise_from(*principal_factors(base.weight, cfg.rank, cfg.scaling(), cfg.svd_niter))
        return adapted

    def peft_lora_options(self) -> PeftLoraOptions:
        niter = self.config.svd_niter
        return self.config.peft_lora_options(init="pissa" if niter == 0 else f"pissa_niter_{niter}")

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        return sum(r * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))
