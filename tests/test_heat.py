"""HEAT: Taylor head importance, head masking of the adapter, and its place in the training loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.methods import TrainContext, build_method
from engine.methods.heat import HEAT, head_mask_from_scores, per_head_sum
from engine.models import load_model
from tests.conftest import tiny_image_batch, tiny_text_batch

NUM_HEADS = 4  # every tiny model has 2 blocks × 4 heads
IMPORTANT = (1, 2)  # (block, head) made to matter


def _batches(model, n: int = 2, size: int = 8) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(n):
        if model.info.modality == "text":
            batch = tiny_text_batch(model, n=size, length=10, seed=seed)
        else:
            batch = tiny_image_batch(n=size, seed=seed)
        batch["labels"] = torch.randint(0, 3, (size,), generator=torch.Generator().manual_seed(seed))
        out.append(batch)
    return out


def _only_one_head_matters(model, keep: tuple[int, int], factor: float = 0.1) -> None:
    """Scale every other head's value rows and output-projection columns by ``factor``: their outputs shrink,
    so removing any of them changes the loss far less than removing head ``keep``."""
    with torch.no_grad():
        for layer in model.adaptable_layers(["v", "o"]):
            w = layer.module.weight
            axis = 1 if layer.role == "o" else 0
            head_dim = w.shape[axis] // NUM_HEADS
            for head in range(NUM_HEADS):
                if (layer.block, head) != keep:
                    w.narrow(axis, head * head_dim, head_dim).mul_(factor)


def _context(model, batches, step: int = 0, total: int = 10) -> TrainContext:
    loss_fn = lambda batch: F.cross_entropy(model(batch), batch["labels"])  # noqa: E731
    return TrainContext(model=model, step=step, total_steps=total, loss_fn=loss_fn, batches=lambda: iter(batches))


def _heat(model_name: str, seed: int = 0, **params):
    torch.manual_seed(seed)
    model = load_model(model_name, 3)
    method = build_method("heat", {"rank": 4, "adapter_dim": 4, "calibration_batches": 2, **params})
    return model, method


def _perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _head_slice(t: torch.Tensor, axis: int, head: int) -> torch.Tensor:
    head_dim = t.shape[axis] // NUM_HEADS
    return t.narrow(axis, head * head_dim, head_dim)


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
@pytest.mark.parametrize("base", ["lora", "adapter"])
@pytest.mark.parametrize("strategy", ["weight", "gate", "adapter"])
def test_each_strategy_ranks_the_important_head_first(model_name, base, strategy):
    model, method = _heat(model_name, base=base, strategy=strategy)
    _only_one_head_matters(model, IMPORTANT)
    method.apply(model)
    batches = _batches(model)
    ctx = _context(model, batches, total=20)
    if strategy == "adapter":
        assert not method.on_train_start(ctx) and method.scores is None  # scored after the warm-up only
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for step in range(1, method.adapter_warmup_steps(ctx.total_steps) + 1):
            ctx.loss_fn(batches[step % 2]).backward()
            optimizer.step()
            optimizer.zero_grad()
            ctx.step = step
            assert method.on_step_end(ctx) == (step == 2)  # 10 % of 20 steps
    else:
        assert method.on_train_start(ctx)
    scores = method.scores
    assert scores.shape == (2, NUM_HEADS) and torch.isfinite(scores).all()
    assert divmod(int(scores.argmax()), NUM_HEADS) == IMPORTANT
    assert scores.flatten().sort(descending=True).values[1] < scores[IMPORTANT]
    assert IMPORTANT not in method.masked_heads() and len(method.masked_heads()) == 2  # 25 % of 8 heads


def test_gate_score_equals_the_output_projection_part_of_the_weight_score():
    """∂L/∂ξ_h = Σ W_o[:, h] ⊙ ∂L/∂W_o[:, h] (one batch, before |·|)."""
    model, method = _heat("tiny-bert", strategy="gate", calibration_batches=1)
    method.apply(model)
    batch = _batches(model, n=1)[0]
    gate = method.head_importance(model, [batch], _context(model, [batch]).loss_fn)
    o_layers = model.adaptable_layers(["o"])
    weights = [layer.module.base.weight for layer in o_layers]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(model(batch), batch["labels"]), weights)
    for w in weights:
        w.requires_grad_(False)
    expected = torch.stack([per_head_sum(w.detach() * g, NUM_HEADS, 1).abs() for w, g in zip(weights, grads)])
    torch.testing.assert_close(gate, expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradient behind


def test_adapter_score_of_lora_equals_the_delta_weight_sum():
    """Σ_{head's B rows / A columns} θ ∂L/∂θ = Σ_{head's ΔW slice} ΔW ⊙ ∂L/∂W (one batch, before |·|)."""
    model, method = _heat("tiny-vit", strategy="adapter", calibration_batches=1)
    method.apply(model)
    _perturb(model)
    batch = _batches(model, n=1)[0]
    scores = method.head_importance(model, [batch], _context(model, [batch]).loss_fn)
    layers = model.adaptable_layers(["q", "k", "v", "o"])
    weights = [layer.module.base.weight for layer in layers]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(model(batch), batch["labels"]), weights)
    expected = torch.zeros(2, NUM_HEADS)
    for layer, g in zip(layers, grads):
        axis = 1 if layer.role == "o" else 0
        expected[layer.block] += per_head_sum(layer.module.delta_weight().detach() * g, NUM_HEADS, axis)
    torch.testing.assert_close(scores, expected.abs(), rtol=1e-4, atol=1e-8)


def test_mask_ratio_and_scope_give_the_expected_number_of_masked_heads():
    scores = torch.tensor([[5.0, 1.0, 7.0, 3.0], [2.0, 8.0, 6.0, 4.0]])
    mask = head_mask_from_scores(scores, 0.25)
    assert mask.tolist() == [[1, 0, 1, 1], [0, 1, 1, 1]]  # the two lowest overall: 1.0 and 2.0
    assert int((head_mask_from_scores(scores, 0.5) == 0).sum()) == 4
    assert int((head_mask_from_scores(scores, 0.0) == 0).sum()) == 0
    per_layer = head_mask_from_scores(scores, 0.5, "per_layer")
    assert per_layer.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    model, method = _heat("tiny-vit", mask_ratio=0.5, mask_scope="per_layer", strategy="gate")
    method.apply(model)
    method.on_train_start(_context(model, _batches(model)))
    assert (method.head_mask == 0).sum(1).tolist() == [2, 2]


def _masked_model(model_name: str, base: str, seed: int = 0):
    model, method = _heat(model_name, seed=seed, base=base, strategy="gate")
    method.apply(model)
    _perturb(model)
    method.on_train_start(_context(model, _batches(model)))
    return model, method


@pytest.mark.parametrize("model_name,base", [("tiny-bert", "lora"), ("tiny-vit", "adapter")])
def test_masked_heads_get_zero_gradient_and_zero_update(model_name, base):
    model, method = _masked_model(model_name, base)
    masked = method.masked_heads()
    assert len(masked) == 2
    layers = [(l.block, l.role, l.module) for l in model.adaptable_layers(["q", "k", "v", "o"])]
    # (block, head, ΔW-axis, layer, head-sliced parameter, its axis) for every head slice of every layer
    slices = [(block, head, 1 if role == "o" else 0, layer, p, axis)
              for block, role, layer in layers for p, axis in layer.head_sliced_parameters()
              for head in range(NUM_HEADS)]  # fmt: skip
    for block, head, _, _, p, axis in slices:
        assert _head_slice(p, axis, head).any() != ((block, head) in masked)  # masked slices were zeroed
    dw_before = {id(layer): layer.delta_weight() for _, _, layer in layers} if base == "lora" else {}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    batch = _batches(model, n=1)[0]
    F.cross_entropy(model(batch), batch["labels"]).backward()
    for block, head, _, _, p, axis in slices:
        grad_is_zero = not _head_slice(p.grad, axis, head).any()
        assert grad_is_zero == ((block, head) in masked), f"head {block}.{head}: gradient zero {grad_is_zero}"
    optimizer.step()
    for block, head, dw_axis, layer, p, axis in slices:
        if (block, head) in masked:
            assert not _head_slice(p, axis, head).any()
        if base == "lora":
            after = _head_slice(layer.delta_weight(), dw_axis, head)
            before = _head_slice(dw_before[id(layer)], dw_axis, head)
            assert torch.equal(after, before) == ((block, head) in masked)
            if (block, head) in masked:
                assert not after.any()


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
def test_delta_weight_matches_forward_and_merges_after_masking(model_name):
    model, method = _masked_model(model_name, "lora")
    _perturb(model, seed=2)  # non-zero values everywhere, masked slices included
    for layer in method.adapted_layers(model).values():
        x = torch.randn(4, 5, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x) - layer.base(x), x @ layer.delta_weight().T, atol=1e-5, rtol=1e-4)
    batch = _batches(model, n=1)[0]
    model.eval()
    with torch.no_grad():
        before = model(batch)
        method.merge(model)
        after = model(batch)
    assert not method.adapted_layers(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_adapter_base_is_not_mergeable():
    model, method = _masked_model("tiny-vit", "adapter")
    assert not method.mergeable and all(l.delta_weight() is None for l in method.adapted_layers(model).values())
    with pytest.raises(TypeError):
        method.merge(model)


@pytest.mark.parametrize("model_name,base", [("tiny-bert", "lora"), ("tiny-vit", "adapter")])
def test_save_load_after_masking_reproduces_outputs(model_name, base):
    model, method = _masked_model(model_name, base)
    _perturb(model, seed=2)
    state, method_state = method.adapter_state_dict(model), json.loads(json.dumps(method.state()))
    batch = _batches(model, n=1)[0]
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    fresh, fresh_method = _heat(model_name, seed=5, base=base, strategy="gate")
    fresh_method.apply(fresh)
    fresh.eval()
    fresh_method.load_state(fresh, method_state)
    fresh_method.load_adapter_state_dict(fresh, state)
    assert fresh_method.masked_heads() == method.masked_heads()
    torch.testing.assert_close(fresh_method.scores, method.scores)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=1e-6)
        fresh_method.set_head_mask(fresh, torch.ones(2, NUM_HEADS))  # the mask is what made them equal
        assert not torch.allclose(fresh(batch), expected, atol=1e-4)


def test_parameter_count_and_config_validation():
    model = load_model("tiny-bert", 3)
    method = build_method("heat", {"rank": 4, "target_roles": ["q", "o"]})
    method.apply(model)
    assert method.adapter_param_count(model) == 2 * 2 * 4 * (32 + 32)
    adapter = build_method("heat", {"base": "adapter", "adapter_dim": 3})
    assert adapter.adapter_param_count(adapter.apply(load_model("tiny-vit", 3))) == 2 * 4 * 3 * (64 + 64)
    with pytest.raises(ValueError, match="do not split by head"):
        build_method("heat", {"target_roles": ["q", "fc1"]})
    with pytest.raises(ValueError, match="unknown role"):
        build_method("heat", {"target_roles": ["query"]})
    assert isinstance(method, HEAT) and method.artifacts(model) == {}  # nothing scored yet


@pytest.mark.parametrize(
    "model_name,dataset,params",
    [
        ("tiny-bert", {"name": "tweets-sentiment", "max_length": 16}, {"strategy": "adapter", "rank": 2}),
        ("tiny-vit", {"name": "digits"}, {"strategy": "weight", "base": "adapter", "adapter_dim": 2}),
    ],
)
def test_training_run_writes_the_score_matrix(tmp_path, model_name, dataset, params):
    from engine.spec import parse_spec
    from engine.train import MemoryReporter, train

    spec = parse_spec({
        "model": model_name,
        "dataset": {**dataset, "max_train": 64, "max_eval": 32},
        "method": {"name": "heat", "calibration_batches": 2, **params},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "device": "cpu", "log_every": 2},
    })  # fmt: skip
    reporter = MemoryReporter()
    result = train(spec, reporter, tmp_path)
    assert result.status == "succeeded" and result.steps == 8
    analysis = json.loads(open(result.artifacts["method_analysis"]).read())
    assert analysis["strategy"] == params["strategy"]
    assert len(analysis["scores"]) == 2 and all(len(row) == NUM_HEADS for row in analysis["scores"])
    assert sum(row.count(0.0) for row in analysis["head_mask"]) == 2
    assert analysis["calibrated_at_step"] == (1 if params["strategy"] == "adapter" else 0)  # 10 % of 8 steps
    assert any("HEAT" in m for m in reporter.messages)
    # The masked slices stay exactly zero through training (mask in the forward, optimizer rebuilt).
    saved = load_file(result.artifacts["adapter"])
    sliced = {"lora": {"q": ("lora_B", 0), "o": ("lora_A", 1)}, "adapter": {"q": ("heat_up", 0), "o": ("heat_down", 1)}}
    for layer in load_model(model_name, 3).adaptable_layers(["q", "k", "v", "o"]):
        name, axis = sliced[params.get("base", "lora")]["o" if layer.role == "o" else "q"]
        tensor = saved[f"{layer.name}.{name}.weight"]
        for head in range(NUM_HEADS):
            is_masked = [layer.block, head] in analysis["masked_heads"]
            assert _head_slice(tensor, axis, head).any() != is_masked, (layer.name, head)


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
def test_weight_strategy_values_by_hand(model_name):
    """TIS_weight[b, h] = mean over batches of |Σ_{q,k,v rows and o columns of head h} W ⊙ ∂L/∂W|, from the plain
    model's gradients sliced head by head here (values, not only the order)."""
    from engine.methods.heat import weight_importance

    torch.manual_seed(0)
    plain = load_model(model_name, 3).eval()
    batches = _batches(plain, n=2)
    layers = plain.adaptable_layers(["q", "k", "v", "o"])
    weights = [l.module.weight for l in layers]
    expected = torch.zeros(2, NUM_HEADS)
    for batch in batches:
        for w in weights:
            w.requires_grad_(True)
        grads = torch.autograd.grad(F.cross_entropy(plain(batch), batch["labels"]), weights)
        signed = torch.zeros(2, NUM_HEADS)
        for layer, w, g in zip(layers, weights, grads, strict=True):
            axis = 1 if layer.role == "o" else 0
            for head in range(NUM_HEADS):
                part = _head_slice(w.detach(), axis, head) * _head_slice(g, axis, head)
                signed[layer.block, head] += float(part.sum())
        expected += signed.abs() / len(batches)
    for w in weights:
        w.requires_grad_(False)

    model, method = _heat(model_name, strategy="weight")
    method.apply(model)
    model.eval()
    loss_fn = lambda batch: F.cross_entropy(model(batch), batch["labels"])  # noqa: E731
    scores = weight_importance(model, method.blocks, NUM_HEADS, iter(batches), loss_fn)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-8)
    assert scores.unique().numel() == scores.numel()  # distinct values: a swapped head would fail


def test_masked_head_slices_are_not_counted_as_trainable(tmp_path):
    model, method = _heat("tiny-bert", mask_ratio=0.25)
    method.apply(model)
    full = method.adapter_param_count(model)
    trainable = method.trainable_param_count(model)
    mask = torch.ones(2, NUM_HEADS)
    mask[0, 0] = mask[1, 3] = 0.0
    method.set_head_mask(model, mask)
    head_dim = 32 // NUM_HEADS
    masked = 2 * 4 * 4 * head_dim  # two heads × (q, k, v rows of B + o columns of A) × rank 4 × head_dim
    assert method.masked_adapter_params(model) == masked
    assert method.adapter_param_count(model) == full - masked
    assert method.trainable_param_count(model) == trainable - masked
