"""Merging checkpoints and adapters: metric-weighted averaging (MWA) and the linear, TIES and DARE baselines.

All functions are pure: they take tensors or state dicts (name -> tensor) and return new ones; nothing here
loads a model or touches a file.

* **MWA** (metrics-weighted averaging; Yu & Choi 2025, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
  Averaging", arXiv 2504.18580; in the family of SWA, Izmailov et al. 2018, and model soups, Wortsman et al. 2022):
  K checkpoints of one run, or the final adapters of several runs of one method, averaged with weights
  ``w_i ∝ m_i^p`` where ``m_i = 1/loss_i`` ("loss") or ``m_i = step_i`` ("step"); ``p = 0`` is the uniform mean,
  larger ``p`` leans harder on the best (or latest) checkpoint. ``θ = Σ_i w_i θ_i`` (``mwa_weights``,
  ``average_state_dicts``).
* **LoRA-family ΔW merging**: averaging ``B_i`` and ``A_i`` separately is not averaging ``ΔW_i = B_i A_i``
  (cross terms). ``merge_low_rank`` forms ``ΔW = Σ_i w_i B_i A_i`` and re-factorises it by truncated SVD,
  ``B' = U_r √S_r``, ``A' = √S_r V_rᵀ`` (exact when ``rank(ΔW) ≤ r``), reporting the relative Frobenius error.
* **Baselines on task vectors** ``τ_i = θ_i − θ_base`` (as PEFT's ``add_weighted_adapter``): ``linear``
  (``θ_base + Σ λ_i τ_i``), **TIES** (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models", NeurIPS; trim, elect sign, disjoint merge) and **DARE** (Yu et al. 2023, "Language Models are Super
  Mario", arXiv 2311.03099; drop each entry with probability p, rescale by 1/(1−p)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

StateDict = Mapping[str, torch.Tensor]
MwaMetric = Literal["loss", "step"]
SignMethod = Literal["total", "frequency"]


# --- metric-weighted averaging --------------------------------------------------------------------


def mwa_weights(values: Sequence[float], metric: MwaMetric = "loss", p: float = 1.0) -> list[float]:
    """Merge weights ``w_i = m_i^p / Σ_j m_j^p`` with ``m_i = 1/loss_i`` ("loss") or ``m_i = step_i`` ("step").

    ``values`` are the checkpoints' losses (any positive loss, e.g. the evaluation loss) or steps. ``p = 0``
    gives the uniform average; ``p < 0`` is allowed (it favours high-loss or early checkpoints) but rarely wanted.
    """
    if not values:
        raise ValueError("mwa_weights needs at least one checkpoint")
    if metric not in ("loss", "step"):
        raise ValueError(f"unknown MWA metric {metric!r}: use 'loss' or 'step'")
    if any(not v > 0 for v in values):
        raise ValueError(f"MWA {metric} values must all be positive, got {list(values)}")
    merit = torch.tensor([1.0 / v if metric == "loss" else float(v) for v in values], dtype=torch.float64)
    # In log space, so large steps or tiny losses with a large p do not overflow.
    return torch.softmax(p * merit.log(), dim=0).tolist()


def _check_same_keys(state_dicts: Sequence[StateDict]) -> list[str]:
    if not state_dicts:
        raise ValueError("nothing to merge: no state dicts given")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ValueError(f"state dict {i} does not have the same tensors as state dict 0: {diff[:3]}")
        for key in keys:
            if sd[key].shape != state_dicts[0][key].shape:
                raise ValueError(
                    f"tensor {key}: shape {tuple(sd[key].shape)} in state dict {i}, "
                    f"{tuple(state_dicts[0][key].shape)} in state dict 0"
                )
    return keys


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ w_i t_i`` computed in float32 (float64 if the inputs are), returned in the inputs' dtype."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    total = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for t, w in zip(tensors, weights, strict=True):
        total += w * t.to(dtype)
    return total.to(tensors[0].dtype)


def average_state_dicts(state_dicts: Sequence[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``θ = Σ_i w_i θ_i`` tensor by tensor. Non-float tensors (counters, index buffers) must agree and are copied."""
    if len(weights) != len(state_dicts):
        raise ValueError(f"{len(weights)} weights for {len(state_dicts)} state dicts")
    merged = {}
    for key in _check_same_keys(state_dicts):
        tensors = [sd[key] for sd in state_dicts]
        if tensors[0].is_floating_point():
            merged[key] = _weighted_sum(tensors, weights)
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ValueError(f"tensor {key} is not floating point and differs between state dicts")
            merged[key] = tensors[0].clone()
    return merged


