"""Low-precision adapters (engine/methods/quantized.py): the quantiser's equation, the straight-through gradient,
bit packing, the packed adapter file and its size, the AdaptFormer base, and HEAT on a binarised base."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.methods import build_method
from engine.methods.quantized import pack_bits, packed_bytes, quantize, unpack_bits
from engine.models import load_model
from tests.conftest import batch_for, train_tiny

W = torch.tensor([0.5, -1.5, 0.0, 2.0])


@pytest.mark.parametrize(
    "bits,expected",
    [
        (1, [1.0, -1.0, 1.0, 1.0]),  # mean|w| = 1, sign(0) = +1
        (2, [0.0, -2.0, 0.0, 2.0]),  # q = 1, Δ = 2: round([0.25, -0.75, 0, 1])
        (3, [2 / 3, -4 / 3, 0.0, 2.0]),  # q = 3, Δ = 2/3: round([0.75, -2.25, 0, 3]) = [1, -2, 0, 3]
    ],
)
def test_quantiser_by_hand(bits, expected):
    torch.testing.assert_close(quantize(W, bits), torch.tensor(expected))


def test_straight_through_gradient_is_the_identity():
    w = torch.randn(5, 7, requires_grad=True)
    c = torch.randn(5, 7)
    (c * quantize(w, 1)).sum().backward()
    torch.testing.assert_close(w.grad, c)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_size(bits):
    n = 37
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(n, bits) == math.ceil(n * bits / 8)
    torch.testing.assert_close(unpack_bits(packed, bits, n), codes)


def _perturbed(method_name: str, params: dict, model_name: str = "tiny-bert", seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(model_name, 3)
    method = build_method(method_name, params)
    method.apply(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return model.eval(), method


@pytest.mark.parametrize("bits", [1, 4])
def test_lora_base_delta_is_the_product_of_quantised_factors(bits):
    model, method = _perturbed("lowbit", {"bits": bits, "rank": 2, "alpha": 4.0})
    layer = next(iter(method.adapted_layers(model).values()))
    a = layer.factor_A.parametrizations.weight.original
    b = layer.factor_B.parametrizations.weight.original
    expected = 2.0 * quantize(b, bits) @ quantize(a, bits)  # s = α/r = 2
    torch.testing.assert_close(layer.delta_weight(), expected)
    if bits == 1:  # every entry of a binarised factor is ± its scale
        assert torch.unique(layer.factor_A.weight.abs()).numel() == 1


@pytest.mark.parametrize("base", ["lora", "adaptformer"])
def test_adapter_file_is_packed_and_reloads(base):
    params = {"base": base, "bits": 1, "rank": 2, "bottleneck": 4}
    model, method = _perturbed("lowbit", params)
    state = method.adapter_state_dict(model)
    assert not any(k.endswith(".original") for k in state)
    codes = {k: v for k, v in state.items() if k.endswith(".codes")}
    assert codes and all(v.dtype == torch.uint8 for v in codes.values())
    quantised = [m.weight.numel() for m in model.modules() if hasattr(m, "parametrizations")]
    n_weights = sum(quantised)
    stored = method.stored_size(model)
    scales = len(codes)
    biases = 0 if base == "lora" else sum(l.lowbit_adapter.up.bias.numel() + l.lowbit_adapter.down.bias.numel()
                                          for l in method.adapted_layers(model).values()
                                          if hasattr(l, "lowbit_adapter"))  # fmt: skip
    assert stored.params == n_weights + scales + biases == method.adapter_param_count(model) + scales
    assert stored.bytes == sum(math.ceil(n / 8) for n in quantised) + 4 * scales + 4 * biases  # 1 bit per weight
    batch = batch_for(model)
    with torch.no_grad():
        expected = model(batch)
    fresh, fresh_method = _perturbed("lowbit", params, seed=3)
    fresh_method.load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=1e-6)


def test_adaptformer_base_starts_at_the_base_model_and_trains_only_the_adapter():
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3).eval()
    batch = batch_for(model)
    with torch.no_grad():
        base_logits = model(batch)
    method = build_method("lowbit", {"base": "adaptformer", "bits": 1, "bottleneck": 4})
    method.apply(model)
    assert not method.mergeable
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base_logits)  # Q(0) = 0: the up-projection starts at zero
    torch.nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lowbit_" in n]
    assert trainable and all(n.endswith((".original", ".bias")) for n in trainable)
    assert method.adapter_param_count(model) == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lowbit_" in n
    )


def test_training_run_records_stored_bytes(tmp_path):
    _, result, _ = train_tiny({"name": "lowbit", "bits": 2, "rank": 4}, tmp_path)
    summary = result.summary()
    assert summary["stored_bytes"] < 4 * summary["adapter_params"] / 8
    data = json.loads(open(result.artifacts["method_analysis"]).read())
    assert data["bits"] == 2 and data["stored_bytes"] == summary["stored_bytes"]
    assert data["float32_bytes"] == 4 * summary["adapter_params"]


@pytest.mark.parametrize("base", ["lora", "adapter"])
def test_heat_on_a_binarised_base_masks_heads_and_reloads_packed(base):
    params = {"base": base, "bits": 1, "rank": 2, "adapter_dim": 2}
    model, method = _perturbed("heat", params)
    mask = torch.ones(len(method.blocks), method.num_heads)
    mask[0, 1] = 0.0
    before = method.adapter_param_count(model)
    method.set_head_mask(model, mask)
    layers = [l for l in model.adaptable_layers(["q"]) if l.block == method.blocks[0]]
    head_dim = layers[0].module.out_features // method.num_heads
    masked = method.masked_adapter_params(model)
    # one head's slice of q, k, v (rows of B / W_up) and o (columns of A / W_down) in the first block, width 2
    assert masked == 4 * 2 * head_dim
    assert method.adapter_param_count(model) == before - masked
    if base == "lora":  # the masked head's rows of ΔW_q are exactly zero
        dw = layers[0].module.delta_weight()
        assert torch.count_nonzero(dw[head_dim : 2 * head_dim]) == 0 and torch.count_nonzero(dw[:head_dim]) > 0
    state = method.adapter_state_dict(model)
    assert any(k.endswith(".codes") for k in state) and not any(k.endswith(".original") for k in state)
    batch = batch_for(model)
    with torch.no_grad():
        expected = model(batch)
    fresh, fresh_method = _perturbed("heat", params, seed=3)
    fresh_method.load_state(fresh, method.state())
    fresh_method.load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=1e-6)
