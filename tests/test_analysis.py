"""Analyses against known answers: spectra, landscapes, importance tables, the norm profiler, method comparison."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from engine.analysis import layer_role_block
from engine.analysis.compare import (
    differences_only,
    ema,
    export_csv,
    filter_runs,
    learning_curves,
    method_summary,
    pareto_front,
)
from engine.analysis.importance import (
    LayerNormProfiler,
    artifact_tables,
    head_importance_table,
    norm_profile_table,
    router_load_table,
    router_mean_table,
    sharing_table,
    snapshot_table,
)
from engine.analysis.landscape import (
    dot,
    evaluate_points,
    interpolation,
    landscape_1d,
    landscape_2d,
    limit_examples,
    load_landscape,
    make_objective,
    normalize_direction,
    random_directions,
    save_landscape,
    trainable_parameters,
)
from engine.analysis.spectra import (
    adapter_spectra,
    cumulative_energy,
    dense_singular_values,
    effective_rank,
    energy_rank,
    intruder_dimensions,
    layer_spectrum,
    load_spectra,
    low_rank_singular_values,
    save_spectra,
    stable_rank,
    update_spectra,
)
from engine.methods import Method, TrainContext, build_method, get_method, method_names
from engine.models import load_model
from engine.train import classification_loss
from tests.conftest import tiny_text_batch

# --- spectra -------------------------------------------------------------------------------------


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_rank_two_update_has_two_singular_values_and_factors_equal_dense():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(24, 2, generator=g), torch.randn(2, 40, generator=g)
    base = torch.randn(24, 40, generator=g)
    dense = layer_spectrum(base, delta=b @ a, intruder_k=0)
    factored = layer_spectrum(base, factors=(b, a), intruder_k=0)
    assert dense.source == "dense" and factored.source == "factors"
    assert len(dense.sigma) == 24 and np.count_nonzero(dense.sigma) == 2
    assert len(factored.sigma) == 2 and dense.scalars["rank"] == factored.scalars["rank"] == 2
    np.testing.assert_allclose(factored.sigma, dense.sigma[:2], rtol=1e-5)
    np.testing.assert_allclose(low_rank_singular_values(b, a).numpy(), dense_singular_values(b @ a)[:2], rtol=1e-5)
    for key in ("delta_fro", "effective_rank", "stable_rank", "relative_update", "energy_rank_90"):
        assert factored.scalars[key] == pytest.approx(dense.scalars[key], rel=1e-5)
    assert dense.scalars["relative_update"] == pytest.approx(
        float(torch.linalg.matrix_norm(b @ a) / torch.linalg.matrix_norm(base)), rel=1e-5
    )


def test_factor_route_with_rank_larger_than_the_matrix():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(5, 9, generator=g), torch.randn(9, 7, generator=g)  # r = 9 > min(5, 7)
    np.testing.assert_allclose(low_rank_singular_values(b, a).numpy(), dense_singular_values(b @ a), rtol=1e-4)


def test_effective_rank_stable_rank_and_energy_known_cases():
    assert effective_rank(np.full(5, 3.0)) == pytest.approx(5.0)
    assert effective_rank(np.array([2.0, 2.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(np.array([7.0])) == pytest.approx(1.0)
    assert effective_rank(np.zeros(3)) == 0.0
    p = np.array([3.0, 1.0]) / 4.0
    assert effective_rank(np.array([3.0, 1.0])) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert stable_rank(np.array([2.0, 1.0, 1.0])) == pytest.approx(6.0 / 4.0)
    sigma = dense_singular_values(torch.diag(torch.tensor([3.0, 4.0]))).numpy()
    assert stable_rank(sigma) == pytest.approx(25.0 / 16.0)
    np.testing.assert_allclose(cumulative_energy(np.array([4.0, 3.0])), [16 / 25, 1.0])
    assert energy_rank(np.array([4.0, 3.0]), 0.6) == 1 and energy_rank(np.array([4.0, 3.0]), 0.9) == 2
    assert energy_rank(np.zeros(4)) == 0


def test_intruder_dimensions_none_for_zero_update_one_for_a_new_direction():
    n = 16
    u, v = _orthogonal(n, 0), _orthogonal(n, 1)
    s = torch.linspace(10.0, 1.0, n, dtype=torch.float64)
    w0 = (u * s) @ v.T
    assert intruder_dimensions(w0, w0, k=10) == []
    # A large update along directions spread over W0's bottom 9 singular vectors (|cos| = 1/3 with each of them),
    # orthogonal to the top ones: it becomes the top singular vector of W0 + ΔW and is the only intruder.
    new_u = u[:, -9:].sum(1) / 3.0
    new_v = v[:, -9:].sum(1) / 3.0
    delta = 50.0 * torch.outer(new_u, new_v)
    assert intruder_dimensions(w0, w0 + delta, k=10, epsilon=0.5) == [0]
    spectrum = layer_spectrum(w0.float(), delta=delta.float(), intruder_k=10, intruder_epsilon=0.5)
    assert spectrum.scalars["intruders"] == 1
    assert spectrum.intruder_similarity[0] == pytest.approx(1 / 3, abs=0.05)  # W0's bottom block tilts it a little
    assert np.all(spectrum.intruder_similarity[1:8] > 0.99)  # W0's 7 top vectors are untouched
    assert np.all(spectrum.intruder_similarity[8:] >= 0.5)  # then two of its (mixed) bottom block
    assert layer_spectrum(w0.float(), delta=torch.zeros(n, n), intruder_k=10).scalars["intruders"] == 0


def _lora_tiny_bert(seed: int = 0, roles=("q", "v", "fc1")):
    torch.manual_seed(seed)
    model = load_model("tiny-bert", 3)
    method = build_method("lora", {"rank": 4, "alpha": 8, "target_roles": list(roles)})
    method.apply(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in method.adapted_layers(model).values():
            layer.lora_B.weight.copy_(0.3 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return model.eval(), method


def test_adapter_spectra_factor_route_equals_dense_route_on_lora():
    model, method = _lora_tiny_bert()
    by_factors = adapter_spectra(model, use_factors=True)
    by_dense = adapter_spectra(model, use_factors=False)
    assert list(by_factors.sigmas) == list(method.adapted_layers(model)) and len(by_factors.table) == 6
    assert set(by_factors.table["source"]) == {"factors"} and set(by_dense.table["source"]) == {"dense"}
    assert list(by_factors.table["role"]) == ["q", "v", "fc1"] * 2
    assert list(by_factors.table["block"]) == [0, 0, 0, 1, 1, 1]
    for name, sigma in by_factors.sigmas.items():
        np.testing.assert_allclose(sigma, by_dense.sigmas[name][: len(sigma)], rtol=1e-4)
        assert np.all(by_dense.sigmas[name][len(sigma) :] == 0)
    for column in ("rank", "effective_rank", "stable_rank", "relative_update", "intruders"):
        np.testing.assert_allclose(
            by_factors.table[column].astype(float), by_dense.table[column].astype(float), rtol=1e-4
        )
    assert (by_factors.table["rank"] == 4).all()


@pytest.mark.parametrize("method_name", method_names())
def test_adapter_spectra_of_every_method_agree_between_routes(method_name):
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method(method_name, get_method(method_name).test_params)
    method.apply(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    by_factors = adapter_spectra(model.eval(), intruder_k=3)
    by_dense = adapter_spectra(model, use_factors=False, intruder_k=3)
    layers = method.adapted_layers(model)
    with_delta = [n for n, layer in layers.items() if layer.delta_weight() is not None]
    assert list(by_factors.sigmas) == with_delta and by_factors.skipped == [n for n in layers if n not in with_delta]
    for name, sigma in by_factors.sigmas.items():
        dense = by_dense.sigmas[name]
        top = max(float(dense.max(initial=0.0)), 1e-12)
        np.testing.assert_allclose(sigma, dense[: len(sigma)], rtol=1e-3, atol=1e-5 * top)
        assert np.all(dense[len(sigma) :] <= 1e-5 * top)
    pd.testing.assert_series_equal(by_factors.table["intruders"], by_dense.table["intruders"])


def test_adapter_spectra_skips_layers_without_a_dense_update():
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method("lily", {"rank": 4, "num_experts": 2, "target_roles": ["q"]})  # data-dependent mixing
    method.apply(model)
    spectra = adapter_spectra(model)
    assert spectra.skipped == list(method.adapted_layers(model)) and spectra.table.empty


def test_update_spectra_between_two_state_dicts():
    before = load_model("tiny-bert", 3).state_dict()
    after = {k: v.clone() for k, v in before.items()}
    key = "net.bert.encoder.layer.1.attention.self.value.weight"
    g = torch.Generator().manual_seed(0)
    after[key] += torch.outer(torch.randn(32, generator=g), torch.randn(32, generator=g))
    spectra = update_spectra(before, after, intruder_k=3)
    assert len(spectra.table) == 2 * 6  # q, k, v, o, fc1, fc2 in two blocks
    row = spectra.table.set_index("layer").loc[key.removesuffix(".weight")]
    assert (row["role"], row["block"], row["rank"]) == ("v", 1, 1)
    assert (spectra.table.set_index("layer").drop(key.removesuffix(".weight"))["rank"] == 0).all()
    assert row["effective_rank"] == pytest.approx(1.0) and row["stable_rank"] == pytest.approx(1.0)
    explicit = update_spectra(before, after, keys=[key], intruder_k=0)
    assert list(explicit.table["layer"]) == [key.removesuffix(".weight")]


def test_spectra_artifact_round_trip(tmp_path):
    model, _ = _lora_tiny_bert()
    spectra = adapter_spectra(model)
    npz, js = save_spectra(spectra, tmp_path / "spectra")
    assert npz.name == "spectra.npz" and js.name == "spectra.json"
    json.loads(js.read_text())  # plain JSON
    loaded = load_spectra(tmp_path / "spectra.npz")
    pd.testing.assert_frame_equal(loaded.table, spectra.table, check_dtype=False)
    for name in spectra.sigmas:
        np.testing.assert_array_equal(loaded.sigmas[name], spectra.sigmas[name])
        np.testing.assert_array_equal(loaded.intruder_similarity[name], spectra.intruder_similarity[name])
    assert loaded.settings == spectra.settings


def test_layer_role_block_from_names():
    assert layer_role_block("net.bert.encoder.layer.3.intermediate.dense") == ("fc1", 3)
    assert layer_role_block("net.blocks.1.attn.qkv.k.weight") == ("k", 1)
    assert layer_role_block("net.classifier") == ("", -1)


# --- landscapes ----------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """loss(θ) = ½ (θ − θ*)ᵀ H (θ − θ*) over a 3 × 4 matrix θ, at its minimum θ = θ*."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        m = torch.randn(12, 12, generator=g, dtype=torch.float64)
        self.register_buffer("hessian", m @ m.T + torch.eye(12, dtype=torch.float64))
        self.register_buffer("optimum", self.theta.detach().clone())

    def forward(self, batch):
        d = (self.theta - self.optimum).reshape(-1)
        return 0.5 * d @ self.hessian @ d


