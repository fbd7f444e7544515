"""Model backends behind a registry: the three built-ins, their roles and forward, and a new one in one file."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from engine import backends
from engine.backends import base as backend_base
from engine.backends import get_backend, list_backends, register_backend
from engine.methods import build_method
from engine.models import ROLES, ModelInfo, TaskModel, load_model
from tests.conftest import tiny_image_batch, tiny_text_batch

BUNDLED_BACKENDS = {"tiny-bert": "hf-text", "tiny-hf-vit": "hf-image", "tiny-vit": "timm"}


def _expected_layers(name: str) -> list[tuple[str, str, int]]:
    """(module name, role, block) of every adaptable layer, written out from each model's structure."""
    paths = {
        "tiny-bert": (
            "net.bert.encoder.layer.{i}.",
            ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
        ),
        "tiny-hf-vit": (  # transformers 5's ViT layout
            "net.vit.layers.{i}.",
            ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"],
        ),
        "tiny-vit": ("net.blocks.{i}.", ["attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj", "mlp.fc1", "mlp.fc2"]),
    }  # fmt: skip
    prefix, leaves = paths[name]
    return [(prefix.format(i=i) + leaf, role, i) for i in range(2) for leaf, role in zip(leaves, ROLES)]


def test_registry_lists_the_three_backends():
    assert list_backends()[:3] == ["hf-text", "hf-image", "timm"]
    assert {get_backend(n).modality for n in ("hf-text", "hf-image", "timm")} == {"text", "image"}
    assert get_backend("hf-text").peft_task_type == "SEQ_CLS"
    assert get_backend("hf-image").peft_task_type is None
    assert not get_backend("timm").supports_peft
    with pytest.raises(KeyError, match="no model backend"):
        get_backend("nope")


@pytest.mark.parametrize("name", sorted(BUNDLED_BACKENDS))
def test_bundled_model_resolves_to_its_backend_with_the_same_layers(name):
    model = load_model(name, 3)
    assert model.kind == BUNDLED_BACKENDS[name]
    assert model.backend is get_backend(BUNDLED_BACKENDS[name])
    found = [(layer.name, layer.role, layer.block) for layer in model.adaptable_layers()]
    assert found == _expected_layers(name)
    assert all(isinstance(layer.module, nn.Linear) for layer in model.adaptable_layers())
    assert [layer.name for layer in model.adaptable_layers(["q", "fc2"])] == [
        n for n, role, _ in _expected_layers(name) if role in ("q", "fc2")
    ]
    # the single pattern list of before (every backend's patterns together) finds the same layers
    from engine.models import ROLE_PATTERNS

    old = []
    for module_name, _ in model.named_modules():
        for pattern, role in ROLE_PATTERNS:
            m = re.search(pattern, module_name)
            if m:
                old.append((module_name, role, int(m.group(1))))
                break
    assert old == found


def test_forward_equals_the_library_models_forward():
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    text = load_model("tiny-bert", 3).eval()
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    cfg.num_labels = 3
    torch.manual_seed(0)
    bert = BertForSequenceClassification(cfg).eval()
    batch = tiny_text_batch(text)
    with torch.no_grad():
        expected = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(text(batch), expected, rtol=0, atol=0)

    images = tiny_image_batch()
    resized = nn.functional.interpolate(images["images"], size=(32, 32), mode="bilinear", align_corners=False)
    pixels = (resized - 0.5) / 0.5
    hf_vit = load_model("tiny-hf-vit", 3).eval()
    vit_cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    vit_cfg.num_labels = 3
    torch.manual_seed(0)
    vit = ViTForImageClassification(vit_cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_vit(images), vit(pixel_values=pixels).logits, rtol=0, atol=0)

    import timm

    tiny = load_model("tiny-vit", 3).eval()
    torch.manual_seed(0)
    fused = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2, embed_dim=64,
        num_heads=4,
    ).eval()  # fmt: skip
    assert isinstance(fused.blocks[0].attn.qkv, nn.Linear)  # timm's own fused qkv, where ours is split
    mean = torch.tensor(tiny.info.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny.info.image_std).view(1, 3, 1, 1)
    # timm's data config resizes bicubically (the model resizes images not already at its size the same way)
    assert tiny.info.image_interpolation == "bicubic"
    bicubic = nn.functional.interpolate(images["images"], size=(32, 32), mode="bicubic", align_corners=False)
    timm_pixels = (bicubic - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(tiny(images), fused(timm_pixels), rtol=1e-5, atol=1e-6)


def test_a_duplicate_backend_name_is_refused():
    class AnotherTimm(backend_base.Backend):
        name = "timm"

    with pytest.raises(ValueError, match="already registered"):
        register_backend(AnotherTimm)
    assert get_backend("timm").__class__.__name__ == "TimmBackend"


class _ToyNet(nn.Module):
    def __init__(self, num_labels: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(4, 8), "down": nn.Linear(8, 4)}) for _ in range(2))
        self.head = nn.Linear(4, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](x)))
        return self.head(x)


@pytest.fixture
def registry(monkeypatch):
    """The registry as a copy, so a backend registered by a test is gone afterwards."""
    monkeypatch.setattr(backend_base, "_BACKENDS", dict(backend_base._BACKENDS))
    return backend_base


def test_a_new_backend_is_one_registration(registry):
    @register_backend
    class ToyBackend(registry.Backend):
        name = "toy"
        modality = "text"
        role_patterns = ((r"layers\.(\d+)\.up$", "fc1"), (r"layers\.(\d+)\.down$", "fc2"))

        def claims(self, name: str) -> bool:
            return name == "toy-mlp"

        def load(self, name, num_labels, options, trust_remote_code):
            torch.manual_seed(options.get("init_seed", 0))
            info = ModelInfo(name=name, modality="text", num_labels=num_labels, num_heads=0, num_layers=2,
                             head_names=["net.head"], source="random init")  # fmt: skip
            return TaskModel(_ToyNet(num_labels), info, self.name)

        def forward(self, model, batch):
            return model.net(batch["features"])

    assert "toy" in backends.list_backends()
    model = load_model("toy-mlp", 3)
    assert model.kind == "toy" and isinstance(model.backend, ToyBackend)
    assert [(layer.name, layer.role, layer.block) for layer in model.adaptable_layers()] == [
        ("net.layers.0.up", "fc1", 0), ("net.layers.0.down", "fc2", 0),
        ("net.layers.1.up", "fc1", 1), ("net.layers.1.down", "fc2", 1),
    ]  # fmt: skip
    x = torch.randn(5, 4)
    assert torch.equal(model({"features": x}), model.net(x))
    method = build_method("lora", {"rank": 2, "alpha": 4, "target_roles": ["fc1", "fc2"]})
    method.apply(model)
    assert sorted(method.adapted_layers(model)) == ["net.layers.0.down", "net.layers.0.up", "net.layers.1.down",
                                                    "net.layers.1.up"]  # fmt: skip
    assert model({"features": x}).shape == (5, 3)
