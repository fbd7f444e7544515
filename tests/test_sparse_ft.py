"""LT-SFT (engine/methods/sparse_ft.py): top-K selection, reset, masked gradients, exact merge, the indices +
values file, the selection inside the training loop, and a full-rank spectrum."""

from __future__ import annotations

import json

import torch

from engine.analysis.spectra import adapter_spectra
from engine.methods import build_method
from engine.methods.sparse_ft import select_top_k
from engine.models import load_model
from tests.conftest import batch_for, train_tiny


def test_top_k_selection_by_hand():
    deltas = {"a": torch.tensor([[0.1, -0.9], [0.3, 0.0]]), "b": torch.tensor([[0.5, -0.2, 0.8]])}
    chosen = select_top_k(deltas, 3, "global")  # |Δ| ranks: a[1]=0.9, b[2]=0.8, b[0]=0.5
    assert chosen["a"].tolist() == [1] and sorted(chosen["b"].tolist()) == [0, 2]
    per_layer = select_top_k(deltas, 3, "per_layer")  # round(3·4/7) = 2 in a, round(3·3/7) = 1 in b
    assert sorted(per_layer["a"].tolist()) == [1, 2] and per_layer["b"].tolist() == [2]


def _dense_phase_model(k: int = 30, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model("tiny-bert", 3).eval()
    method = build_method("lt_sft", {"target_roles": ["q", "v", "fc1"], "num_params": k})
    method.apply(model)
    with torch.no_grad():  # a dense phase that moved some weights
        for layer in method.layers(model).values():
            layer.sft_delta.copy_(0.05 * torch.randn(layer.sft_delta.shape))
    return model, method


def test_selection_keeps_the_k_largest_changes_and_resets_to_the_pretrained_model():
    model, method = _dense_phase_model()
    batch = batch_for(model)
    deltas = {n: l.sft_delta.detach().clone() for n, l in method.layers(model).items()}
    threshold = torch.cat([d.abs().flatten() for d in deltas.values()]).sort(descending=True).values[29]
    method.select(model)
    assert method.adapter_param_count(model) == 30 == sum(method.sizes.values())
    for name, layer in method.layers(model).items():
        assert torch.all(deltas[name].flatten()[layer.sft_indices.long()].abs() >= threshold)
        assert torch.count_nonzero(layer.delta_weight()) == 0  # reset: ΔW = 0
    base = load_model("tiny-bert", 3).eval()  # load_model seeds its initialisation: the same pretrained weights
    with torch.no_grad():
        base.net.classifier.load_state_dict(model.net.classifier.state_dict())
        torch.testing.assert_close(model(batch), base(batch))


def test_only_the_selected_entries_get_gradient_and_the_forward_is_w0_plus_the_sparse_delta():
    model, method = _dense_phase_model()
    method.select(model)
    layer = next(iter(method.layers(model).values()))
    with torch.no_grad():
        layer.sft_values.copy_(torch.randn(layer.sft_values.shape))
    x = torch.randn(2, 5, layer.in_features)
    dense = torch.zeros(layer.base.weight.numel())
    dense[layer.sft_indices.long()] = layer.sft_values.detach()
    w = (layer.base.weight + dense.view_as(layer.base.weight)).detach().requires_grad_(True)
    expected = torch.nn.functional.linear(x, w, layer.base.bias)
    out = layer(x)
    torch.testing.assert_close(out, expected)
    c = torch.randn_like(out)
    (out * c).sum().backward()
    (expected * c).sum().backward()
    # ∂L/∂values is the dense gradient at the selected positions; nothing else of the layer trains
    torch.testing.assert_close(layer.sft_values.grad, w.grad.flatten()[layer.sft_indices.long()])
    assert layer.base.weight.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["sft_values"]


def test_sparse_update_merges_exactly_and_reloads_from_indices_and_values():
    model, method = _dense_phase_model()
    method.select(model)
    with torch.no_grad():
        for layer in method.layers(model).values():
            layer.sft_values.copy_(torch.randn(layer.sft_values.shape))
    batch = batch_for(model)
    state, mstate = method.adapter_state_dict(model), method.state()
    sparse_keys = [k for k in state if "sft_" in k]
    assert all(k.endswith(("sft_indices", "sft_values")) for k in sparse_keys)
    assert sum(v.numel() for k, v in state.items() if k.endswith("sft_values")) == 30
    assert all(v.dtype == torch.int32 for k, v in state.items() if k.endswith("sft_indices"))
    stored = method.stored_size(model)
    assert (stored.params, stored.bytes) == (30, 30 * (4 + 4))
    with torch.no_grad():
        expected = model(batch)
    fresh, fresh_method = _dense_phase_model(seed=1)
    fresh_method.load_state(fresh, json.loads(json.dumps(mstate)))
    fresh_method.load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=1e-6)
        method.merge(model)
        torch.testing.assert_close(model(batch), expected, atol=1e-5, rtol=1e-5)
    assert not method.adapted_layers(model)


def test_sparse_delta_is_full_rank_in_the_spectra():
    model, method = _dense_phase_model(k=2000)
    method.select(model)
    with torch.no_grad():
        for layer in method.layers(model).values():
            layer.sft_values.copy_(torch.randn(layer.sft_values.shape))
    spectra = adapter_spectra(model, intruder_k=0)
    assert set(spectra.table["source"]) == {"dense"}
    q = spectra.table[spectra.table["role"] == "q"].iloc[0]
    assert q["rank"] > 8  # far above a rank-8 LoRA's: a sparse update is not low-rank


def test_training_loop_selects_after_the_dense_phase(tmp_path):
    _, result, reporter = train_tiny({"name": "lt_sft", "target_roles": ["q", "v"], "num_params": 100}, tmp_path)
    assert result.adapter_params == 100
    assert result.stored_params == 100 and result.stored_bytes == 800
    assert result.trainable_params == 100 + 99  # K and tiny-bert's head (32 × 3 + 3)
    data = json.loads(open(result.artifacts["method_analysis"]).read())
    assert data["selected_at_step"] == 1 and sum(data["kept_per_layer"].values()) == 100
    assert any("LT-SFT at step 1" in line for line in reporter.messages)
