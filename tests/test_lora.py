"""LoRA against its maths and against Hugging Face PEFT."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine.methods import build_method
from engine.models import load_model
from tests.conftest import tiny_image_batch, tiny_text_batch

PEFT_TARGETS = {"tiny-bert": ["query", "value"], "minilm-l6": ["query", "value"]}


@pytest.mark.parametrize("model_name", ["tiny-bert", "minilm-l6"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_equals_peft_lora(model_name, use_rslora):
    torch.manual_seed(0)
    ours = load_model(model_name, 3)
    theirs = load_model(model_name, 3)
    theirs.load_state_dict(ours.state_dict())
    method = build_method("lora", {"rank": 4, "alpha": 8, "target_roles": ["q", "v"], "use_rslora": use_rslora})
    method.apply(ours)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=PEFT_TARGETS[model_name], lora_dropout=0.0, use_rslora=use_rslora
    )
    peft_net = get_peft_model(theirs.net, cfg)
    # Give B non-zero values, then copy our A and B into PEFT's layers.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            layer.lora_B.weight.normal_(0, 0.2, generator=g)
            path = name.removeprefix("net.")
            peft_layer = peft_net.base_model.model.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
            assert math.isclose(peft_layer.scaling["default"], layer.scaling)
    ours.eval(), peft_net.eval()
    batch = tiny_text_batch(ours)
    with torch.no_grad():
        a = ours(batch)
        b = peft_net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_parameter_count_formula():
    model = load_model("minilm-l6", 3)
    method = build_method("lora", {"rank": 8, "target_roles": ["q", "v"]})
    method.apply(model)
    # 6 layers x (q, v) x r (d_in + d_out) with d = 384
    assert method.adapter_param_count(model) == 6 * 2 * 8 * (384 + 384) == 73728
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 73728 + 384 * 3 + 3  # + classifier


def test_lora_starts_as_identity_and_delta_is_low_rank():
    torch.manual_seed(0)
    base = load_model("tiny-vit", 4)
    model = load_model("tiny-vit", 4)
    build_method("lora", {"rank": 2, "target_roles": ["q", "v", "fc1"]}).apply(model)
    batch = tiny_image_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch))  # B = 0: the adapted model is the base model
        for layer in [m for m in model.modules() if hasattr(m, "lora_B")]:
            layer.lora_B.weight.normal_()
            assert torch.linalg.matrix_rank(layer.delta_weight()) == 2


def test_bad_target_role_is_a_clear_error():
    from engine.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=r"method.target_roles.*unknown role"):
        parse_spec({"method": {"name": "lora", "target_roles": ["query"]}})


def test_method_configs_take_pefts_names():
    """PEFT users write ``r``, ``lora_alpha``, ``lora_dropout``: each means our field where the method has it."""
    from engine.methods import method_config
    from engine.spec import SpecError, parse_spec

    ours = method_config("lora", {"rank": 4, "alpha": 8.0, "dropout": 0.1})
    assert method_config("lora", {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}) == ours
    assert method_config("dora", {"r": 2}).rank == 2
    with pytest.raises(SpecError, match="method: r and rank are one setting"):
        parse_spec({"method": {"name": "lora", "r": 4, "rank": 8}})
    with pytest.raises(SpecError, match="method.lora_alpha: Extra inputs"):  # NEAT has no α: still a typo
        parse_spec({"method": {"name": "neat", "lora_alpha": 3}})
