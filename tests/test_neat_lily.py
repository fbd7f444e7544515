"""NEAT and Lily against their maths and against Hugging Face PEFT's PEANuT and LiLy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LilyConfig as PeftLilyConfig
from peft import PeanutConfig, get_peft_model
from safetensors.torch import load_file
from torch.nn import functional as F

from engine.methods import TrainContext, build_method
from engine.methods.lily import RouterLoads
from engine.methods.neat import NEATLinear
from engine.models import ModelInfo, TaskModel, load_model
from tests.conftest import batch_for, tiny_text_batch, train_tiny

PEFT_TARGETS = {"q": "query", "v": "value", "fc1": "intermediate.dense"}


def _load(model_name: str, num_labels: int = 3, seed: int = 0) -> TaskModel:
    """A bundled tiny model, or ``bert-6``: tiny-bert's shape with six blocks, enough layers for LP strides."""
    if model_name != "bert-6":
        return load_model(model_name, num_labels)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64, num_labels=num_labels
    )
    info = ModelInfo(
        name="bert-6", modality="text", num_labels=num_labels, num_heads=4, num_layers=6, head_names=["net.classifier"]
    )
    return TaskModel(BertForSequenceClassification(cfg), info, "hf-text")


def _twin_models(model_name: str, num_labels: int = 3):
    """Two TaskModels with identical base weights (ours, and one for PEFT to wrap)."""
    torch.manual_seed(0)
    ours = _load(model_name, num_labels)
    theirs = _load(model_name, num_labels)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _peft_layer(peft_net, our_name: str):
    return peft_net.base_model.model.get_submodule(our_name.removeprefix("net."))


def _net_outputs(net, batch) -> torch.Tensor:
    """Logits and last hidden states side by side: random-init BERT's logits are ~1e-2, its hidden states ~1."""
    out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return torch.cat([out.logits, out.hidden_states[-1].flatten(1)], dim=1)


def _outputs_both(ours, peft_net, batch) -> tuple[torch.Tensor, torch.Tensor]:
    ours.eval(), peft_net.eval()
    with torch.no_grad():
        return _net_outputs(ours.net, batch), _net_outputs(peft_net, batch)


def _randomise_adapters(model, method, seed: int = 3, std: float = 0.2) -> None:
    """Give every adapter tensor (not the task head) a random value; zero-initialised ones would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if method.is_adapter_key(name):
                p.normal_(0, std, generator=g)


# --- NEAT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "activation"), [(0, "relu"), (2, "relu"), (1, "gelu")])
def test_neat_equals_peft_peanut(depth, activation):
    ours, theirs = _twin_models("tiny-bert")
    roles = ["q", "v", "fc1"]
    method = build_method(
        "neat", {"rank": 4, "depth": depth, "scaling": 0.3, "activation": activation, "target_roles": roles}
    )
    method.apply(ours)
    cfg = PeanutConfig(
        r=4, depth=depth, scaling=0.3, act_fn=activation, target_modules=[PEFT_TARGETS[r] for r in roles]
    )
    peft_net = get_peft_model(theirs.net, cfg)
    _randomise_adapters(ours, method)
    layers = method.adapted_layers(ours)
    assert len(layers) == 6
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = _peft_layer(peft_net, name)
            peft_layer.peanut_A["default"].weight.copy_(layer.neat_A.weight)
            peft_layer.peanut_B["default"].weight.copy_(layer.neat_B.weight)
            for mine, their in zip(layer.neat_encoders, peft_layer.peanut_encoders["default"], strict=True):
                their.weight.copy_(mine.weight)
            for mine, their in zip(layer.neat_decoders, peft_layer.peanut_decoders["default"], strict=True):
                their.weight.copy_(mine.weight)
            torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("default"))
    batch = tiny_text_batch(ours)
    a, b = _outputs_both(ours, peft_net, batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), peft_net.disable_adapter():
        torch.testing.assert_close(a[:, :3], ours(batch))  # the TaskModel's logits are the net's
        base = _net_outputs(peft_net, batch)
    assert (a - base).abs().max() > 1e-3  # the adapters matter (100x the tolerance)


def test_neat_delta_is_the_columnwise_network():
    """ΔW column j = s · B h_j with the U-Net recursion written out per column (docs/METHODS.md#neat, deeper
    variant)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 7)
    layer = NEATLinear(base, rank=3, scaling=0.7, depth=2, activation="relu")
    with torch.no_grad():
        layer.neat_B.weight.normal_()
    A, B = layer.neat_A.weight, layer.neat_B.weight
    E = [e.weight for e in layer.neat_encoders]
    D = [d.weight for d in layer.neat_decoders]
    columns = []
    for j in range(base.in_features):
        h0 = F.relu(A @ base.weight[:, j])
        h1 = F.relu(E[0] @ h0)
        h2 = F.relu(E[1] @ h1)
        h = F.relu(D[0] @ h2) + h1
        h = F.relu(D[1] @ h) + h0
        columns.append(0.7 * B @ h)
    expected = torch.stack(columns, dim=1)
    torch.testing.assert_close(layer.delta_weight(), expected)
    assert layer.delta_weight().shape == base.weight.shape


