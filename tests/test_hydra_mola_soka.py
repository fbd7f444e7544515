"""Hydra, MoLA and SoKA against their equations, on hand-sized layers, and trained through the one loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine.methods import build_method
from engine.methods.hydra import HydraLinear
from engine.methods.mola import MoLA, MoLALinear, experts_for_block, parse_expert_pattern
from engine.methods.soka import (
    SoKALinear,
    kronecker_factor_shapes,
    kronecker_sum,
    kronecker_sum_apply,
    kronecker_svd,
    select_rank,
    vlp_rearrange,
)
from engine.models import load_model
from tests.conftest import tiny_image_batch, tiny_text_batch, train_tiny

# --- Hydra -----------------------------------------------------------------------------------------


def _random_hydra(bias: bool, seed: int = 0, branch_bias: bool = False) -> HydraLinear:
    torch.manual_seed(seed)
    layer = HydraLinear(nn.Linear(6, 5, bias=bias), parallel_rank=2, sequential_rank=3, scaling=0.7, dropout=0.0,
                        bias=branch_bias, init="kaiming")  # fmt: skip
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
        if bias:
            layer.base.bias.normal_()
    return layer


def test_hydra_forward_and_merge_follow_the_equation_with_bias():
    layer = _random_hydra(bias=True)
    w0, b0, s = layer.base.weight, layer.base.bias, layer.scaling
    bp_ap = layer.hydra_parallel_B.weight @ layer.hydra_parallel_A.weight
    bs_as = layer.hydra_sequential_B.weight @ layer.hydra_sequential_A.weight
    x = torch.randn(4, 6)
    with torch.no_grad():
        # y = W0 x + b0 + s·B_p A_p x + s·B_s A_s (W0 x + b0): the sequential branch sees the bias.
        expected = x @ w0.T + b0 + s * (x @ bp_ap.T) + s * ((x @ w0.T + b0) @ bs_as.T)
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.delta_weight(), s * (bp_ap + bs_as @ w0))
        torch.testing.assert_close(layer.delta_bias(), s * (bs_as @ b0))
        merged = layer.merged()
        torch.testing.assert_close(merged.weight, w0 + s * (bp_ap + bs_as @ w0))
        torch.testing.assert_close(merged.bias, b0 + s * (bs_as @ b0))
        torch.testing.assert_close(merged(x), layer(x))
        assert not torch.allclose(layer.delta_bias(), torch.zeros(5))  # the bias term is really exercised


def test_hydra_without_bias_has_no_delta_bias():
    layer = _random_hydra(bias=False)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert layer.delta_bias() is None
        merged = layer.merged()
        assert merged.bias is None
        torch.testing.assert_close(merged(x), layer(x))


def test_hydra_starts_as_the_pretrained_model_on_output_projections():
    base, model = load_model("tiny-vit", 4), load_model("tiny-vit", 4)
    method = build_method("hydra")
    method.apply(model)
    base.eval(), model.eval()
    roles = {l.role for l in model.adaptable_layers() if isinstance(l.module, HydraLinear)}
    assert roles == {"o", "fc2"}
    batch = tiny_image_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch))
    # tiny-vit: dim 64, MLP 256, 2 blocks. o: 2(64+64) + 2·2·64; fc2: 2(256+64) + 2·2·64; biases 2 + 2 + 2·64 each.
    assert method.adapter_param_count(model) == 2 * ((256 + 256 + 132) + (640 + 256 + 132)) == 3344
    assert method.adapter_param_count(model) == sum(p.numel() for n, p in model.named_parameters() if "hydra_" in n)


def test_hydra_official_layer_biases_xavier_and_hidden_dropout():
    """The official layer: B (A z + a) + b in both branches, A Xavier-uniform, dropout between A and B."""
    torch.manual_seed(0)
    layer = HydraLinear(nn.Linear(6, 5), parallel_rank=2, sequential_rank=3, scaling=0.7, dropout=0.5)
    a = layer.hydra_sequential_A.weight  # 3 × 5: Xavier bound √(6 / (5 + 3))
    assert a.abs().max() <= (6 / 8) ** 0.5 and a.abs().max() > 1 / 5**0.5  # above Kaiming-a=√5's bound 1/√fan_in
    assert all(torch.count_nonzero(t) == 0 for t in (layer.hydra_parallel_B.weight, layer.hydra_parallel_A.bias,
                                                     layer.hydra_sequential_B.bias))  # fmt: skip
    seen = []
    layer.hydra_dropout.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    layer.train()
    layer(torch.randn(4, 6))
    assert seen == [2, 3]  # dropout saw the hidden activations (ranks 2 and 3), not the inputs
    layer.eval()
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
        pa, pb, sa, sb = (layer.hydra_parallel_A, layer.hydra_parallel_B, layer.hydra_sequential_A,
                          layer.hydra_sequential_B)  # fmt: skip
        x, s = torch.randn(4, 6), 0.7
        h = layer.base(x)
        expected = h + s * ((x @ pa.weight.T + pa.bias) @ pb.weight.T + pb.bias) \
            + s * ((h @ sa.weight.T + sa.bias) @ sb.weight.T + sb.bias)  # fmt: skip
        torch.testing.assert_close(layer(x), expected)
        bias = layer.base.bias + s * (pb.weight @ pa.bias + pb.bias + sb.weight @ sa.weight @ layer.base.bias
                                      + sb.weight @ sa.bias + sb.bias)  # fmt: skip
        merged = layer.merged()
        torch.testing.assert_close(merged.bias, bias)
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


# --- MoLA ------------------------------------------------------------------------------------------


def _hand_mola() -> MoLALinear:
    """d_in = d_out = 2, W0 = I, b0 = 0; three rank-1 experts reading x_1, writing e_1, e_2 and 5(e_1 + e_2)."""
    base = nn.Linear(2, 2)
    layer = MoLALinear(base, num_experts=3, rank=1, scaling=1.0, top_k=2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        base.bias.zero_()
        layer.mola_router.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
        layer.mola_A.copy_(torch.tensor([[[1.0, 0.0]]] * 3))
        layer.mola_B.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[5.0], [5.0]]]))
    return layer


def test_mola_top2_routing_matches_a_hand_computation():
    layer = _hand_mola().eval()
    e = math.e
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    with torch.no_grad():
        y = layer(x)
        gates, _, _ = layer.route(x)
    # Token 1: logits (2, 1, 0) -> experts 0 and 1, weights e²/(e²+e) = e/(e+1) and 1/(e+1); expert 2 unused.
    # Token 2: logits (-2, -1, 0) -> experts 2 and 1, weights e/(e+1) and 1/(e+1); A x = -1 for every expert.
    w_hi, w_lo = e / (e + 1), 1 / (e + 1)
    expected = torch.tensor([[1 + w_hi, w_lo], [-1 - 5 * w_hi, -5 * w_hi - w_lo]])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(gates, torch.tensor([[w_hi, w_lo, 0.0], [0.0, w_lo, w_hi]]))
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))  # renormalised over the top k


def test_mola_gates_are_renormalised_top_k_on_random_inputs():
    torch.manual_seed(0)
    layer = MoLALinear(nn.Linear(8, 4), num_experts=5, rank=2, scaling=1.0, top_k=2)
    x = torch.randn(3, 7, 8)
    gates, probs, top_i = layer.route(x)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 7))
    top2 = probs.topk(2, dim=-1).values
    torch.testing.assert_close(gates.topk(2, dim=-1).values, top2 / top2.sum(-1, keepdim=True))
    assert MoLALinear(nn.Linear(8, 4), num_experts=1, rank=2, scaling=1.0, top_k=2).top_k == 1


def test_mola_expert_counts_follow_depth_groups_and_the_count_formula():
    counts = parse_expert_pattern("2,4,6,8")
    assert [experts_for_block(b, 12, counts) for b in range(12)] == [2] * 3 + [4] * 3 + [6] * 3 + [8] * 3
    assert [experts_for_block(b, 2, counts) for b in range(2)] == [2, 6]
    with pytest.raises(ValueError, match="experts_per_group"):
        build_method("mola", {"experts_per_group": "2,x"})
    model = load_model("tiny-bert", 3)
    method = build_method("mola", {"rank": 4, "target_roles": ["q", "fc1"]})
    method.apply(model)
    assert {(l.block, l.module.num_experts) for l in model.adaptable_layers(["q", "fc1"])} == {(0, 2), (1, 6)}
    # per layer E (r (d_in + d_out) + d_in): q 32→32, fc1 32→64
    expected = sum(e * (4 * (32 + 32) + 32) + e * (4 * (32 + 64) + 32) for e in (2, 6))
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "mola_" in n)
    assert method.adapter_param_count(model) == expected == trainable


def _mola_model(params: dict):
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method("mola", {"rank": 2, "target_roles": ["q", "v"], **params})
    method.apply(model)
    return model, method


def test_mola_load_balancing_loss_only_when_enabled():
    batch = tiny_text_batch(None, n=4, length=6)
    model, method = _mola_model({})
    model.train()
    model(batch)
    assert method.extra_loss(model) is None

    model, method = _mola_model({"load_balancing": True, "load_balancing_coef": 0.5})
    model.train()
    model(batch)
    layers = list(method.adapted_layers(model).values())
    per_layer = []
    for layer in layers:  # recompute E Σ f_i P_i from the layer's stored value's definition
        assert layer.balance_loss is not None
        per_layer.append(layer.balance_loss.detach())
    loss = method.extra_loss(model)
    assert loss is not None and loss.requires_grad
    torch.testing.assert_close(loss.detach(), 0.5 * torch.stack(per_layer).mean())
    loss.backward()
    assert all(l.mola_router.weight.grad is not None and l.mola_router.weight.grad.abs().sum() > 0 for l in layers)
    assert method.extra_loss(model) is None  # each forward's loss is used once


def test_mola_switch_loss_value_on_the_hand_layer():
    layer = _hand_mola()
    layer.load_balancing = True
    layer.train()
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    layer(x)
    # Slots: token 1 -> {0, 1}, token 2 -> {2, 1}: f = (1/4, 1/2, 1/4). P = mean of the two softmaxes.
    p1 = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    p2 = torch.softmax(torch.tensor([-2.0, -1.0, 0.0]), 0)
    mean_p = (p1 + p2) / 2
    expected = 3 * (torch.tensor([0.25, 0.5, 0.25]) * mean_p).sum()
    torch.testing.assert_close(layer.balance_loss.detach(), expected)
    assert layer.routed_total.tolist() == [1.0, 2.0, 1.0]


def test_mola_records_loads_and_a_thinned_history():
    from engine.methods.base import TrainContext

    model, method = _mola_model({"load_log_every": 1, "max_load_history": 4})
    batch = tiny_text_batch(None, n=3, length=5)
    model.eval()
    model(batch)
    assert all(sum(v) == 0 for v in method.expert_loads(model).values())  # evaluation is not counted
    model.train()
    for step in range(1, 11):
        with torch.no_grad():
            model(batch)
        method.on_step_end(TrainContext(model=model, step=step, total_steps=10, loss_fn=None, batches=None))
    loads = method.expert_loads(model)
    assert len(loads) == 4
    for name, shares in loads.items():
        assert sum(shares) == pytest.approx(1.0)
        layer = method.adapted_layers(model)[name]
        assert layer.routed_total.sum() == 10 * 15 * layer.top_k  # 10 forwards × 15 tokens × k slots
    steps = [h["step"] for h in method.load_history]
    assert len(steps) <= 4 and steps == sorted(steps) and steps[-1] == 10
    assert all(sum(v) == pytest.approx(1.0) for h in method.load_history for v in h["loads"].values())
    art = method.artifacts(model)
    assert art["expert_loads"] == loads and art["load_history"] == method.load_history
    assert isinstance(method, MoLA) and json.dumps(art)


# --- SoKA ------------------------------------------------------------------------------------------


def test_kronecker_sum_matches_torch_kron_and_the_vec_trick():
    torch.manual_seed(0)
    u, v = torch.randn(3, 2, 4), torch.randn(3, 5, 3)
    dense = sum(torch.kron(u[k], v[k]) for k in range(3))
    torch.testing.assert_close(kronecker_sum(u, v), dense)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(kronecker_sum_apply(u, v, x), x @ dense.T, atol=1e-5, rtol=1e-5)
    # R(U ⊗ V) = vec(U) vec(V)ᵀ: the rearrangement turns one Kronecker product into a rank-1 matrix.
    torch.testing.assert_close(
        vlp_rearrange(torch.kron(u[0], v[0]), 2, 5, 4, 3), torch.outer(u[0].flatten(), v[0].flatten())
    )


def test_kpsvd_error_is_the_tail_energy():
    torch.manual_seed(0)
    w = torch.randn(12, 15, dtype=torch.float64)
    u, v, sigma = kronecker_svd(w, 3, 4, 3, 5)  # 12 = 3·4, 15 = 3·5 -> R(W) is 9×20, 9 components
    assert sigma.numel() == 9
    for r in range(1, 10):
        error = torch.linalg.matrix_norm(w - kronecker_sum(u[:r], v[:r]))
        tail = sigma[r:].square().sum().sqrt()
        torch.testing.assert_close(error, tail, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(kronecker_sum(u, v), w)


@pytest.mark.parametrize("criterion", ["energy", "elbow"])
def test_an_exact_kronecker_product_is_recovered_at_rank_1(criterion):
    torch.manual_seed(1)
    p, q = torch.randn(4, 4), torch.randn(8, 8)
    w = torch.kron(p, q)  # 32 × 32, with the factor shapes the sqrt rule picks for 32 × 32
    base = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    method = build_method(
        "soka", {"rank_spectrum": "weight", "rank_criterion": criterion, "energy_threshold": 0.999, "max_rank": 8}
    )
    shape, rank = method.layer_plan(w)
    assert rank == 1
    layer = SoKALinear(base, shape, rank)
    torch.testing.assert_close(layer.delta_weight(), w, atol=1e-5, rtol=1e-5)
    assert layer.base.weight.abs().max() < 1e-5  # the frozen residual W0 − U⊗V vanishes


def test_rank_selection_by_energy_elbow_and_cap():
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0])  # σ² = 9, 4, 1, 1: captured 0.6, 0.867, 0.933, 1
    assert select_rank(sigma, "energy", 0.9, 8) == 3
    assert select_rank(sigma, "energy", 0.6, 8) == 1
    assert select_rank(sigma, "energy", 0.9, 2) == 2
    assert select_rank(sigma, "energy", 1.0, 8) == 4
    # Chord from (1, 10) to (6, 0.8): the point farthest below it is σ_4 = 1, so the first three are kept.
    assert select_rank(torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8]), "elbow", 0.9, 8) == 3
    assert select_rank(sigma, "fixed", 0.9, 2) == 2


def test_factor_shapes_rule():
    assert kronecker_factor_shapes(768, 768) == (24, 32, 24, 32)
    assert kronecker_factor_shapes(3072, 32) == (48, 64, 4, 8)
    assert kronecker_factor_shapes(768, 32, "sqrt_swapped") == (32, 24, 8, 4)
    assert kronecker_factor_shapes(7, 32) == (1, 7, 4, 8)  # a prime dimension leaves U_k a single row
    assert kronecker_factor_shapes(64, 32, u_rows=2, u_cols=16) == (2, 32, 16, 2)
    with pytest.raises(ValueError, match="u_rows"):
        kronecker_factor_shapes(64, 32, u_rows=3)


def test_soka_starts_as_the_pretrained_model_and_reloads_at_stored_ranks():
    base, model = load_model("tiny-bert", 3), load_model("tiny-bert", 3)
    method = build_method("soka", {"target_roles": ["q", "fc1"], "energy_threshold": 0.5, "max_rank": 6})
    method.apply(model)
    base.eval(), model.eval()
    batch = tiny_text_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch), atol=1e-5, rtol=1e-5)
    ranks = method.state()["ranks"]
    assert len(ranks) == 4 and all(1 <= r <= 6 for r in ranks.values())
    # q: 32 = 4·8 both ways -> U 4×4, V 8×8; fc1: 64 = 8·8 out, 32 = 4·8 in -> U 8×4, V 8×8.
    expected = sum(r * ((16 + 64) if ".query" in n else (32 + 64)) for n, r in ranks.items())
    assert method.adapter_param_count(model) == expected
    # A reload that asks for other ranks re-splits the same effective weight W_res + ΔW.
    name, layer = next(iter(method.adapted_layers(model).items()))
    before = (layer.base.weight + layer.delta_weight()).detach().clone()
    method.load_state(model, {"ranks": {name: layer.rank + 1}})
    assert layer.rank == ranks[name] + 1 and layer.soka_U.requires_grad
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), before, atol=1e-5, rtol=1e-5)


# --- training through the one loop -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        {"name": "hydra", "parallel_rank": 2, "sequential_rank": 2},
        {"name": "mola", "rank": 2, "experts_per_group": "2,4", "load_balancing": True, "load_log_every": 2},
        {"name": "soka", "max_rank": 4, "target_roles": ["q", "v"]},
    ],
    ids=lambda m: m["name"],
)
def test_trains_through_the_loop_and_reloads(method, tmp_path):
    from engine.train import evaluate, prepare

    spec, result, reporter = train_tiny(method, tmp_path)
    adapter = load_file(result.artifacts["adapter"])
    config = json.loads(open(result.artifacts["adapter_config"]).read())

    if method["name"] == "hydra":  # B started at zero and has moved
        assert all(adapter[k].abs().sum() > 0 for k in adapter if k.endswith("hydra_sequential_B.weight"))
    if method["name"] == "mola":
        analysis = json.loads(open(result.artifacts["method_analysis"]).read())
        assert set(analysis["experts_per_layer"].values()) == {2, 4}
        assert all(sum(v) == pytest.approx(1.0) for v in analysis["expert_loads"].values())
        assert [h["step"] for h in analysis["load_history"]] == [2, 4]
    if method["name"] == "soka":
        analysis = json.loads(open(result.artifacts["method_analysis"]).read())
        assert analysis["ranks"] == config["method_state"]["ranks"]

    prep = prepare(spec)
    prep.method.load_state(prep.model, config["method_state"])
    prep.method.load_adapter_state_dict(prep.model, adapter)
    metrics = evaluate(prep.model, prep.data.eval, 32, prep.device)
    assert metrics["eval_loss"] == pytest.approx(result.final_metrics["eval_loss"], abs=1e-5)
    assert result.adapter_params == prep.method.adapter_param_count(prep.model)


@pytest.mark.parametrize("rank", [1, 8])
def test_soka_dense_and_vec_trick_routes_agree_in_value_and_gradient(rank):
    """The forward picks the cheaper route by its FLOP count; both must give the same output and gradients."""
    torch.manual_seed(0)
    layer = SoKALinear(nn.Linear(96, 64), kronecker_factor_shapes(64, 96), rank)
    x = torch.randn(5, 7, 96, requires_grad=True)
    outputs, grads = [], []
    for dense in (True, False):
        layer.uses_dense_path = lambda dense=dense: dense  # force the route on this instance
        out = layer(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([t.grad.clone() for t in (x, layer.soka_U, layer.soka_V)])
        for t in (x, layer.soka_U, layer.soka_V):
            t.grad = None
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    del layer.uses_dense_path
    assert layer.uses_dense_path() == (rank == 8)  # 96 = 8·12, 64 = 8·8: r·n1·m2·(n2+m1) vs d_out·d_in / 4


def test_soka_reads_ranks_from_the_update_spectrum_and_records_the_cap():
    """Default: the rank comes from the KPSVD spectrum of −Σ∂L/∂W (calibration), elbow over the leading values."""
    from itertools import islice

    from engine.methods.soka import kronecker_svd

    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method("soka", {"target_roles": ["q", "fc1"], "max_rank": 2, "calibration_batches": 2})
    method.apply(model)
    assert all(r == 2 for r in method.ranks().values())  # max_rank until calibration
    batches = [tiny_text_batch(model, n=4, seed=s) for s in range(2)]
    loss_fn = lambda b: torch.nn.functional.cross_entropy(model(b), b["labels"])  # noqa: E731
    estimate = method.update_estimate(model, iter(batches), loss_fn)
    ranks = method.choose_ranks_from_update(model, islice(iter(batches), 2), loss_fn)
    for name, layer in method.adapted_layers(model).items():
        _, _, sigma = kronecker_svd(estimate[name], *layer.factor_shape)
        s = sigma.double()[:16]
        chord = s[0] + (s[-1] - s[0]) * torch.arange(len(s), dtype=torch.float64) / (len(s) - 1)
        asked = max(1, int(torch.argmax(chord - s)))  # the elbow, by hand
        assert method.asked[name] == asked and ranks[name] == min(asked, 2)
    assert method.capped_layers() == [n for n, a in method.asked.items() if a > 2]
    state = method.state()
    assert state["ranks"] == ranks and state["ranked_on"] == "update"
    assert state["capped_layers"] == method.capped_layers()


def test_soka_update_estimate_is_minus_the_summed_gradient_of_the_effective_weight():
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method("soka", {"target_roles": ["q"], "max_rank": 2})
    method.apply(model)
    batches = [tiny_text_batch(model, n=4, seed=s) for s in range(2)]
    loss_fn = lambda b: torch.nn.functional.cross_entropy(model(b), b["labels"])  # noqa: E731
    estimate = method.update_estimate(model, iter(batches), loss_fn)
    name, layer = next(iter(method.adapted_layers(model).items()))
    # the same gradient through a dense effective weight W_res + ΔW, taken by hand with a hook-free copy
    w = (layer.base.weight + layer.delta_weight()).detach().requires_grad_(True)
    original = layer.forward
    layer.forward = lambda x: torch.nn.functional.linear(x, w, layer.base.bias)  # type: ignore[method-assign]
    try:
        model.eval()
        g = sum(torch.autograd.grad(loss_fn(b), w)[0] for b in batches)
    finally:
        layer.forward = original  # type: ignore[method-assign]
    torch.testing.assert_close(estimate[name], -g, atol=1e-6, rtol=1e-5)
