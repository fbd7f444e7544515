"""The declared low-rank contract, checked for every registered method (a new method joins automatically).

For each method's adapted layers: ``low_rank_factors_of`` gives None or factors of the right shapes whose
``scaling · B A`` is the layer's ΔW; a rank choice truncates to the leading components where the layer supports
it and is refused where it does not; ``Method.peft_lora_options()`` matches the config (PEFT's names included)
and the scaling of the factors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.errors import UserError
from engine.methods import build_method, get_method, method_names
from engine.methods.base import LowRankLinear, RankChoiceError, low_rank_factors_of
from engine.methods.lora import LoRALinear
from engine.methods.lowrank import LowRankFactors, lora_scaling
from engine.models import load_model

PEFT_NAMES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


def _adapted(name: str):
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method(name, get_method(name).test_params)
    method.apply(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # B = 0 at init would make every check trivially true
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), method


@pytest.mark.parametrize("name", method_names())
def test_factors_are_the_delta_weight(name):
    model, method = _adapted(name)
    layers = method.adapted_layers(model)
    options = method.peft_lora_options()
    with torch.no_grad():
        for layer_name, layer in layers.items():
            factors = low_rank_factors_of(layer)
            if factors is None:
                assert not isinstance(layer, LowRankLinear), layer_name
                continue
            assert isinstance(factors, LowRankFactors)
            r = factors.rank
            assert factors.A.shape == (r, layer.in_features) and factors.B.shape == (layer.out_features, r)
            delta = layer.delta_weight()
            assert delta is not None and float(delta.abs().max()) > 0, f"{layer_name}: ΔW is zero, nothing checked"
            torch.testing.assert_close(factors.scaling * (factors.B @ factors.A), delta, atol=1e-6, rtol=1e-5)
            b_scaled, a = factors  # the (scaled B, A) pair callers unpacked before
            torch.testing.assert_close(b_scaled @ a, delta, atol=1e-6, rtol=1e-5)
            assert options is not None, f"{name} has low-rank factors but states no PEFT LoRA options"
            assert r == options.r
            assert math.isclose(factors.scaling, lora_scaling(options.lora_alpha, r, options.use_rslora))
    if options is not None and layers:  # a stated LoRA form has factors to write, in the layers or the variant
        named = options.variant is not None and options.variant.factor_A and options.variant.factor_B
        assert named or all(isinstance(layer, LowRankLinear) for layer in layers.values())


@pytest.mark.parametrize("name", method_names())
def test_rank_choice_truncates_or_is_refused(name):
    model, method = _adapted(name)
    with torch.no_grad():
        for layer in method.adapted_layers(model).values():
            full = low_rank_factors_of(layer)
            if full is None:
                assert low_rank_factors_of(layer, 1) is None  # no factors at any rank
                continue
            if not layer.supports_rank_choice:
                with pytest.raises(RankChoiceError, match="svd_rank"):
                    low_rank_factors_of(layer, 1)
                continue
            stored = low_rank_factors_of(layer, layer.rank)
            assert stored is not None
            for rank in range(1, layer.rank + 1):
                cut = low_rank_factors_of(layer, rank)
                assert cut is not None and cut.rank == rank
                torch.testing.assert_close(cut.A, stored.A[:rank])
                torch.testing.assert_close(cut.B, stored.B[:, :rank])
                assert cut.scaling > 0
            for bad in (0, layer.rank + 1):
                with pytest.raises(RankChoiceError, match=f"1..{layer.rank}"):
                    low_rank_factors_of(layer, bad)


@pytest.mark.parametrize("name", method_names())
def test_peft_lora_options_follow_the_config_and_peft_names(name):
    params = dict(get_method(name).test_params)
    options = build_method(name, params).peft_lora_options()
    if options is None:
        return
    for ours in PEFT_NAMES:
        params.pop(ours, None)
    params.update({"r": 3, "lora_alpha": 6.0, "lora_dropout": 0.1})
    method = build_method(name, params)
    options = method.peft_lora_options()
    assert options is not None
    assert (options.r, options.lora_alpha, options.lora_dropout) == (3, 6.0, 0.1)
    assert options.variant == method.peft_variant
    assert method.default_export_rank() == 3


def test_rslora_and_init_are_stated_by_the_method():
    lora = build_method("lora", {"r": 4, "lora_alpha": 8.0, "use_rslora": True}).peft_lora_options()
    assert lora is not None and lora.use_rslora and lora.init is True
    pissa = build_method("pissa", {"svd_niter": 2}).peft_lora_options()
    assert pissa is not None and pissa.init == "pissa_niter_2"
    dora = build_method("dora").peft_lora_options()
    assert dora is not None and dora.variant is not None and ("use_dora", True) in dora.variant.flags
    assert build_method("heat", {"base": "adapter"}).peft_lora_options() is None
    assert build_method("dylora", {"rank": 6, "eval_rank": 2}).peft_lora_options().r == 2


def test_rank_choice_error_is_a_user_error_and_names_the_fix():
    layer = LoRALinear(nn.Linear(4, 3), rank=2, scaling=1.0)
    with pytest.raises(UserError, match="takes no rank: convert at a chosen rank with svd_rank"):
        layer.low_rank_factors(2)
    with pytest.raises(TypeError):  # callers of the old rank-less signature caught TypeError
        layer.low_rank_factors(rank=1)


@pytest.mark.parametrize(
    "name,params,factor_rank_max",
    [("lora", {"rank": 4}, None), ("dylora", {"rank": 5, "eval_rank": 2}, 5), ("dora", {"rank": 3}, None)],
)
def test_export_options_read_the_contract(name, params, factor_rank_max):
    """The export page offers an exact PEFT export and a factor rank from the declared contract alone."""
    from app.analysis_common import export_options

    model = load_model("tiny-bert", 3)
    method = build_method(name, params)
    method.apply(model)
    options = export_options(model, method)
    assert options.peft_exact_reason is None
    assert options.factor_rank_max == factor_rank_max
    assert options.default_rank == method.default_export_rank() == params["rank"]