def test_neat_parameter_count_formula_and_identity_start():
    torch.manual_seed(0)
    base = load_model("tiny-bert", 3)
    model = load_model("tiny-bert", 3)
    method = build_method("neat", {"rank": 4, "depth": 2, "target_roles": ["q", "v", "fc1"]})
    method.apply(model)
    # per module 2·r·d_out + 2k·r²: q, v (d_out 32) and fc1 (d_out 64), two blocks
    expected = 2 * (2 * (2 * 4 * 32 + 2 * 2 * 16)) + 2 * (2 * 4 * 64 + 2 * 2 * 16)
    assert expected == 2432
    assert method.adapter_param_count(model) == expected
    head = set(model.head_parameter_names())
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head) == expected
    batch = batch_for(model)
    model.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch))  # B = 0: the adapted model is the base model


def test_deep_neat_merge_equivalence():
    torch.manual_seed(0)
    model = load_model("tiny-hf-vit", 4)
    method = build_method("neat", {"rank": 5, "depth": 3, "activation": "silu", "target_roles": ["q", "v", "fc2"]})
    method.apply(model)
    _randomise_adapters(model, method, std=0.1)
    assert method.mergeable
    batch = batch_for(model)
    with torch.no_grad():
        before = model(batch)
        deltas = method.delta_weights(model)
        assert all(dw.abs().max() > 1e-3 for dw in deltas.values())
        method.merge(model)
        after = model(batch)
        assert not method.adapted_layers(model)
        for name, dw in deltas.items():
            assert model.get_submodule(name).weight.shape == dw.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# --- Lily ----------------------------------------------------------------------------------------


def _sharing_pattern(modules: list) -> list[int]:
    """Each module's index of first occurrence: equal lists mean the same sharing partition."""
    first: dict[int, int] = {}
    return [first.setdefault(id(m), i) for i, m in enumerate(modules)]


def _copy_lily_into_peft(method, ours, peft_net, num_experts: int) -> None:
    """Check that LPs and experts are shared exactly as PEFT shares them, then copy our values into PEFT's."""
    layers = method.adapted_layers(ours)
    peft_layers = [_peft_layer(peft_net, name) for name in layers]
    mine = list(layers.values())
    assert _sharing_pattern([l.lily_lp for l in mine]) == _sharing_pattern([l.lily_A["default"] for l in peft_layers])
    assert _sharing_pattern([l.lily_hp for l in mine]) == _sharing_pattern([l.lily_B["default"] for l in peft_layers])
    with torch.no_grad():
        for layer, peft_layer in zip(mine, peft_layers, strict=True):
            peft_layer.lily_A["default"].weight.copy_(layer.lily_lp.weight)
            peft_layer.lily_B["default"].weight.copy_(layer.lily_hp.weight.reshape(-1, layer.out_features))
            peft_layer.lily_router["default"].weight.copy_(layer.lily_router.weight)
            assert peft_layer.num_B["default"] == num_experts