def _quadratic_loss(output, batch):
    return output


@pytest.mark.parametrize("batched", [True, False])
def test_quadratic_loss_gives_the_known_paraboloid(batched):
    model = Quadratic()
    params = trainable_parameters(model)
    d1, d2 = random_directions(params, 2, seed=3)
    h = model.hessian
    v1, v2 = d1["theta"].reshape(-1).double(), d2["theta"].reshape(-1).double()
    batches = [torch.zeros(1)]
    one = landscape_1d(model, batches, loss_fn=_quadratic_loss, steps=7, span=2.0, direction=d1, batched=batched)
    np.testing.assert_allclose(one["losses"], 0.5 * one["alphas"] ** 2 * float(v1 @ h @ v1), rtol=1e-10)
    assert "accuracies" not in one  # no logits with labels
    two = landscape_2d(
        model, batches, loss_fn=_quadratic_loss, steps=5, span=1.0, directions=(d1, d2), batched=batched, chunk_size=4
    )
    a, b = np.meshgrid(two["alphas"], two["betas"], indexing="ij")
    expected = 0.5 * (a**2 * float(v1 @ h @ v1) + 2 * a * b * float(v1 @ h @ v2) + b**2 * float(v2 @ h @ v2))
    np.testing.assert_allclose(two["losses"], expected, rtol=1e-10, atol=1e-12)
    assert two["losses"].shape == (5, 5) and two["losses"][2, 2] == pytest.approx(0.0, abs=1e-12)


