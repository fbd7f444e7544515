"""Bottleneck adapters (Houlsby, AdaptFormer) and Pear against their maths, and Pear's prune-and-share schedule."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.nn import functional as F

from engine.methods import AdaptedLinear, TrainContext, build_method
from engine.methods.adapters import Bottleneck
from engine.methods.pear import Pear
from engine.models import count_parameters, load_model
from tests.conftest import batch_for, tiny_image_batch

SMALL = {"houlsby": {"bottleneck": 4}, "adaptformer": {"bottleneck": 4}, "pear": {"bottleneck": 4}}


def _adapted(method_name: str, model_name: str, params: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(model_name, 5)
    method = build_method(method_name, params if params is not None else SMALL[method_name])
    method.apply(model)
    model.eval()
    return model, method


def _randomise_adapters(model, method, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if method.is_adapter_key(name) and p.requires_grad:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _adapter_trainable(model, method) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and method.is_adapter_key(n))


# --- zero init and parameter counts ---------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["houlsby", "adaptformer", "pear"])
@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
def test_zero_init_adapted_model_is_the_base_model(method_name, model_name):
    torch.manual_seed(0)
    base = load_model(model_name, 5).eval()
    model, method = _adapted(method_name, model_name)  # same seed: same backbone and head as ``base``
    batch = batch_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch), atol=0, rtol=0)
        _randomise_adapters(model, method)
        assert not torch.allclose(model(batch), base(batch), atol=1e-4), "the adapters do not reach the output"


@pytest.mark.parametrize(
    "method_name,params,expected",
    [
        # tiny-bert: d = 32, 2 blocks; one bottleneck 32 -> 4 -> 32 with biases: 4·64 + 4 + 32 = 292
        ("houlsby", {"bottleneck": 4}, 2 * 2 * 292),  # o and fc2 of 2 blocks
        ("houlsby", {"bottleneck": 4, "bias": False, "target_roles": ["fc2"]}, 2 * 256),
        ("adaptformer", {"bottleneck": 4}, 2 * 292),  # fc1 input (32) -> fc2 output (32), 2 blocks
        ("adaptformer", {"bottleneck": 4, "blocks": [1]}, 292),
        ("pear", {"bottleneck": 4}, 2 * 2 * 292),  # sites attn and mlp, 2 blocks
        ("pear", {"bottleneck": 4, "sites": ["mlp"], "bias": False}, 2 * 256),
    ],
)
def test_parameter_count_formula(method_name, params, expected):
    model, method = _adapted(method_name, "tiny-bert", params)
    assert method.adapter_param_count(model) == expected
    assert _adapter_trainable(model, method) == expected
    head = sum(p.numel() for n, p in model.named_parameters() if n in set(model.head_parameter_names()))
    assert count_parameters(model)[0] == expected + head


def test_default_configs_follow_the_papers():
    assert build_method("houlsby").config.bottleneck == 64
    af = build_method("adaptformer").config
    assert (af.bottleneck, af.scaling, af.activation) == (64, 0.1, "relu")
    pear = build_method("pear").config
    assert (pear.prune_ratio, pear.knowledge_checkpoint, pear.sites) == (0.5, True, ["attn", "mlp"])
    with pytest.raises(ValueError, match="sites"):
        build_method("pear", {"sites": ["ffn"]})


# --- forward placement, by hand on one BERT layer -------------------------------------------------


def _plain(module):
    return module.base if isinstance(module, AdaptedLinear) else module


def _bottleneck_by_hand(adapter: Bottleneck, z: torch.Tensor, act) -> torch.Tensor:
    return F.linear(act(F.linear(z, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


def _bert_layer_by_hand(layer, h, heads: int, attn_branch, mlp_branch) -> torch.Tensor:
    """A post-LN BERT layer from its weights. ``*_branch(sub-layer input, projection output)`` adds the adapter."""
    sa = layer.attention.self
    n, t, d = h.shape

    def split(z):
        return z.view(n, t, heads, d // heads).transpose(1, 2)

    q, k, v = (split(_plain(m)(h)) for m in (sa.query, sa.key, sa.value))
    context = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v).transpose(1, 2).reshape(n, t, d)
    attn_out = attn_branch(h, _plain(layer.attention.output.dense)(context))
    a = layer.attention.output.LayerNorm(attn_out + h)
    hidden = layer.intermediate.intermediate_act_fn(_plain(layer.intermediate.dense)(a))
    mlp_out = mlp_branch(a, _plain(layer.output.dense)(hidden))
    return layer.output.LayerNorm(mlp_out + a)


def _placement_case(method_name, params):
    model, method = _adapted(method_name, "tiny-bert", params)
    _randomise_adapters(model, method)
    layer = model.net.bert.encoder.layer[1]
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = layer(h)
        plain = _bert_layer_by_hand(layer, h, model.info.num_heads, lambda x, y: y, lambda x, y: y)
    assert not torch.allclose(got, plain, atol=1e-3), "the adapters changed nothing"
    return layer, h, got


def test_houlsby_is_sequential_after_o_and_fc2():
    layer, h, got = _placement_case("houlsby", {"bottleneck": 4, "scaling": 0.7})
    o, fc2 = layer.attention.output.dense, layer.output.dense

    def after(module):
        return lambda x, y: y + 0.7 * _bottleneck_by_hand(module.houlsby_adapter, y, F.gelu)

    with torch.no_grad():
        expected = _bert_layer_by_hand(layer, h, 4, after(o), after(fc2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adaptformer_is_parallel_to_the_mlp():
    layer, h, got = _placement_case("adaptformer", {"bottleneck": 4})
    fc2 = layer.output.dense
    with torch.no_grad():
        expected = _bert_layer_by_hand(
            layer, h, 4, lambda x, y: y, lambda x, y: y + 0.1 * _bottleneck_by_hand(fc2.adaptformer_adapter, x, F.relu)
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pear_adapters_are_parallel_to_attention_and_mlp():
    layer, h, got = _placement_case("pear", {"bottleneck": 4, "scaling": 0.5})
    o, fc2 = layer.attention.output.dense, layer.output.dense

    def beside(module):
        return lambda x, y: y + 0.5 * _bottleneck_by_hand(module.pear_adapter, x, F.relu)

    with torch.no_grad():
        expected = _bert_layer_by_hand(layer, h, 4, beside(o), beside(fc2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- Pear: scoring, pruning, sharing, knowledge checkpoint ----------------------------------------


def _context(model, total_steps: int = 8) -> TrainContext:
    batches = []
    for i in range(4):
        b = tiny_image_batch(n=6, seed=10 + i)
        b["labels"] = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(i))
        batches.append(b)
    return TrainContext(
        model=model,
        step=0,
        total_steps=total_steps,
        loss_fn=lambda b: F.cross_entropy(model(b), b["labels"]),
        batches=lambda: iter(batches),
    )


def _pruned_pear(params: dict | None = None):
    params = {"bottleneck": 4, "calibration_batches": 3, "warmup_fraction": 0.5, **(params or {})}
    model, method = _adapted("pear", "tiny-vit", params)
    _randomise_adapters(model, method)  # a trained-looking state: importance is 0 while W_up = 0
    model.train()
    ctx = _context(model)
    ctx.step = 3
    assert method.on_step_end(ctx) is False  # before the warm-up ends nothing happens
    assert not method.scores
    own = {pos: copy.deepcopy(layer.pear_adapter) for pos, layer in method.positions(model).items()}
    trainable_before = _adapter_trainable(model, method)
    ctx.step = 4
    assert method.on_step_end(ctx) is True
    assert model.training, "scoring must restore the training mode"
    ctx.step = 5
    assert method.on_step_end(ctx) is False  # pruning happens once
    return model, method, own, trainable_before


def test_pear_prunes_the_lowest_and_shares_parameters():
    model, method, own, trainable_before = _pruned_pear()
    positions = method.positions(model)
    scores = method.scores
    assert set(scores) == set(positions) and len(scores) == 4
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert all(p.grad is None for p in model.parameters()), "scoring left gradients on the parameters"
    pruned = {pos for pos, layer in positions.items() if layer.is_pruned}
    assert pruned == set(method.sources) and len(pruned) == 2  # ⌊0.5·2⌋ per site, 2 sites
    for site in ("attn", "mlp"):
        site_pruned = [scores[p] for p in pruned if p[0] == site]
        site_kept = [scores[p] for p in positions if p[0] == site and p not in pruned]
        assert len(site_pruned) == 1 and max(site_pruned) <= min(site_kept)
    for (site, block), source_block in method.sources.items():
        layer, source = positions[(site, block)], positions[(site, source_block)]
        assert source_block != block and not source.is_pruned
        for mine, theirs in zip(layer.pear_adapter.parameters(), source.pear_adapter.parameters(), strict=True):
            assert mine is theirs and mine.requires_grad
    # trainable: minus each pruned adapter (64 -> 4 -> 64 with biases), plus one scalar γ each
    per_adapter = Bottleneck.param_count(64, 64, 4, True)
    trainable_after = _adapter_trainable(model, method)
    assert trainable_before - trainable_after == 2 * per_adapter - 2
    assert method.adapter_param_count(model) == trainable_after
    counts = method.parameter_counts(model)
    assert counts == {
        "trainable": trainable_after,
        "frozen_checkpoint": 2 * per_adapter,
        "stored": trainable_before + 2,
    }


def test_pear_knowledge_checkpoint_is_frozen_and_still_contributes():
    model, method, own, _ = _pruned_pear()
    positions = method.positions(model)
    (site, block), source_block = next(iter(method.sources.items()))
    layer = positions[(site, block)]
    checkpoint = layer.pear_checkpoint
    for frozen, snapshot in zip(checkpoint.parameters(), own[(site, block)].parameters(), strict=True):
        assert not frozen.requires_grad
        torch.testing.assert_close(frozen, snapshot, atol=0, rtol=0)
    assert layer.pear_checkpoint_scale.requires_grad and layer.pear_checkpoint_scale.item() == 1.0
    # the layer computes W0 x + b0 + s·(shared(z) + γ·frozen(z)) with the pre-pruning own adapter as ``frozen``
    with torch.no_grad():
        layer.pear_checkpoint_scale.fill_(0.3)
        x, z = torch.randn(2, 5, layer.in_features), torch.randn(2, 5, layer.adapter_in_features)
        layer.mailbox.post(z)
        got = layer(x)
        shared = _bottleneck_by_hand(own[(site, source_block)], z, F.relu)
        kept = _bottleneck_by_hand(own[(site, block)], z, F.relu)
        torch.testing.assert_close(got, layer.base(x) + 0.1 * (shared + 0.3 * kept), atol=1e-5, rtol=1e-5)
    # a training step reaches γ and the shared adapter, never the checkpoint
    model.train()
    loss = F.cross_entropy(model(tiny_image_batch(n=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert layer.pear_checkpoint_scale.grad is not None and layer.pear_adapter.up.weight.grad is not None
    assert all(p.grad is None for p in checkpoint.parameters())
    keys = method.adapter_state_dict(model)
    assert any(".pear_checkpoint." in k for k in keys) and any(k.endswith("pear_checkpoint_scale") for k in keys)


def test_pear_without_knowledge_checkpoint_drops_the_pruned_adapter():
    model, method, own, trainable_before = _pruned_pear({"knowledge_checkpoint": False})
    per_adapter = Bottleneck.param_count(64, 64, 4, True)
    assert trainable_before - _adapter_trainable(model, method) == 2 * per_adapter
    assert method.adapter_param_count(model) == _adapter_trainable(model, method)
    assert all(layer.pear_checkpoint is None for layer in method.positions(model).values())
    assert method.parameter_counts(model)["frozen_checkpoint"] == 0


def test_pear_save_load_after_pruning_gives_the_same_outputs():
    model, method, _, _ = _pruned_pear()
    with torch.no_grad():  # move γ and the shared adapters away from their pruning-time values
        for layer in method.positions(model).values():
            if layer.is_pruned:
                layer.pear_checkpoint_scale.fill_(0.6)
            layer.pear_adapter.up.weight.add_(0.1)
    model.eval()
    batch = tiny_image_batch(n=3, seed=5)
    with torch.no_grad():
        expected = model(batch)
    state = json.loads(json.dumps(method.state()))  # what the adapter config file stores
    tensors = method.adapter_state_dict(model)

    fresh, fresh_method = _adapted("pear", "tiny-vit", {"bottleneck": 4}, seed=3)
    fresh_method.load_state(fresh, state)
    fresh_method.load_adapter_state_dict(fresh, tensors)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=1e-6)
    assert fresh_method.sources == method.sources and fresh_method.scores == method.scores
    positions = fresh_method.positions(fresh)
    for (site, block), source_block in fresh_method.sources.items():
        assert positions[(site, block)].pear_adapter is positions[(site, source_block)].pear_adapter
        assert not any(p.requires_grad for p in positions[(site, block)].pear_checkpoint.parameters())
    assert fresh_method.adapter_param_count(fresh) == _adapter_trainable(fresh, fresh_method)
    assert fresh_method.on_step_end(_context(fresh)) is False  # a loaded, pruned adapter is never pruned again


def test_pear_sharing_choices_nearest_and_global():
    scores = {("attn", b): s for b, s in enumerate([5.0, 1.0, 4.0, 0.7, 3.0, 6.0])}
    scores |= {("mlp", b): s for b, s in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])}
    best = Pear(Pear.config_cls(prune_ratio=0.5))
    assert best.choose_sharing(scores) == {
        ("attn", 1): 5, ("attn", 3): 5, ("attn", 4): 5, ("mlp", 0): 5, ("mlp", 1): 5, ("mlp", 2): 5,
    }  # fmt: skip
    nearest = Pear(Pear.config_cls(prune_ratio=0.5, share_with="nearest"))
    # attn 1: blocks 0 and 2 are equally near, 0 scores higher; attn 4: its neighbour 3 is pruned, 5 is kept
    assert nearest.choose_sharing(scores) == {
        ("attn", 1): 0, ("attn", 3): 2, ("attn", 4): 5, ("mlp", 0): 3, ("mlp", 1): 3, ("mlp", 2): 3,
    }  # fmt: skip
    # global ranking: the 6 lowest of all 12 are the mlp scores, but one mlp adapter must survive
    global_rank = Pear(Pear.config_cls(prune_ratio=0.5, ranking="global"))
    sources = global_rank.choose_sharing(scores)
    assert set(sources) == {("mlp", b) for b in range(5)} | {("attn", 3)}
    assert all(src == 5 for (site, _), src in sources.items() if site == "mlp")


def test_pear_artifacts_are_tables_for_the_importance_view():
    model, method, _, _ = _pruned_pear()
    art = json.loads(json.dumps(method.artifacts(model)))
    assert art["sites"] == ["attn", "mlp"] and art["blocks"] == [0, 1]
    for row, block in zip(art["importance"], art["blocks"], strict=True):
        for value, site in zip(row, art["sites"], strict=True):
            assert value == pytest.approx(method.scores[(site, block)])
    assert sum(v for row in art["pruned"] for v in row) == 2
    for b, row in enumerate(art["shares_block"]):
        for s, source in enumerate(row):
            assert source == method.sources.get((art["sites"][s], b))
    assert art["pruned_at_step"] == 4


def test_pear_prunes_mid_run_in_the_training_loop(tmp_path):
    from safetensors.torch import load_file

    from engine.spec import parse_spec
    from engine.train import ADAPTER_CONFIG_FILE, ADAPTER_FILE, MemoryReporter, evaluate, prepare, train

    spec = parse_spec({
        "model": "tiny-vit",
        "dataset": {"name": "digits", "max_train": 128, "max_eval": 64},
        "method": {"name": "pear", "bottleneck": 4, "warmup_fraction": 0.5, "calibration_batches": 2},
        "train": {"max_steps": 4, "batch_size": 16, "log_every": 1, "device": "cpu", "lr": 1e-2},
    })  # fmt: skip
    reporter = MemoryReporter()
    result = train(spec, reporter, tmp_path, resume=False)
    assert result.status == "succeeded" and result.steps == 4
    assert any("step 2: method changed its trainable parameters; optimizer rebuilt" in m for m in reporter.messages)
    assert any(m.startswith("pear: pruned 2 of 4 adapters at step 2") for m in reporter.messages)
    assert all(math.isfinite(v) for _, v in reporter.series("train_loss"))
    analysis = json.loads((tmp_path / "pear_analysis.json").read_text())
    assert analysis["pruned_at_step"] == 2 and sum(v for row in analysis["pruned"] for v in row) == 2

    # the saved adapter, loaded into a fresh model, reproduces the final evaluation
    meta = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    prep = prepare(spec)
    prep.method.load_state(prep.model, meta["method_state"])
    prep.method.load_adapter_state_dict(prep.model, load_file(str(tmp_path / ADAPTER_FILE)))
    again = evaluate(prep.model, prep.data.eval, 32, prep.device)
    assert again["eval_loss"] == pytest.approx(result.final_metrics["eval_loss"], rel=1e-5)


def test_pear_taylor_scores_equal_the_hand_inner_products():
    """I_p = |Σ_batches ⟨s·adapter_p(x_p), ∂L/∂out_p⟩|, computed here from hooks on each position's output, not
    from the gate the method uses: the values must agree, not only their order."""
    model, method = _adapted("pear", "tiny-vit", {"bottleneck": 4, "calibration_batches": 3})
    _randomise_adapters(model, method)
    ctx = _context(model)
    positions = method.positions(model)
    expected = dict.fromkeys(positions, 0.0)
    for batch in list(ctx.batches())[:3]:
        branches, outputs = {}, {}
        handles = []
        for key, layer in positions.items():

            def hook(module, args, out, key=key, outputs=outputs):
                outputs[key] = out
                return out

            def pre(module, args, key=key, branches=branches):  # the input the InputTap posted, before forward
                branches[key] = module.scaling * module.pear_adapter(module.mailbox.value)

            handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(hook)]
        loss = ctx.loss_fn(batch)
        grads = torch.autograd.grad(loss, [outputs[k] for k in positions])
        for h in handles:
            h.remove()
        for key, g in zip(positions, grads, strict=True):
            expected[key] += float((branches[key].detach() * g).sum())
    scores = method.importance_scores(ctx)
    for key in positions:
        assert scores[key] == pytest.approx(abs(expected[key]), rel=1e-4, abs=1e-7), key
    assert len({round(v, 6) for v in scores.values()}) == len(scores)  # distinct values, so the test can fail


def test_pear_output_jumps_at_pruning_by_the_shared_adapter():
    """With the knowledge checkpoint (γ = 1) a pruned position adds the shared adapter on top of its own frozen one:
    right after pruning its output is the pre-pruning output plus s·shared(x) (docs/METHODS.md#pear)."""
    model, method = _adapted("pear", "tiny-vit", {"bottleneck": 4, "calibration_batches": 2, "warmup_fraction": 0.5})
    _randomise_adapters(model, method)
    positions = method.positions(model)
    z = torch.randn(2, 5, 64)
    x = {key: torch.randn(2, 5, layer.in_features) for key, layer in positions.items()}
    before = {}
    with torch.no_grad():
        for key, layer in positions.items():
            layer.mailbox.post(z)
            before[key] = layer(x[key])
    ctx = _context(model)
    ctx.step = 4
    assert method.on_step_end(ctx) is True
    with torch.no_grad():
        for key, layer in positions.items():
            layer.mailbox.post(z)
            after = layer(x[key])
            if layer.is_pruned:
                jump = layer.scaling * layer.pear_adapter(z)
                torch.testing.assert_close(after, before[key] + jump, atol=1e-5, rtol=1e-5)
                assert jump.abs().max() > 1e-3
            else:
                torch.testing.assert_close(after, before[key])