@pytest.mark.parametrize(
    ("model_name", "stride", "roles"),
    [("tiny-bert", 1, ["q", "v", "fc1"]), ("tiny-bert", 2, ["q", "v"]), ("bert-6", 4, ["q", "v"])],
)
def test_lily_equals_peft_lily(model_name, stride, roles):
    ours, theirs = _twin_models(model_name)
    params = {"rank": 4, "num_experts": 3, "lp_stride": stride, "scaling": 0.5, "target_roles": roles}
    method = build_method("lily", {**params, "mlp_activation": "identity", "mlp_placement": "per_linear"})
    method.apply(ours)
    cfg = PeftLilyConfig(r=4, num_B=3, stride_A=stride, scaling=0.5, target_modules=[PEFT_TARGETS[r] for r in roles])
    peft_net = get_peft_model(theirs.net, cfg)
    _randomise_adapters(ours, method)
    _copy_lily_into_peft(method, ours, peft_net, 3)
    batch = tiny_text_batch(ours)
    a, b = _outputs_both(ours, peft_net, batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the adapters matter: zeroing the experts changes the outputs
    with torch.no_grad():
        for layer in method.adapted_layers(ours).values():
            layer.lily_hp.weight.zero_()
        assert (_net_outputs(ours.net, batch) - a).abs().max() > 1e-2


def test_lily_parameter_counts():
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    head = set(model.head_parameter_names())

    def count(params):
        m = load_model("tiny-bert", 3)
        method = build_method("lily", params)
        method.apply(m)
        actual = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and n not in head)
        assert method.adapter_param_count(m) == actual
        return actual

    base = {"rank": 4, "num_experts": 3, "target_roles": ["q", "fc2"], "mlp_placement": "per_linear"}
    # n_LP·d_in·d + ne·d·d_out + L·d·ne per type; q: 32→32, fc2: 64→32, L = 2
    assert count({**base, "lp_stride": 1}) == (2 * 32 * 4 + 3 * 4 * 32 + 2 * 4 * 3) + (2 * 64 * 4 + 3 * 4 * 32 + 24)
    assert count({**base, "lp_stride": 2}) == (1 * 32 * 4 + 384 + 24) + (1 * 64 * 4 + 384 + 24) == 1200
    assert count({**base, "lp_stride": 2, "monoscale": True}) == 1200 - 2 * 24

    # the block placement: one adapter per block beside the MLP, d_in = fc1's input (32), d_out = fc2's output (32)
    assert count({**base, "lp_stride": 1, "mlp_placement": "block"}) == (2 * 32 * 4 + 384 + 24) + (
        2 * 32 * 4 + 3 * 4 * 32 + 2 * 4 * 3
    )

    # defaults on six blocks of width 32: d = 32, ne = 4, stride 6 // 4 = 1 (the official 12 // ne) -> 6 LPs per type
    model = _load("bert-6")
    method = build_method("lily", {})
    method.apply(model)
    per_type = 6 * 32 * 32 + 4 * 32 * 32 + 6 * 32 * 4
    assert method.adapter_param_count(model) == 2 * per_type == 22016
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 22016 + 32 * 3 + 3  # + classifier
    # with 12 layers and ne = 4 the official code shares one LP over 12 // 4 = 3 layers
    assert build_method("lily", {}).config.stride_for(12) == 3


def test_lily_block_placement_follows_the_relu_equation():
    """MLP(x) + s · ReLU(LP x) · Σ_e p_e HP_e, p = mean over tokens of softmax(R ReLU(LP x)), x the MLP input."""
    from engine.methods.lily import LilyMLPLinear

    torch.manual_seed(0)
    model = load_model("tiny-bert", 3).eval()
    method = build_method("lily", {"rank": 4, "num_experts": 3, "scaling": 0.5, "target_roles": ["fc1"]})
    method.apply(model)
    _randomise_adapters(model, method)
    layers = method.adapted_layers(model)
    fc2_name, fc2 = next((n, l) for n, l in layers.items() if isinstance(l, LilyMLPLinear))
    fc1 = model.get_submodule(fc2_name.replace("output.dense", "intermediate.dense"))
    seen = {}
    fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    fc2.register_forward_hook(lambda m, i, o: seen.update(z=i[0], y=o))
    with torch.no_grad():
        model(tiny_text_batch(model))
        h = torch.relu(seen["x"] @ fc2.lily_lp.weight.T)
        p = torch.softmax(h @ fc2.lily_router.weight.T, dim=-1).reshape(-1, 3).mean(0)
        combined = sum(p[e] * fc2.lily_hp.weight[e] for e in range(3))
        expected = fc2.base(seen["z"]) + 0.5 * h @ combined
        torch.testing.assert_close(seen["y"], expected, atol=1e-6, rtol=1e-5)
        assert (h == 0).any() and (h > 0).any()  # the ReLU is really exercised
    assert fc2.lily_lp.in_features == fc1.in_features and fc2.lily_hp.weight.shape[-1] == fc2.out_features
    assert not method.mergeable and fc2.delta_weight() is None