def test_filter_normalisation_matches_row_norms_and_handles_one_dim_tensors():
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(5, 7, generator=g),
        "conv": torch.randn(3, 2, 2, 2, generator=g),
        "bias": torch.randn(5, generator=g),
    }
    raw = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    d = normalize_direction(raw, params, "filter", one_dim="zero")
    torch.testing.assert_close(d["w"].norm(dim=1), params["w"].norm(dim=1))
    torch.testing.assert_close(d["conv"].reshape(3, -1).norm(dim=1), params["conv"].reshape(3, -1).norm(dim=1))
    assert torch.all(d["bias"] == 0)
    whole = normalize_direction(raw, params, "filter", one_dim="whole")
    assert float(whole["bias"].norm()) == pytest.approx(float(params["bias"].norm()), rel=1e-5)
    layer = normalize_direction(raw, params, "layer")
    assert float(layer["w"].norm()) == pytest.approx(float(params["w"].norm()), rel=1e-5)
    # a row of zero weights gets a zero direction (Li et al.'s formula)
    params["w"][2] = 0
    assert torch.all(normalize_direction(raw, params)["w"][2] == 0)


def test_two_directions_are_orthogonal_and_the_first_is_filter_normalised():
    model, _ = _lora_tiny_bert()
    params = trainable_parameters(model)
    d1, d2 = random_directions(params, 2, seed=5)
    assert abs(dot(d1, d2)) < 1e-6 * math.sqrt(dot(d1, d1) * dot(d2, d2))
    for name, p in params.items():
        if p.dim() >= 2:
            rows = p.reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(d1[name].reshape(p.shape[0], -1).norm(dim=1), rows, rtol=1e-4, atol=1e-6)
        else:
            assert torch.all(d1[name] == 0) and torch.all(d2[name] == 0)
    raw_d2 = random_directions(params, 2, seed=5, orthogonal=False)[1]
    assert math.sqrt(dot(d2, d2)) == pytest.approx(math.sqrt(dot(raw_d2, raw_d2)), rel=1e-6)