def mwa_merge(
    state_dicts: Sequence[StateDict], values: Sequence[float], metric: MwaMetric = "loss", p: float = 1.0
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Metric-weighted average of checkpoints: returns the merged state dict and the weights used."""
    weights = mwa_weights(values, metric, p)
    return average_state_dicts(state_dicts, weights), weights


# --- low-rank (LoRA-family) merging ---------------------------------------------------------------


@dataclass
class LowRankMerge:
    """``scale_out · B @ A`` approximates the merged ΔW; ``relative_error = ‖ΔW − scale_out·B A‖_F / ‖ΔW‖_F``."""

    B: torch.Tensor
    A: torch.Tensor
    relative_error: float
    singular_values: torch.Tensor  # of the merged ΔW / scale_out, all of them (for a spectrum plot)


def merge_low_rank(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    scale_in: float = 1.0,
    scale_out: float = 1.0,
) -> LowRankMerge:
    """Merge ``ΔW = scale_in · Σ_i w_i B_i A_i`` and re-factorise it at ``rank`` by truncated SVD.

    ``factors`` are ``(B_i, A_i)`` with ``B_i ∈ R^{d_out×r_i}``, ``A_i ∈ R^{r_i×d_in}`` (ranks may differ). The
    result satisfies ``scale_out · B' A' ≈ ΔW`` with ``B' = U_r √S_r``, ``A' = √S_r V_rᵀ`` (the split PiSSA uses);
    the approximation is the best rank-r one (Eckart–Young) and exact when ``rank(ΔW) ≤ rank``. For LoRA with
    ``s = α/r``, pass ``scale_in = α/r_old`` and ``scale_out = α/rank``.
    """
    if len(factors) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(factors)} (B, A) pairs")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    b0, a0 = factors[0]
    dtype = torch.float64 if b0.dtype == torch.float64 else torch.float32
    delta = torch.zeros(b0.shape[0], a0.shape[1], dtype=dtype, device=b0.device)
    for (b, a), w in zip(factors, weights, strict=True):
        delta += w * (b.to(dtype) @ a.to(dtype))
    delta *= scale_in
    result = refactorise(delta, rank, scale_out)
    return LowRankMerge(B=result.B.to(b0.dtype), A=result.A.to(a0.dtype), relative_error=result.relative_error,
                        singular_values=result.singular_values)  # fmt: skip


def refactorise(delta: torch.Tensor, rank: int, scale_out: float = 1.0) -> LowRankMerge:
    """Factors of a dense ``ΔW`` at ``rank`` by truncated SVD: ``scale_out · B A ≈ ΔW`` with ``B = U_r √S_r``,
    ``A = √S_r V_rᵀ`` (best rank-r, Eckart–Young; exact when ``rank(ΔW) ≤ rank``), padded with zeros when ΔW has
    fewer components than ``rank``; the relative Frobenius error is returned with them."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta / scale_out, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    new_b, new_a = u[:, :r] * root, root.unsqueeze(1) * vh[:r]
    if r < rank:  # ΔW is smaller than the requested rank: pad with zeros so the shapes are the requested ones
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - r)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(rank - r, new_a.shape[1])], dim=0)
    norm = torch.linalg.matrix_norm(delta)
    error = torch.linalg.matrix_norm(delta - scale_out * (new_b @ new_a))
    relative = float(error / norm) if norm > 0 else 0.0
    return LowRankMerge(B=new_b, A=new_a, relative_error=relative, singular_values=s)