def test_lily_sharing_is_by_object_and_survives_save_load():
    torch.manual_seed(0)
    model = _load("bert-6")
    method = build_method("lily", {"rank": 4, "num_experts": 2, "lp_stride": 4, "target_roles": ["q", "v"]})
    method.apply(model)
    layers = list(method.adapted_layers(model).values())
    q = [l for l in layers if l.role == "q"]
    v = [l for l in layers if l.role == "v"]
    assert [l.block for l in q] == list(range(6))
    # LP: blocks 0-3 share one, 4-5 another; HP: one per type; routers: one per layer
    assert all(l.lily_lp.weight is q[0].lily_lp.weight for l in q[:4])
    assert all(l.lily_lp.weight is q[4].lily_lp.weight for l in q[4:])
    assert q[0].lily_lp.weight is not q[4].lily_lp.weight
    assert all(l.lily_hp.weight is q[0].lily_hp.weight for l in q)
    assert q[0].lily_hp.weight is not v[0].lily_hp.weight and q[0].lily_lp is not v[0].lily_lp
    assert len({id(l.lily_router.weight) for l in layers}) == 12
    assert method.artifacts(model)["lp_sharing"] == {"q": [[0, 1, 2, 3], [4, 5]], "v": [[0, 1, 2, 3], [4, 5]]}

    _randomise_adapters(model, method)
    state = method.adapter_state_dict(model)
    assert sum(1 for k in state if "lily_lp" in k) == 4 and sum(1 for k in state if "lily_hp" in k) == 2
    batch = tiny_text_batch(model)
    model.eval()
    with torch.no_grad():
        expected = _net_outputs(model.net, batch)
    fresh = _load("bert-6").eval()  # the same backbone (seeded)
    torch.manual_seed(1)
    fresh_method = build_method("lily", method.config.model_dump())
    fresh_method.apply(fresh)
    with torch.no_grad():
        assert (_net_outputs(fresh.net, batch) - expected).abs().max() > 1e-2
    fresh_method.load_adapter_state_dict(fresh, state)
    fresh_layers = list(fresh_method.adapted_layers(fresh).values())
    # the loaded value reached the aliases that were not in the file
    torch.testing.assert_close(fresh_layers[10].lily_lp.weight, layers[10].lily_lp.weight)
    assert fresh_layers[10].lily_lp.weight is fresh_layers[8].lily_lp.weight
    with torch.no_grad():
        torch.testing.assert_close(_net_outputs(fresh.net, batch), expected)


def test_lily_monoscale_merges_and_equals_uniform_router():
    roles = ["q", "v", "fc1"]
    common = {"rank": 4, "num_experts": 3, "lp_stride": 1, "scaling": 0.5, "target_roles": roles,
              "mlp_placement": "per_linear"}  # fmt: skip
    assert not build_method("lily", common).mergeable
    block = {**common, "mlp_placement": "block", "monoscale": True, "mlp_activation": "identity"}
    assert not build_method("lily", block).mergeable  # the block adapter reads the MLP input, not fc2's
    assert not build_method("lily", {**common, "monoscale": True}).mergeable  # ReLU on fc1
    assert build_method("lily", {**common, "monoscale": True, "mlp_activation": "identity"}).mergeable
    assert build_method("lily", {**common, "monoscale": True, "target_roles": ["q", "v"]}).mergeable

    routed, mono = _twin_models("tiny-bert")
    routed_method = build_method("lily", common)
    routed_method.apply(routed)
    mono_method = build_method("lily", {**common, "monoscale": True})
    mono_method.apply(mono)
    _randomise_adapters(routed, routed_method)
    batch = tiny_text_batch(routed)
    with pytest.raises(TypeError):
        routed_method.merge(routed)
    assert all(l.delta_weight() is None for l in routed_method.adapted_layers(routed).values())
    # zero routers give softmax = 1/ne everywhere: the routed layer then computes the monoscale layer
    with torch.no_grad():
        for name, layer in routed_method.adapted_layers(routed).items():
            layer.lily_router.weight.zero_()
            twin = mono.get_submodule(name)
            twin.lily_lp.weight.copy_(layer.lily_lp.weight)
            twin.lily_hp.weight.copy_(layer.lily_hp.weight)
            assert not hasattr(twin, "lily_router")
    routed.eval(), mono.eval()
    with torch.no_grad():
        torch.testing.assert_close(mono(batch), routed(batch))

    # without ReLU the monoscale layer is linear in x and merges
    merged_model = load_model("tiny-bert", 3)
    method = build_method("lily", {**common, "monoscale": True, "mlp_activation": "identity"})
    method.apply(merged_model)
    _randomise_adapters(merged_model, method)
    merged_model.eval()
    assert all(l.linear_in_x for l in method.adapted_layers(merged_model).values())
    with torch.no_grad():
        before = merged_model(batch)
        method.merge(merged_model)
        torch.testing.assert_close(merged_model(batch), before, atol=1e-5, rtol=1e-5)
    assert not method.adapted_layers(merged_model)