def _text_batches(model, count=2, n=4):
    return [tiny_text_batch(model, n=n, length=6, seed=i) for i in range(count)]


def test_batched_landscape_equals_naive_loop_and_restores_the_model():
    model, _ = _lora_tiny_bert()
    batches = _text_batches(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fractions = []
    kwargs = dict(model_loss=classification_loss, steps=3, span=0.5, seed=1)
    fast = landscape_2d(model, batches, chunk_size=4, progress=fractions.append, **kwargs)
    slow = landscape_2d(model, batches, batched=False, **kwargs)
    np.testing.assert_allclose(fast["losses"], slow["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast["accuracies"], slow["accuracies"])
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 3  # 9 points, chunks of 4
    assert np.ptp(fast["losses"]) > 1e-3  # the directions do move the loss
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    # the centre is the trained model itself
    with torch.no_grad():
        centre = sum(float(classification_loss(model, b)[0]) * 4 for b in batches) / 8
    assert fast["losses"][1, 1] == pytest.approx(centre, rel=1e-5)


def test_loss_fn_on_outputs_equals_model_loss():
    model, _ = _lora_tiny_bert()
    batches = _text_batches(model)
    by_output = landscape_1d(
        model, batches, loss_fn=lambda out, b: nn.functional.cross_entropy(out, b["labels"]), steps=3, chunk_size=2
    )
    by_model = landscape_1d(model, batches, model_loss=classification_loss, steps=3)
    np.testing.assert_allclose(by_output["losses"], by_model["losses"], rtol=1e-6)
    np.testing.assert_allclose(by_output["accuracies"], by_model["accuracies"])
    with pytest.raises(ValueError, match="exactly one"):
        make_objective()


def test_interpolation_endpoints_are_the_two_solutions():
    model, method = _lora_tiny_bert(seed=0)
    other, _ = _lora_tiny_bert(seed=7)
    with torch.no_grad():
        other.net.classifier.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    start = {n: p.detach().clone() for n, p in other.named_parameters() if p.requires_grad}
    end = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = _text_batches(model)
    result = interpolation(model, batches, start, end, model_loss=classification_loss, steps=9, margin=0.5)
    np.testing.assert_allclose(result["alphas"], np.linspace(-0.5, 1.5, 9))  # t = 0 at index 2, t = 1 at 6
    objective = make_objective(model_loss=classification_loss)
    theta = {n: p for n, p in start.items()}
    losses_at, _ = evaluate_points(
        model,
        batches,
        objective,
        theta,
        [{n: end[n] - start[n] for n in start}],
        np.array([[0.0], [1.0]]),
        batched=False,
    )
    assert result["losses"][2] == pytest.approx(losses_at[0], rel=1e-5)
    assert result["losses"][6] == pytest.approx(losses_at[1], rel=1e-5)
    with torch.no_grad():
        end_loss = sum(float(classification_loss(model, b)[0]) for b in batches) / 2
        other_loss = sum(float(classification_loss(other, b)[0]) for b in batches) / 2
    assert result["losses"][6] == pytest.approx(end_loss, rel=1e-5)
    assert result["losses"][2] == pytest.approx(other_loss, rel=1e-5)
    assert abs(end_loss - other_loss) > 1e-2
    assert result["meta"]["distance"] > 0


def test_limit_examples_and_landscape_artifact(tmp_path):
    model, _ = _lora_tiny_bert()
    batches = _text_batches(model, count=3, n=4)
    limited = limit_examples(batches, 6)
    assert [len(b["labels"]) for b in limited] == [4, 2] and limited[1]["input_ids"].shape[0] == 2
    result = landscape_1d(model, batches, model_loss=classification_loss, steps=5, max_examples=6)
    assert result["meta"]["examples"] == 6
    save_landscape(result, tmp_path / "landscape")
    loaded = load_landscape(tmp_path / "landscape.json")
    assert loaded["kind"] == "1d" and loaded["meta"]["steps"] == 5
    np.testing.assert_array_equal(loaded["losses"], result["losses"])
    np.testing.assert_array_equal(loaded["accuracies"], result["accuracies"])


# --- importance ----------------------------------------------------------------------------------


def test_head_importance_table_from_a_score_matrix_and_mask():
    scores = [[0.5, 0.1, 0.9], [0.2, 0.7, 0.3]]
    mask = [[1, 0, 1], [0, 1, 1]]
    table = head_importance_table(scores, mask, blocks=[4, 5])
    assert list(table.columns) == ["block", "head", "score", "masked", "rank"]
    assert len(table) == 6
    masked = table[table["masked"]]
    assert sorted(zip(masked["block"], masked["head"])) == [(4, 1), (5, 0)]
    assert table.loc[table["score"].idxmax(), "rank"] == 1


def test_sharing_table_drops_missing_positions_and_keeps_the_map():
    importance = [[0.9, 0.2], [0.1, None], [0.5, 0.4]]  # blocks × sites; (1, mlp) has no adapter
    pruned = [[False, True], [True, None], [False, False]]
    shares = [[None, 2], [0, None], [None, None]]
    table = sharing_table(importance, pruned, shares, row_labels=[0, 1, 2], col_labels=["attn", "mlp"])
    assert len(table) == 5
    by_position = table.set_index(["block", "site"])
    assert by_position.loc[(1, "attn"), "shares"] == 0 and bool(by_position.loc[(1, "attn"), "pruned"])
    assert by_position.loc[(0, "mlp"), "shares"] == 2
    assert by_position.loc[(0, "attn"), "shares"] is None and not by_position.loc[(0, "attn"), "pruned"]


def test_router_load_tables_from_per_layer_histories_and_snapshots():
    loads = {
        "net.bert.encoder.layer.0.attention.self.query": {
            "role": "q",
            "block": 0,
            "mean": [0.6, 0.4],
            "history_steps": [1, 2],
            "history": [[0.5, 0.5], [0.7, 0.3]],
        },
        "net.bert.encoder.layer.1.attention.self.query": {
            "mean": [0.2, 0.8],
            "history_steps": [2],
            "history": [[0.2, 0.8]],
        },
    }
    table = router_load_table(loads)
    assert len(table) == 2 * 2 + 1 * 2
    row = table[(table["step"] == 2) & (table["expert"] == 1) & (table["block"] == 0)]
    assert float(row["load"].iloc[0]) == pytest.approx(0.3)
    assert set(table[table["block"] == 1]["role"]) == {"q"}  # role inferred from the name
    means = router_mean_table(loads)
    assert means.groupby("layer")["load"].sum().tolist() == pytest.approx([1.0, 1.0])
    snapshots = [
        {"step": 10, "loads": {"a.layer.0.output.dense": [0.5, 0.5], "b": [0.1, 0.2, 0.7]}},
        {"step": 20, "loads": {"a.layer.0.output.dense": [1.0, 0.0], "b": [0.3, 0.3, 0.4]}},
    ]
    snap = snapshot_table(snapshots)
    assert len(snap) == 2 * (2 + 3) and set(snap["step"]) == {10, 20}
    assert snap[snap["layer"] == "a.layer.0.output.dense"]["role"].iloc[0] == "fc2"


def test_artifact_tables_walks_generic_shapes():
    artifacts = {
        "strategy": "gate",
        "blocks": [0, 1],
        "scores": [[0.1, 0.2], [0.3, 0.4]],
        "head_mask": [[1.0, 0.0], [1.0, 1.0]],
        "pruned": [[True, False, None]],
        "router": {"l0": {"history_steps": [1], "history": [[0.5, 0.5]], "mean": [0.5, 0.5]}},
        "expert_loads": {"l0": [0.25, 0.75], "l1": [1.0, 0.0, 0.0]},
        "load_history": [{"step": 5, "loads": {"l0": [0.5, 0.5]}}],
        "routed_slots": {"l0": 12, "l1": 8},
        "nested": {"inner": [[1.0]]},
    }
    tables = artifact_tables(artifacts)
    assert set(tables) == {
        "blocks",
        "scores",
        "pruned",
        "router",
        "router.mean",
        "expert_loads",
        "load_history",
        "routed_slots",
        "nested.inner",
    }
    assert list(tables["scores"].columns) == ["row", "col", "scores", "head_mask"]
    assert len(tables["expert_loads"]) == 5 and len(tables["load_history"]) == 2


def _hooked_steps(method: Method, model, batches, steps: int) -> None:
    """Train ``steps`` steps the way ``engine.train.train`` calls the hooks (no data loading)."""
    loss_fn = lambda b: classification_loss(model, b)[0]  # noqa: E731
    ctx = TrainContext(model=model, step=0, total_steps=steps, loss_fn=loss_fn, batches=lambda: iter(batches))
    method.on_train_start(ctx)
    model.train()
    params = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    optimizer = torch.optim.AdamW(params(), lr=1e-2)
    for step in range(1, steps + 1):
        loss, _ = classification_loss(model, batches[step % len(batches)])
        extra = method.extra_loss(model)
        (loss + extra if extra is not None else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.step = step
        if method.on_step_end(ctx):
            optimizer = torch.optim.AdamW(params(), lr=1e-2)


WITH_ARTIFACTS = [n for n in method_names() if get_method(n).artifacts is not Method.artifacts]


@pytest.mark.parametrize("method_name", WITH_ARTIFACTS)
def test_every_method_artifact_becomes_tables(method_name):
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method(method_name, get_method(method_name).test_params)
    method.apply(model)
    _hooked_steps(method, model, _text_batches(model, count=2), steps=4)
    artifacts = json.loads(json.dumps(method.artifacts(model)))  # as stored with the run
    tables = artifact_tables(artifacts)
    assert tables and all(isinstance(t, pd.DataFrame) for t in tables.values())
    matrices = [t for t in tables.values() if {"row", "col"} <= set(t.columns)]
    assert all(len(t) > 0 for t in matrices)


def test_layer_norm_profiler_records_grad_and_update_norms():
    model, method = _lora_tiny_bert()
    layers = method.adapted_layers(model)
    profiler = LayerNormProfiler(model, every=2, steps=[1])
    start = {n: [p.detach().clone() for p in layer.adapter_parameters()] for n, layer in layers.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batches = _text_batches(model)
    expected_grad = {}
    model.train()
    for step in range(1, 5):
        classification_loss(model, batches[step % 2])[0].backward()
        expected_grad[step] = {
            n: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.adapter_parameters()))
            for n, layer in layers.items()
        }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as the training loop does, before its hooks
        recorded = profiler.record(step)
        assert recorded == (step in (1, 2, 4))
    table = profiler.table()
    assert sorted(table["step"].unique()) == [1, 2, 4] and len(table) == 3 * len(layers)
    for _, row in table.iterrows():
        assert row["grad_norm"] == pytest.approx(expected_grad[row["step"]][row["layer"]], rel=1e-5)
    last = table[table["step"] == 4].set_index("layer")
    for name, layer in layers.items():
        moved = math.sqrt(
            sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(layer.adapter_parameters(), start[name]))
        )
        assert last.loc[name, "update_norm"] == pytest.approx(moved, rel=1e-5) and moved > 0
    assert set(table["role"]) == {"q", "v", "fc1"}
    round_trip = norm_profile_table(json.loads(json.dumps(profiler.to_dict())))
    pd.testing.assert_frame_equal(round_trip, table)
    profiler.close()


# --- comparison ----------------------------------------------------------------------------------


def _runs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d", "e"],
            "method": ["lora", "lora", "full", "probe", "dora"],
            "model": ["m"] * 5,
            "dataset": ["d"] * 4 + ["other"],
            "seed": [0, 1, 0, 0, 0],
            "tags": [["x"], ["x", "y"], [], ["y"], ["x"]],
            "trainable_params": [100, 100, 10_000, 10, 120],
            "eval_accuracy": [0.80, 0.82, 0.85, 0.60, 0.81],
            "ms_per_step": [10.0, 12.0, 40.0, 5.0, 11.0],
            "peak_rss_mb": [500.0, 510.0, 900.0, 400.0, 505.0],
            "spec": [
                {"method": {"name": "lora", "rank": 8}, "train": {"lr": 1e-3, "seed": 0}, "tags": ["x"]},
                {"method": {"name": "lora", "rank": 8}, "train": {"lr": 1e-3, "seed": 1}, "tags": ["x", "y"]},
                {"method": {"name": "full"}, "train": {"lr": 5e-5, "seed": 0}, "tags": []},
                json.dumps({"method": {"name": "probe"}, "train": {"lr": 1e-3, "seed": 0}, "tags": ["y"]}),
                {"method": {"name": "dora", "rank": 8}, "train": {"lr": 1e-3, "seed": 0}, "tags": ["x"]},
            ],
        }
    )


