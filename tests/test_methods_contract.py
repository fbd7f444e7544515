"""The one contract every registered method passes, on tiny text, vision and causal language models.

A new method joins automatically (the registry is iterated); ``Method.test_params`` sets its small
test configuration. Checks: inject, forward, backward, parameter count = closed form, ΔW consistent with
the forward, merge equivalence, save -> load -> same outputs.
"""

from __future__ import annotations

import pytest
import torch

from engine.lm_eval import causal_lm_loss
from engine.methods import build_method, get_method, method_names
from engine.models import load_model
from tests.conftest import batch_for

MODELS = ["tiny-bert", "tiny-vit", "tiny-hf-vit", "tiny-llama", "tiny-gpt2"]


def _loss(model, batch, logits):
    """Cross-entropy of the task: classes (shape (3, 5)) or next tokens over the response (causal LMs)."""
    if model.info.modality == "causal-lm":
        assert logits.shape[:2] == batch["input_ids"].shape
        return causal_lm_loss(logits, batch["labels"])
    assert logits.shape == (3, 5)
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def _adapted(method_name: str, model_name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(model_name, 5)
    method = build_method(method_name, get_method(method_name).test_params)
    method.apply(model)
    model.eval()
    return model, method


def _perturb(model, method, seed: int = 1) -> None:
    """Give every adapter tensor a non-trivial value (B = 0 at init would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:  # adapter tensors and the task head
                p.add_(0.05 * torch.randn(p.shape, generator=g))


CASES = [(m, mdl) for m in method_names() for mdl in MODELS]


@pytest.mark.parametrize("method_name,model_name", CASES)
def test_forward_backward_and_counts(method_name, model_name):
    model, method = _adapted(method_name, model_name)
    batch = batch_for(model)
    _loss(model, batch, model(batch)).backward()
    head = set(model.head_parameter_names())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n in head or method.is_adapter_key(n) for n in trainable)
    assert all(p.grad is not None for p in trainable.values()), "a trainable tensor got no gradient"
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    adapter = sum(p.numel() for n, p in trainable.items() if n not in head)
    assert method.adapter_param_count(model) == adapter


@pytest.mark.parametrize("method_name,model_name", CASES)
def test_delta_weight_matches_forward(method_name, model_name):
    model, method = _adapted(method_name, model_name)
    _perturb(model, method)
    layers = method.adapted_layers(model)
    for name, layer in layers.items():
        dw = layer.delta_weight()
        if dw is None or not layer.linear_in_x:
            continue
        x = torch.randn(4, 6, layer.in_features)
        with torch.no_grad():
            diff = layer(x) - layer.base(x)
            expected = x @ dw.T
            db = layer.delta_bias()
            if db is not None:
                expected = expected + db
        torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-4, msg=f"{name}: adapted - base != ΔW x")


@pytest.mark.parametrize("method_name,model_name", CASES)
def test_merge_equivalence(method_name, model_name):
    model, method = _adapted(method_name, model_name)
    if not method.mergeable:
        with pytest.raises(TypeError):
            method.merge(model)
        return
    _perturb(model, method)
    batch = batch_for(model)
    with torch.no_grad():
        before = model(batch)
        method.merge(model)
        after = model(batch)
    assert not method.adapted_layers(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method_name,model_name", CASES)
def test_save_load_round_trip(method_name, model_name):
    model, method = _adapted(method_name, model_name, seed=0)
    _perturb(model, method)
    state, mstate = method.adapter_state_dict(model), method.state()
    batch = batch_for(model)
    with torch.no_grad():
        expected = model(batch)
    fresh, fresh_method = _adapted(method_name, model_name, seed=1)
    fresh_method.load_state(fresh, mstate)
    fresh_method.load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=1e-6)