def merge_lora_state_dicts(
    state_dicts: Sequence[StateDict],
    weights: Sequence[float],
    rank: int | None = None,
    factor_names: Sequence[tuple[str, str]] = (("lora_A.weight", "lora_B.weight"),),
    scale_in: float = 1.0,
    scale_out: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Average adapters of the LoRA family by their ΔW, re-factorised; every other tensor is averaged directly.

    ``factor_names`` lists the (A, B) key suffixes of each low-rank pair (LoRA: ``lora_A.weight``,
    ``lora_B.weight``; Hydra has two pairs, and since its ΔW is linear in ``B_s A_s`` for a fixed W0, merging
    that product is merging ΔW). Keys ``<module>.<A suffix>`` and ``<module>.<B suffix>`` form one
    ΔW = B A per module. ``rank`` defaults to each pair's own rank. Returns the merged state dict and the relative
    reconstruction error per module (0 when the rank suffices).
    """
    keys = _check_same_keys(state_dicts)
    pairs: dict[str, tuple[str, str]] = {}
    for a_suffix, b_suffix in factor_names:
        for key in keys:
            if key.endswith("." + a_suffix):
                module = key[: -len(a_suffix) - 1]
                b_key = f"{module}.{b_suffix}"
                if b_key not in keys:
                    raise ValueError(f"{key} has no matching {b_key}")
                pairs[key] = (module, b_key)
    factored = {k for a_key, (_, b_key) in pairs.items() for k in (a_key, b_key)}
    rest = [k for k in keys if k not in factored]
    merged = average_state_dicts([{k: sd[k] for k in rest} for sd in state_dicts], weights)
    errors = {}
    for a_key, (module, b_key) in pairs.items():
        result = merge_low_rank(
            [(sd[b_key], sd[a_key]) for sd in state_dicts],
            weights,
            rank or state_dicts[0][a_key].shape[0],
            scale_in,
            scale_out,
        )
        merged[a_key], merged[b_key] = result.A, result.B
        errors[module] = result.relative_error
    return merged, errors


# --- task-vector baselines: linear, TIES, DARE ----------------------------------------------------


def task_vectors(state_dicts: Sequence[StateDict], base: StateDict) -> list[dict[str, torch.Tensor]]:
    """``τ_i = θ_i − θ_base`` for the floating-point tensors of ``base``."""
    _check_same_keys([base, *state_dicts])
    return [{k: sd[k] - base[k] for k in base if base[k].is_floating_point()} for sd in state_dicts]


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 (trim): keep the ``⌊density·n⌋`` entries of largest magnitude, zero the rest."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def elect_sign_and_merge(
    trimmed: Sequence[torch.Tensor], weights: Sequence[float], sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES steps 2-3: elect the sign of each entry, then average the entries that agree with it.

    ``total``: the elected sign is that of ``Σ_i τ̂_i`` (the paper's "mass"); ``frequency``: the more frequent sign.
    Ties go to +. The disjoint mean divides the weighted sum of agreeing entries by their count (zeros do not
    count), as PEFT; with all weights 1 it is the paper's disjoint mean and a common weight is its λ.
    """
    stacked = torch.stack(list(trimmed))
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = signs == elected
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    total = (stacked * w * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def ties_tensor(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float, sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES-merging of one tensor's task vectors (Yadav et al. 2023, Alg. 1): trim, elect sign, disjoint merge."""
    return elect_sign_and_merge([trim_by_magnitude(t, density) for t in tensors], weights, sign_method)


def dare_drop(tensor: torch.Tensor, drop_prob: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2023): zero each entry with probability p, rescale the survivors by 1/(1−p)."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop probability must be in [0, 1), got {drop_prob}")
    keep = torch.bernoulli(torch.full(tensor.shape, 1.0 - drop_prob, dtype=torch.float32), generator=generator)
    return tensor * keep.to(device=tensor.device, dtype=tensor.dtype) / (1.0 - drop_prob)


def _merge_task_vectors(
    state_dicts: Sequence[StateDict], base: StateDict, merge_tensor: Callable[[list[torch.Tensor]], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``θ_base + merge_tensor(τ_1..τ_K)`` for every floating-point tensor; other tensors are copied from base."""
    vectors = task_vectors(state_dicts, base)
    merged = {}
    for key, value in base.items():
        if not value.is_floating_point():
            merged[key] = value.clone()
            continue
        merged[key] = value + merge_tensor([tv[key] for tv in vectors]).to(value.dtype)
    return merged


def linear_merge(
    state_dicts: Sequence[StateDict], base: StateDict, weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``θ = θ_base + Σ_i λ_i (θ_i − θ_base)`` (weights not normalised)."""
    return _merge_task_vectors(state_dicts, base, lambda ts: _weighted_sum(ts, weights))


def ties_merge(
    state_dicts: Sequence[StateDict],
    base: StateDict,
    weights: Sequence[float],
    density: float = 0.2,
    sign_method: SignMethod = "total",
) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al. 2023): ``θ = θ_base + ties(τ_1..τ_K)`` tensor by tensor.

    The trim keeps the top ``density`` share of each tensor of each task vector (PEFT's choice; the paper trims
    over the whole flattened task vector). Default density 0.2 (the paper's top-20%).
    """
    return _merge_task_vectors(state_dicts, base, lambda ts: ties_tensor(ts, weights, density, sign_method))


def dare_merge(
    state_dicts: Sequence[StateDict],
    base: StateDict,
    weights: Sequence[float],
    drop_prob: float = 0.9,
    seed: int = 0,
    combine: Literal["linear", "ties"] = "linear",
    sign_method: SignMethod = "total",
) -> dict[str, torch.Tensor]:
    """DARE (Yu et al. 2023): drop-and-rescale every task vector, then combine them linearly or by TIES' sign step.

    One generator seeded with ``seed`` draws the masks in the order of ``base``'s keys, task vector by task
    vector, so a merge is reproducible. ``combine="ties"`` is PEFT's ``dare_ties`` (no magnitude trim).
    Default p = 0.9 (the paper drops 90% of the delta parameters, and shows up to 99% can work).
    """
    generator = torch.Generator().manual_seed(seed)

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        dropped = [dare_drop(t, drop_prob, generator) for t in tensors]
        if combine == "linear":
            return _weighted_sum(dropped, weights)
        return elect_sign_and_merge(dropped, weights, sign_method)

    return _merge_task_vectors(state_dicts, base, merge)