def test_pareto_front_on_a_hand_made_table():
    front = pareto_front(_runs())
    # d (10, .60), b (100, .82), c (10000, .85); a is dominated by b, e (120, .81) by b
    assert list(front["run_id"]) == ["d", "b", "c"]
    tie = pd.DataFrame({"run_id": ["p", "q"], "trainable_params": [5, 5], "eval_accuracy": [0.5, 0.5]})
    assert list(pareto_front(tie)["run_id"]) == ["p", "q"]


def test_filter_runs_and_summary():
    runs = _runs()
    assert list(filter_runs(runs, methods="lora")["run_id"]) == ["a", "b"]
    assert list(filter_runs(runs, tags=["x", "y"])["run_id"]) == ["b"]
    assert list(filter_runs(runs, datasets=["d"], seeds=[0])["run_id"]) == ["a", "c", "d"]
    summary = method_summary(runs).set_index("method")
    assert summary.loc["lora", "ms_per_step_mean"] == pytest.approx(11.0)
    assert summary.loc["lora", "ms_per_step_std"] == pytest.approx(math.sqrt(2.0))
    assert summary.loc["full", "ms_per_step_std"] == 0.0 and summary.loc["lora", "eval_accuracy_count"] == 2


def test_learning_curves_mean_and_std_over_seeds():
    runs = _runs()
    metrics = pd.DataFrame(
        [("a", s, "eval_loss", v) for s, v in [(0, 1.0), (10, 0.5), (20, 0.2)]]
        + [("b", s, "eval_loss", v) for s, v in [(0, 3.0), (20, 0.4)]]
        + [("c", s, "eval_loss", v) for s, v in [(0, 2.0), (10, 1.0)]]
        + [("a", 0, "train_loss", 9.0)],
        columns=["run_id", "step", "key", "value"],
    )
    curves = learning_curves(metrics, runs, "eval_loss").set_index(["group", "step"])
    # lora: a = (1, .5, .2), b interpolated to (3, 1.7, .4)
    assert curves.loc[("lora", 0), "mean"] == pytest.approx(2.0) and curves.loc[("lora", 0), "n"] == 2
    assert curves.loc[("lora", 10), "mean"] == pytest.approx((0.5 + 1.7) / 2)
    assert curves.loc[("lora", 10), "std"] == pytest.approx(np.std([0.5, 1.7], ddof=1))
    assert curves.loc[("lora", 20), "std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert curves.loc[("full", 10), "std"] == 0.0 and ("full", 20) not in curves.index  # no extrapolation
    smooth = learning_curves(metrics, runs[runs["run_id"] == "a"], "eval_loss", smoothing=0.5)
    np.testing.assert_allclose(smooth["mean"], [1.0, 0.75, 0.475])
    np.testing.assert_allclose(ema([1.0, 0.5, 0.2], 0.0), [1.0, 0.5, 0.2])


def test_differences_only_and_csv(tmp_path):
    runs = _runs()
    diff = differences_only(runs[runs["run_id"].isin(["a", "b"])])
    assert list(diff.columns) == ["tags", "train.seed"]
    assert diff.loc["b", "train.seed"] == 1 and diff.loc["a", "tags"] == ("x",)
    diff_all = differences_only(runs)
    assert "method.rank" in diff_all.columns and diff_all.loc["c", "method.rank"] == "—"
    assert "method.name" in diff_all.columns and "train.lr" in diff_all.columns
    text = export_csv(diff_all, tmp_path / "diff.csv")
    back = pd.read_csv(tmp_path / "diff.csv", index_col="run_id")
    assert text.splitlines()[0].startswith("run_id,") and list(back.index) == list("abcde")
    assert back.loc["b", "train.seed"] == 1


# --- end to end ----------------------------------------------------------------------------------


def test_real_lora_run_spectra_and_small_landscape(tmp_path):
    from safetensors.torch import load_file

    from engine.data import iterate_batches
    from engine.spec import parse_spec
    from engine.train import MemoryReporter, prepare, train

    spec = parse_spec(
        {
            "model": "tiny-bert",
            "dataset": {"name": "tweets-sentiment", "max_train": 64, "max_eval": 32, "max_length": 24},
            "method": {"name": "lora", "rank": 4, "alpha": 8, "target_roles": ["q", "v", "fc1"]},
            "train": {"max_steps": 8, "batch_size": 16, "lr": 0.01, "device": "cpu", "log_every": 4},
        }
    )
    result = train(spec, MemoryReporter(), tmp_path)
    prep = prepare(spec)
    prep.method.load_adapter_state_dict(prep.model, load_file(result.artifacts["adapter"]))
    prep.model.eval()
    t0 = time.perf_counter()
    spectra = adapter_spectra(prep.model)
    batches = list(iterate_batches(prep.data.eval, 16, shuffle=False))
    surface = landscape_2d(prep.model, batches, model_loss=classification_loss, steps=5, span=1.0)
    elapsed = time.perf_counter() - t0
    assert len(spectra.table) == 6 and (spectra.table["rank"] == 4).all()
    assert (spectra.table["relative_update"] > 0).all() and spectra.table["effective_rank"].between(1, 4).all()
    assert surface["losses"].shape == (5, 5) and np.isfinite(surface["losses"]).all()
    assert surface["accuracies"].min() >= 0 and surface["accuracies"].max() <= 1
    centre = result.final_metrics["eval_loss"]
    assert surface["losses"][2, 2] == pytest.approx(centre, rel=1e-4)
    assert elapsed < 20, f"spectra and a 5x5 landscape took {elapsed:.1f}s"
