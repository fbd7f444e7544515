"""Checkpoint merging: MWA weights and averages, low-rank ΔW re-factorisation, and the linear/TIES/DARE baselines."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from engine.merging import (
    average_state_dicts,
    dare_drop,
    dare_merge,
    linear_merge,
    merge_lora_state_dicts,
    merge_low_rank,
    mwa_merge,
    mwa_weights,
    ties_merge,
    ties_tensor,
    trim_by_magnitude,
)
from engine.methods import build_method
from engine.models import load_model

# --- MWA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["loss", "step"])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 3.0])
def test_mwa_weights_sum_to_one(metric, p):
    weights = mwa_weights([0.9, 0.5, 0.7, 2.0] if metric == "loss" else [100, 200, 300, 400], metric, p)
    assert len(weights) == 4 and sum(weights) == pytest.approx(1.0)
    assert all(w > 0 for w in weights)


def test_mwa_weights_by_hand():
    assert mwa_weights([1.0, 2.0, 4.0], "loss", 0.0) == pytest.approx([1 / 3] * 3)
    assert mwa_weights([1.0, 2.0, 4.0], "loss", 1.0) == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # ∝ 1/loss
    assert mwa_weights([1, 2, 3], "step", 2.0) == pytest.approx([1 / 14, 4 / 14, 9 / 14])  # ∝ step²
    heavy = mwa_weights([100_000, 200_000], "step", 200.0)  # 2^200 would overflow a float32 ratio naively
    assert heavy == pytest.approx([0.0, 1.0]) and sum(heavy) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        mwa_weights([0.5, 0.0], "loss", 1.0)
    with pytest.raises(ValueError, match="metric"):
        mwa_weights([1.0], "accuracy", 1.0)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(5)}


def test_p_zero_is_the_uniform_mean():
    states = [_state(s) for s in range(3)]
    merged, weights = mwa_merge(states, [0.3, 1.0, 5.0], "loss", p=0.0)
    assert weights == pytest.approx([1 / 3] * 3)
    for key in ("w", "b"):
        torch.testing.assert_close(merged[key], torch.stack([s[key] for s in states]).mean(0))
    assert torch.equal(merged["ids"], torch.arange(5))  # integer buffers are copied, not averaged


def test_mwa_merge_weights_the_checkpoints():
    states = [_state(s) for s in range(2)]
    merged, weights = mwa_merge(states, [1.0, 3.0], "loss", p=1.0)  # w = (3/4, 1/4)
    assert weights == pytest.approx([0.75, 0.25])
    torch.testing.assert_close(merged["w"], 0.75 * states[0]["w"] + 0.25 * states[1]["w"])


def test_average_rejects_mismatched_state_dicts():
    a, b = _state(0), _state(1)
    with pytest.raises(ValueError, match="same tensors"):
        average_state_dicts([a, {"w": b["w"]}], [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([a, {**b, "w": torch.zeros(4, 3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="differs"):
        average_state_dicts([a, {**b, "ids": torch.arange(5) + 1}], [0.5, 0.5])


# --- low-rank ΔW merging ---------------------------------------------------------------------------


def _pairs(rank: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(10, rank, generator=g, dtype=torch.float64),
            torch.randn(rank, 7, generator=g, dtype=torch.float64),
        )
        for _ in range(2)
    ]


def test_svd_refactorisation_is_exact_when_the_rank_suffices():
    pairs, weights = _pairs(2), [0.3, 0.7]
    delta = sum(w * b @ a for (b, a), w in zip(pairs, weights))  # rank ≤ 4
    exact = merge_low_rank(pairs, weights, rank=4)
    assert exact.B.shape == (10, 4) and exact.A.shape == (4, 7)
    assert exact.relative_error < 1e-12
    torch.testing.assert_close(exact.B @ exact.A, delta)
    padded = merge_low_rank(pairs, weights, rank=9)  # more than rank(ΔW) ≤ 7: zero-padded factors
    assert padded.B.shape == (10, 9) and padded.relative_error < 1e-12
    # With rescaling: scale_out · B'A' = scale_in · Σ w_i B_i A_i (LoRA changing rank keeps α/r consistent).
    scaled = merge_low_rank(pairs, weights, rank=4, scale_in=2.0, scale_out=0.5)
    torch.testing.assert_close(0.5 * scaled.B @ scaled.A, 2.0 * delta)


def test_svd_refactorisation_error_is_the_tail_energy_when_truncated():
    pairs, weights = _pairs(3, seed=1), [0.5, 0.5]
    delta = sum(w * b @ a for (b, a), w in zip(pairs, weights))
    result = merge_low_rank(pairs, weights, rank=2)
    sigma = torch.linalg.svdvals(delta)
    expected = float(sigma[2:].square().sum().sqrt() / sigma.square().sum().sqrt())
    assert result.relative_error == pytest.approx(expected, rel=1e-9) and result.relative_error > 0.1


def test_lora_state_dicts_merge_by_delta_weight():
    torch.manual_seed(0)
    states, deltas = [], []
    for seed in (1, 2):
        model = load_model("tiny-bert", 3)
        method = build_method("lora", {"rank": 2, "alpha": 4, "target_roles": ["q", "v"]})
        method.apply(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        states.append(method.adapter_state_dict(model))
        deltas.append(method.delta_weights(model))
    merged, errors = merge_lora_state_dicts(states, [0.25, 0.75], rank=4)
    assert len(errors) == 4 and max(errors.values()) < 1e-5
    # Load into a rank-4 LoRA with the same scaling α/r = 2: its ΔW is the weighted mean of the ΔW_i.
    target = load_model("tiny-bert", 3)
    target_method = build_method("lora", {"rank": 4, "alpha": 8, "target_roles": ["q", "v"]})
    target_method.apply(target)
    target_method.load_adapter_state_dict(target, merged)
    for name, dw in target_method.delta_weights(target).items():
        torch.testing.assert_close(dw, 0.25 * deltas[0][name] + 0.75 * deltas[1][name], atol=1e-5, rtol=1e-4)
    head = next(k for k in merged if k.endswith("classifier.weight"))
    torch.testing.assert_close(merged[head], 0.25 * states[0][head] + 0.75 * states[1][head])
    # Keeping the original rank 2 truncates a rank-4 sum: the error is reported.
    _, truncated = merge_lora_state_dicts(states, [0.25, 0.75])
    assert min(truncated.values()) > 1e-3


# --- baselines -------------------------------------------------------------------------------------

TAUS = [
    torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0]),
    torch.tensor([-2.0, 1.5, -3.0, 0.1, 1.0]),
    torch.tensor([1.2, 0.2, -1.0, -5.0, 2.0]),
]


def test_ties_small_example_by_hand():
    # Trim to 3 of 5 entries: [3, 0, 0, 2, -4], [-2, 1.5, -3, 0, 0], [1.2, 0, 0, -5, 2].
    torch.testing.assert_close(trim_by_magnitude(TAUS[0], 0.6), torch.tensor([3.0, 0.0, 0.0, 2.0, -4.0]))
    # Signs by total mass: (+2.2, +1.5, -3, -3, -2) -> means of agreeing entries: (3+1.2)/2, 1.5, -3, -5, -4.
    merged = ties_tensor(TAUS, [1.0, 1.0, 1.0], density=0.6)
    torch.testing.assert_close(merged, torch.tensor([2.1, 1.5, -3.0, -5.0, -4.0]))
    # Signs by count: entries 3 and 4 have one + and one - (tie -> +), so only the positive entry 2 is kept.
    by_count = ties_tensor(TAUS, [1.0, 1.0, 1.0], density=0.6, sign_method="frequency")
    torch.testing.assert_close(by_count, torch.tensor([2.1, 1.5, -3.0, 2.0, 2.0]))
    # Weights scale the entries; the disjoint mean still divides by the count: (1·3 + 0.5·1.2) / 2.
    weighted = ties_tensor(TAUS, [1.0, 2.0, 0.5], density=0.6)
    assert float(weighted[0]) == pytest.approx(1.8)
    # On state dicts the merge is relative to the base.
    base = {"w": torch.ones(5)}
    out = ties_merge([{"w": 1 + t} for t in TAUS], base, [1.0, 1.0, 1.0], density=0.6)
    torch.testing.assert_close(out["w"], 1 + torch.tensor([2.1, 1.5, -3.0, -5.0, -4.0]))


def test_ties_equals_peft():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 9, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, 0.8]
    for method in ("total", "frequency"):
        ours = ties_tensor(tensors, weights, density=0.3, sign_method=method)
        theirs = merge_utils.ties(tensors, torch.tensor(weights), density=0.3, majority_sign_method=method)
        torch.testing.assert_close(ours, theirs)


def test_dare_small_example_by_hand():
    tau = torch.tensor([2.0, -4.0, 6.0, 8.0, -1.0, 3.0, 5.0, -7.0])
    dropped = dare_drop(tau, 0.75, torch.Generator().manual_seed(3))
    kept = dropped != 0
    assert 0 < int(kept.sum()) < 8  # this seed keeps some and drops some entries
    torch.testing.assert_close(dropped[kept], 4.0 * tau[kept])  # survivors rescaled by 1/(1 − 0.75)
    again = dare_drop(tau, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(again, dropped)  # seeded: reproducible
    torch.testing.assert_close(dare_drop(tau, 0.0, torch.Generator().manual_seed(3)), tau)  # p = 0: no drop
    # State dicts: base + Σ w_i DARE(τ_i); with p = 0 this is the linear merge θ = 1 + 0.5·τ_1 + 2·τ_2.
    base = {"w": torch.ones(8)}
    states = [{"w": 1 + tau}, {"w": 1 - tau / 2}]
    linear = linear_merge(states, base, [0.5, 2.0])
    torch.testing.assert_close(linear["w"], 1 + 0.5 * tau - tau)
    torch.testing.assert_close(dare_merge(states, base, [0.5, 2.0], drop_prob=0.0)["w"], linear["w"])


def test_dare_drops_the_right_share_and_equals_peft():
    tau = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    dropped = dare_drop(tau, 0.9, torch.Generator().manual_seed(1))
    assert float((dropped != 0).float().mean()) == pytest.approx(0.1, abs=0.01)
    tensors = [torch.randn(5, 7, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    base = {"w": torch.zeros(5, 7)}
    ours = dare_merge([{"w": t} for t in tensors], base, [0.2, 0.3, 0.5], drop_prob=0.6, seed=7)["w"]
    torch.manual_seed(7)  # PEFT draws its masks from the global generator, in the same order
    theirs = merge_utils.dare_linear(tensors, torch.tensor([0.2, 0.3, 0.5]), density=0.4)
    torch.testing.assert_close(ours, theirs)
    ours_ties = dare_merge([{"w": t} for t in tensors], base, [0.2, 0.3, 0.5], 0.6, seed=7, combine="ties")["w"]
    torch.manual_seed(7)
    theirs_ties = merge_utils.dare_ties(tensors, torch.tensor([0.2, 0.3, 0.5]), density=0.4)
    torch.testing.assert_close(ours_ties, theirs_ties)