def test_lily_records_router_loads_in_training_only():
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method("lily", {"rank": 4, "num_experts": 3, "target_roles": ["q", "fc1"]})
    method.apply(model)
    _randomise_adapters(model, method)
    ctx = TrainContext(model=model, step=0, total_steps=3, loss_fn=None, batches=None)
    name, layer = next(iter(method.adapted_layers(model).items()))
    assert layer.role == "q" and not layer.relu
    hidden = []  # the LP outputs h this layer saw, one per forward
    layer.lily_lp.register_forward_hook(lambda module, args, out: hidden.append(out.detach()))
    model.train()
    for step in range(1, 4):
        model(tiny_text_batch(model, seed=step))
        ctx.step = step
        assert method.on_step_end(ctx) is False
    expected = torch.stack([F.softmax(layer.lily_router(h), -1).reshape(-1, 3).mean(0).detach() for h in hidden])
    model.eval()
    with torch.no_grad():
        model(tiny_text_batch(model, seed=9))  # evaluation is not recorded
    loads = method.artifacts(model)["router_loads"]
    assert set(loads) == set(method._lily_layers(model))  # every adapter (InputTaps only post the MLP input)
    entry = loads[name]
    assert entry["forwards"] == 3 and entry["history_steps"] == [1, 2, 3]
    assert len(hidden) == 4  # three training forwards and one evaluation
    torch.testing.assert_close(torch.tensor(entry["history"]), expected[:3])
    torch.testing.assert_close(torch.tensor(entry["mean"]), expected[:3].mean(0))
    assert math.isclose(sum(entry["mean"]), 1.0, rel_tol=1e-5)
    json.dumps(method.artifacts(model))


def test_router_history_stays_bounded_and_keeps_the_mean():
    loads = RouterLoads(max_points=4)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 12):
        for _ in range(step % 3 + 1):  # windows of unequal length
            loads.add(torch.softmax(torch.randn(3, generator=g), 0))
        loads.close_window(step)
    summary = loads.summary()
    assert len(summary["history"]) <= 4 and summary["history_steps"][-1] == 11
    weights = torch.tensor([n for _, _, n in loads.history], dtype=torch.float32)
    history_mean = (torch.tensor(summary["history"]) * weights[:, None]).sum(0) / weights.sum()
    torch.testing.assert_close(history_mean, torch.tensor(summary["mean"]))


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method_name", "params"),
    [("neat", {"rank": 4, "depth": 1}), ("lily", {"rank": 8, "num_experts": 2, "target_roles": ["q", "v", "fc1"]})],
)
def test_short_training_run(tmp_path, method_name, params):
    spec, result, reporter = train_tiny({"name": method_name, **params}, tmp_path, lr=1e-2)
    losses = [v for _, v in reporter.series("train_loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert "eval_accuracy" in result.final_metrics
    assert result.trainable_params == result.adapter_params + 32 * 3 + 3  # formula + classifier = actual
    state = load_file(result.artifacts["adapter"])
    moved = [k for k in state if k.split(".")[-2] in ("neat_B", "lily_hp")]
    assert moved and all(state[k].abs().max() > 0 for k in moved)  # zero-initialised tensors trained
    if method_name == "lily":
        analysis = json.loads(Path(result.artifacts["method_analysis"]).read_text())
        assert len(analysis["router_loads"]) == 6
        for entry in analysis["router_loads"].values():
            assert entry["history_steps"] == [1, 2, 3, 4]
            assert math.isclose(sum(entry["mean"]), 1.0, rel_tol=1e-5)
