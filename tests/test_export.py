"""Export (native, PEFT, merged) and import of adapters: equal outputs after each round trip, and clear errors."""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from engine.export import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    MANIFEST_FILE,
    PEFT_WEIGHTS_FILE,
    README_FILE,
    AdapterFileError,
    BaseModelMismatch,
    ExportError,
    UnsafePathError,
    export_model,
    export_run,
    fresh_model,
    import_adapter,
    load_adapter,
    load_merged,
)
from engine.methods import Method, build_method, get_method, method_names
from engine.methods.base import low_rank_factors_of
from engine.models import load_model
from engine.spec import parse_spec
from engine.train import Prepared, prepare, save_adapter
from jobs.imports import record_import
from tests.conftest import batch_for

DATASET = {"text": "tweets-sentiment", "image": "digits"}
MODALITY = {"tiny-bert": "text", "minilm-l6": "text", "tiny-hf-vit": "image", "tiny-vit": "image"}


@cache
def _data(model_name: str):
    """The (small) data bundle of a model's modality, prepared once."""
    spec = parse_spec({"model": model_name, "dataset": {"name": DATASET[MODALITY[model_name]], "max_train": 8,
                                                        "max_eval": 8}})  # fmt: skip
    return prepare(spec).data


def _perturb(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Non-trivial values for every trainable tensor (B = 0 at init would hide bugs); 0 training steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def make_run(tmp_path: Path, model_name: str, method_name: str, params: dict, seed: int = 0):
    """A run directory as ``engine.train`` leaves it (adapter.safetensors + adapter_config.json), and its model."""
    spec = parse_spec({"model": model_name, "dataset": {"name": DATASET[MODALITY[model_name]]},
                       "method": {"name": method_name, **params}, "train": {"seed": seed}})  # fmt: skip
    data = _data(model_name)
    model = load_model(model_name, data.num_labels)
    torch.manual_seed(seed)
    method = build_method(method_name, params)
    method.apply(model)
    _perturb(model)
    model.eval()
    run_dir = tmp_path / f"run-{method_name}-{model_name}"
    save_adapter(Prepared(spec, model, method, data, torch.device("cpu")), run_dir)
    return run_dir, model, method


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def _peft_logits(peft_model, batch) -> torch.Tensor:
    with torch.no_grad():
        return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _fresh_peft_base(model_name: str, num_labels: int):
    """The pretrained HF model with a task head that differs from the adapter's (so the head must round-trip)."""
    torch.manual_seed(1234)
    base = load_model(model_name, num_labels)
    torch.manual_seed(4321)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name in set(base.head_parameter_names()):
                p.normal_(0, 1)
    return base


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --- PEFT layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny-bert", "minilm-l6"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_round_trip_lora(tmp_path, model_name, use_rslora):
    params = {"rank": 4, "alpha": 8, "target_roles": ["q", "v"], "use_rslora": use_rslora}
    run_dir, model, _ = make_run(tmp_path, model_name, "lora", params)
    batch = batch_for(model)
    expected = _logits(model, batch)

    result = export_run(run_dir, "peft", "peft-out", root=tmp_path / "exports", summary={"final_metrics": {}})
    assert result.relative_error < 1e-6
    cfg = json.loads((result.path / ADAPTER_CONFIG_FILE).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == ("LORA", 4, 8, use_rslora)
    assert sorted(cfg["target_modules"]) == ["query", "value"] and cfg["modules_to_save"] == ["classifier"]
    keys = set(load_file(str(result.path / PEFT_WEIGHTS_FILE)))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys

    base = _fresh_peft_base(model_name, model.info.num_labels)
    assert not torch.allclose(_logits(base, batch), expected, atol=1e-3)  # the fresh head differs
    peft_model = PeftModel.from_pretrained(base.net, str(result.path)).eval()
    torch.testing.assert_close(_peft_logits(peft_model, batch), expected, atol=1e-5, rtol=1e-5)


def test_peft_layout_equals_peft_save_pretrained(tmp_path):
    """Our file has the keys and tensors PEFT's own ``save_pretrained`` writes for the same adapter."""
    run_dir, model, method = make_run(tmp_path, "tiny-bert", "lora", {"rank": 3, "alpha": 6})
    ours = load_file(str(export_run(run_dir, "peft", "ours", root=tmp_path / "x").path / PEFT_WEIGHTS_FILE))
    base = load_model("tiny-bert", model.info.num_labels)
    peft_model = get_peft_model(base.net, LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"],
                                                     modules_to_save=["classifier"]))  # fmt: skip
    with torch.no_grad():
        for name, layer in method.adapted_layers(model).items():
            theirs = peft_model.base_model.model.get_submodule(name.removeprefix("net."))
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
        wrapper = peft_model.base_model.model.classifier
        wrapper.modules_to_save["default"].load_state_dict(model.net.classifier.state_dict())
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    theirs = load_file(str(tmp_path / "theirs" / PEFT_WEIGHTS_FILE))
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-7, rtol=1e-6)


def _exact_peft_methods() -> list[str]:
    """Registered methods whose every adapted layer has low-rank factors (or a PEFT variant entry)."""
    names = []
    for name in method_names():
        model = load_model("tiny-bert", 3)
        method = build_method(name, get_method(name).test_params)
        method.apply(model)
        layers = list(method.adapted_layers(model).values())
        if layers and (method.peft_variant is not None or all(low_rank_factors_of(l) is not None for l in layers)):
            names.append(name)
    return names


def test_peft_exact_export_for_every_low_rank_method(tmp_path):
    """Every method with low-rank factors (LoRA, DoRA, PiSSA, CorDA, DyLoRA, HEAT, ...) round-trips through PEFT."""
    names = _exact_peft_methods()
    assert "lora" in names
    for name in names:
        run_dir, model, _ = make_run(tmp_path, "tiny-bert", name, get_method(name).test_params)
        batch = batch_for(model)
        result = export_run(run_dir, "peft", f"peft-{name}", root=tmp_path / "exports")
        assert result.weight_error < 1e-6, name
        base = _fresh_peft_base("tiny-bert", model.info.num_labels)
        peft_model = PeftModel.from_pretrained(base.net, str(result.path)).eval()
        torch.testing.assert_close(_peft_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


def test_peft_round_trip_dora(tmp_path):
    if "dora" not in method_names():
        pytest.skip("no method named 'dora' is registered (engine/methods/dora.py)")
    run_dir, model, method = make_run(tmp_path, "tiny-bert", "dora", get_method("dora").test_params)
    batch = batch_for(model)
    result = export_run(run_dir, "peft", "dora-out", root=tmp_path / "exports")
    assert json.loads((result.path / ADAPTER_CONFIG_FILE).read_text())["use_dora"] is True
    saved = load_file(str(result.path / PEFT_WEIGHTS_FILE))
    name, layer = next(iter(method.adapted_layers(model).items()))
    magnitude = saved["base_model.model." + name.removeprefix("net.") + ".lora_magnitude_vector"]
    torch.testing.assert_close(magnitude, getattr(layer, get_method("dora").peft_variant.magnitude).detach())
    base = _fresh_peft_base("tiny-bert", model.info.num_labels)
    peft_model = PeftModel.from_pretrained(base.net, str(result.path)).eval()
    torch.testing.assert_close(_peft_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_dylora_exports_at_a_chosen_rank(tmp_path):
    if "dylora" not in method_names():
        pytest.skip("no method named 'dylora' is registered (engine/methods/dylora.py)")
    run_dir, model, method = make_run(tmp_path, "tiny-bert", "dylora", {"rank": 4, "alpha": 8.0})
    result = export_run(run_dir, "peft", "rank-2", root=tmp_path / "x", factor_rank=2)
    assert json.loads((result.path / ADAPTER_CONFIG_FILE).read_text())["r"] == 2
    assert 0 < result.relative_error < 1  # differs from the rank-4 evaluation the run was saved with
    method.set_eval_rank(model, 2)  # the lab's own evaluation at rank 2: nested truncation, scaling α/2
    batch = batch_for(model)
    peft_model = PeftModel.from_pretrained(_fresh_peft_base("tiny-bert", 3).net, str(result.path)).eval()
    torch.testing.assert_close(_peft_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_frozen_residual_is_folded_into_the_factors(tmp_path):
    """PiSSA-style: the frozen weight is W0 − s B0 A0 (top-r SVD of W0); PEFT on W0 must still match."""
    model = load_model("tiny-bert", 3)
    method = build_method("lora", {"rank": 2, "alpha": 4, "target_roles": ["q", "v"]})
    method.apply(model)
    with torch.no_grad():
        for i, layer in enumerate(method.adapted_layers(model).values()):
            u, s, vh = torch.linalg.svd(layer.base.weight, full_matrices=False)
            root = (s[:2] / layer.scaling).sqrt()
            root[1] *= i > 0  # the first layer's residual has rank 1: a per-layer rank in PEFT's rank_pattern
            layer.lora_B.weight.copy_(u[:, :2] * root)
            layer.lora_A.weight.copy_(root[:, None] * vh[:2])
            layer.base.weight.sub_(layer.delta_weight())
    _perturb(model, scale=0.05)
    model.eval()
    meta = {"method": "lora", "method_config": method.config.model_dump(), "model": "tiny-bert", "num_labels": 3}
    result = export_model(model, method, meta, "peft", "pissa", root=tmp_path, base=load_model("tiny-bert", 3))
    cfg = json.loads((result.path / ADAPTER_CONFIG_FILE).read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)  # rank 2r, α grown with it as PEFT's conversion: scaling kept
    first = r"bert\.encoder\.layer\.0\.attention\.self\.query"
    assert cfg["rank_pattern"] == {first: 3} and cfg["alpha_pattern"] == {first: 6}
    assert "Residual note" in (result.path / README_FILE).read_text()
    assert result.relative_error < 1e-5
    batch = batch_for(model)
    peft_model = PeftModel.from_pretrained(_fresh_peft_base("tiny-bert", 3).net, str(result.path)).eval()
    torch.testing.assert_close(_peft_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def _mergeable_without_factors() -> str | None:
    """A registered mergeable method whose layers have a ΔW but no ``low_rank_factors`` (needs the SVD path)."""
    for name in method_names():
        method = build_method(name, get_method(name).test_params)
        if get_method(name).peft_variant is not None or not method.mergeable:
            continue
        model = load_model("tiny-bert", 3)
        method.apply(model)
        layers = list(method.adapted_layers(model).values())
        has_factors = get_method(name).peft_variant is not None or any(
            low_rank_factors_of(l) is not None for l in layers
        )
        if method.mergeable and layers and not has_factors:
            return name
    return None


def test_svd_conversion_exact_at_full_rank_and_reports_truncation(tmp_path):
    name = _mergeable_without_factors()
    if name is None:
        pytest.skip("no registered mergeable method without low_rank_factors")
    run_dir, model, _ = make_run(tmp_path, "tiny-bert", name, get_method(name).test_params)
    batch = batch_for(model)
    with pytest.raises(ExportError, match="svd_rank"):
        export_run(run_dir, "peft", "exact", root=tmp_path / "x")
    full = export_run(run_dir, "peft", "full-rank", root=tmp_path / "x", svd_rank=32)  # tiny-bert: d = 32
    assert full.relative_error < 1e-6
    peft_model = PeftModel.from_pretrained(_fresh_peft_base("tiny-bert", 3).net, str(full.path)).eval()
    torch.testing.assert_close(_peft_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)

    low = export_run(run_dir, "peft", "rank-1", root=tmp_path / "x", svd_rank=1)
    assert low.relative_error > 1e-2 and all(0 < e < 1 for e in low.layer_errors.values())
    assert f"{low.relative_error:.3e}" in (low.path / README_FILE).read_text()
    assert json.loads((low.path / ADAPTER_CONFIG_FILE).read_text())["r"] == 1


def _base_with_biases(seed: int = 5):
    """tiny-bert with non-zero biases (its random init has zero biases, which would hide a Δb)."""
    model = load_model("tiny-bert", 3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_bias_updates_are_carried_by_lora_bias(tmp_path):
    """A mergeable method with Δb ≠ 0 (e.g. Hydra's sequential branch, Δb = s B_s A_s b0) keeps it in PEFT."""
    for name in method_names():
        method = build_method(name, get_method(name).test_params)
        if get_method(name).peft_variant is not None or not method.mergeable:
            continue
        model = _base_with_biases()
        method.apply(model)
        _perturb(model)
        layers = method.adapted_layers(model).values()
        if any(l.delta_bias() is not None and bool(l.delta_bias().abs().max() > 0) for l in layers):
            break
    else:
        pytest.skip("no registered mergeable method changes a bias")
    model.eval()
    meta = {"method": name, "method_config": method.config.model_dump(), "model": "tiny-bert", "num_labels": 3}
    result = export_model(model, method, meta, "peft", "bias", root=tmp_path, base=_base_with_biases(), svd_rank=32)
    assert json.loads((result.path / ADAPTER_CONFIG_FILE).read_text())["lora_bias"] is True
    assert any(k.endswith("lora_B.bias") for k in load_file(str(result.path / PEFT_WEIGHTS_FILE)))
    base = _base_with_biases()
    batch = batch_for(model)
    peft_model = PeftModel.from_pretrained(base.net, str(result.path)).eval()
    torch.testing.assert_close(_peft_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_peft_refuses_non_linear_methods(tmp_path):
    names = [n for n in method_names() if not build_method(n, get_method(n).test_params).mergeable]
    run_dir, *_ = make_run(tmp_path, "tiny-bert", names[0], get_method(names[0]).test_params)
    with pytest.raises(ExportError):
        export_run(run_dir, "peft", "out", root=tmp_path / "x", svd_rank=4)
    with pytest.raises(ExportError, match="not mergeable|no adapted"):
        export_run(run_dir, "merged", "out", root=tmp_path / "x")
    assert _listing(tmp_path / "x") == []


# --- merged --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-hf-vit", "tiny-vit"])
def test_merged_export_equals_adapted_model(tmp_path, model_name):
    run_dir, model, _ = make_run(tmp_path, model_name, "lora", {"rank": 2, "target_roles": ["q", "v", "fc1"]})
    batch = batch_for(model)
    expected = _logits(model, batch)
    result = export_run(run_dir, "merged", "merged", root=tmp_path / "x")
    if model_name == "tiny-bert":
        from transformers import AutoModelForSequenceClassification

        net = AutoModelForSequenceClassification.from_pretrained(str(result.path)).eval()
        assert net.config.id2label[0] == "negative"
        with torch.no_grad():
            got = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    elif model_name == "tiny-hf-vit":
        from transformers import AutoModelForImageClassification

        net = AutoModelForImageClassification.from_pretrained(str(result.path)).eval()
        with torch.no_grad():
            got = net(pixel_values=model.preprocess_images(batch["images"])).logits
    else:  # timm: q, k, v fused back into timm's own qkv layout, loadable by a plain timm model
        import timm

        cfg = json.loads((result.path / "config.json").read_text())
        net = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"], img_size=32,
                                patch_size=8, depth=2, embed_dim=64, num_heads=4)  # tiny-vit's arguments # fmt: skip
        net.load_state_dict(load_file(str(result.path / "model.safetensors")), strict=True)
        torch.testing.assert_close(_logits(net.eval(), model.preprocess_images(batch["images"])), expected)
        got = _logits(load_merged(result.path), batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- native --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", method_names())
def test_native_round_trip_every_method(tmp_path, method_name):
    params = get_method(method_name).test_params
    run_dir, model, method = make_run(tmp_path, "tiny-bert", method_name, params)
    batch = batch_for(model)
    summary = {"final_metrics": {"eval_accuracy": 0.625}, "steps": 0}
    result = export_run(run_dir, "native", "native", root=tmp_path / "x", summary=summary)
    meta = json.loads((result.path / ADAPTER_CONFIG_FILE).read_text())
    assert meta["method"] == method_name and meta["lab_version"].startswith("peftlab ")
    assert meta["base_model"]["name"] == "tiny-bert" and meta["base_model"]["fingerprint"]
    assert [l["name"] for l in meta["target_layers"]] == list(method.adapted_layers(model))
    assert "0.6250" in (result.path / README_FILE).read_text()
    manifest = json.loads((result.path / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {ADAPTER_FILE, ADAPTER_CONFIG_FILE, README_FILE}
    assert manifest["files"][ADAPTER_FILE]["sha256"] == result.files[ADAPTER_FILE]
    assert (result.path / ADAPTER_FILE).read_bytes() == (run_dir / ADAPTER_FILE).read_bytes()

    loaded, loaded_method = load_adapter(result.path)
    assert type(loaded_method) is type(method)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)


# --- errors --------------------------------------------------------------------------------------------


def test_corrupt_files_give_clear_errors_and_write_nothing(tmp_path, lab_env):
    from db import config, store

    run_dir, model, _ = make_run(tmp_path, "tiny-bert", "lora", {"rank": 2})
    exported = export_run(run_dir, "native", "good", root=tmp_path / "x")
    data = (run_dir / ADAPTER_FILE).read_bytes()
    (run_dir / ADAPTER_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(AdapterFileError, match=str(run_dir / ADAPTER_FILE)):
        export_run(run_dir, "peft", "bad", root=tmp_path / "x")
    assert os.listdir(tmp_path / "x") == ["good"]  # no "bad", no temporary directory

    flipped = bytearray((exported.path / ADAPTER_FILE).read_bytes())
    flipped[-3] ^= 0xFF  # a flipped bit inside a tensor: the manifest's sha256 catches it
    (exported.path / ADAPTER_FILE).write_bytes(bytes(flipped))
    with pytest.raises(AdapterFileError, match=f"{exported.path / ADAPTER_FILE} is corrupt"):
        load_adapter(exported.path)
    with pytest.raises(AdapterFileError):
        record_import(exported.path)
    assert _listing(config.artifacts_root()) == [] and store.list_runs() == []

    (run_dir / ADAPTER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterFileError, match=str(run_dir / ADAPTER_CONFIG_FILE)):
        load_adapter(run_dir)


def test_wrong_base_model_names_both_models_and_the_tensor(tmp_path):
    run_dir, model, _ = make_run(tmp_path, "tiny-bert", "lora", {"rank": 2})
    with pytest.raises(BaseModelMismatch) as err:
        load_adapter(run_dir, model=load_model("minilm-l6", 3))
    message = str(err.value)
    assert "'tiny-bert'" in message and "'minilm-l6'" in message
    assert "net.bert.encoder.layer.0.attention.self.query.lora_A.weight" in message
    assert "(2, 32)" in message and "(2, 384)" in message

    # Same architecture, other weights: caught by the base fingerprint of a native export.
    exported = export_run(run_dir, "native", "native", root=tmp_path / "x")
    other = load_model("tiny-bert", 3, options={"init_seed": 7})
    with pytest.raises(BaseModelMismatch, match=r"first mismatched tensor net\.bert\.embeddings.*different values"):
        load_adapter(exported.path, model=other)

    # An adapter whose config names another base model: the export fails and leaves nothing behind.
    meta = json.loads((run_dir / ADAPTER_CONFIG_FILE).read_text())
    meta["model"] = "minilm-l6"
    (run_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(BaseModelMismatch, match="minilm-l6"):
        export_run(run_dir, "merged", "wrong", root=tmp_path / "y")
    assert _listing(tmp_path / "y") == []


def test_output_names_cannot_escape_the_export_root(tmp_path):
    run_dir, *_ = make_run(tmp_path, "tiny-bert", "lora", {"rank": 2})
    root, outside = tmp_path / "exports", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    for name in ["../escape", "a/../../escape", str(outside / "abs"), "link/inside", ""]:
        with pytest.raises(UnsafePathError):
            export_run(run_dir, "native", name, root=root)
    assert _listing(outside) == [] and _listing(root) == ["link"]
    inside = export_run(run_dir, "native", str(root / "nested" / "ok"), root=root)  # absolute but inside: fine
    assert inside.path == (root / "nested" / "ok").resolve()


def test_existing_export_is_kept_unless_overwritten_and_failures_keep_it(tmp_path):
    run_dir, *_ = make_run(tmp_path, "tiny-bert", "lora", {"rank": 2})
    first = export_run(run_dir, "native", "out", root=tmp_path / "x")
    before = (first.path / MANIFEST_FILE).read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_run(run_dir, "native", "out", root=tmp_path / "x")
    with pytest.raises(ExportError, match="svd_rank must be"):
        export_run(run_dir, "peft", "out", root=tmp_path / "x", overwrite=True, svd_rank=0)
    assert (first.path / MANIFEST_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path / "x")) == ["out"]  # no temporary directory left
    second = export_run(run_dir, "peft", "out", root=tmp_path / "x", overwrite=True)
    assert (second.path / PEFT_WEIGHTS_FILE).is_file() and not (second.path / ADAPTER_FILE).exists()


# --- import --------------------------------------------------------------------------------------------


def test_import_native_into_db(tmp_path, lab_env):
    from db import config, store
    from db.store import sha256_file

    run_dir, model, _ = make_run(tmp_path, "tiny-bert", "lora", {"rank": 2, "alpha": 4})
    summary = {"final_metrics": {"eval_accuracy": 0.5, "eval_loss": 1.1}}
    exported = export_run(run_dir, "native", "native", root=tmp_path / "x", summary=summary)
    run_id = record_import(exported.path, name="imported lora")

    run = store.get_run(run_id)
    assert (run["status"], run["executor"], run["method"], run["model"]) == ("succeeded", "import", "lora", "tiny-bert")
    assert run["name"] == "imported lora" and "imported" in run["tags"] and run["progress"] == 1.0
    assert run["summary"]["final_metrics"] == summary["final_metrics"] and run["trainable_params"] > 0
    artifacts = {a["kind"]: a for a in store.list_artifacts(run_id)}
    assert set(artifacts) == {"adapter", "adapter_config", "model_card"}
    for artifact in artifacts.values():
        path = Path(artifact["path"])
        assert path.parent == config.run_dir(run_id)
        assert artifact["sha256"] == sha256_file(path) == exported.files[path.name]

    loaded, _ = load_adapter(config.run_dir(run_id))
    batch = batch_for(model)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)


def test_import_peft_layout_maps_back_to_lora(tmp_path, lab_env):
    from db import config, store

    params = {"rank": 3, "alpha": 5, "use_rslora": True, "target_roles": ["q", "fc1"], "blocks": [1]}
    run_dir, model, _ = make_run(tmp_path, "tiny-bert", "lora", params)
    exported = export_run(run_dir, "peft", "peft", root=tmp_path / "x")
    imported = import_adapter(exported.path)
    assert imported.source_format == "peft" and imported.spec["method"]["name"] == "lora"
    assert {k: imported.meta.method_config[k] for k in params} == {**params, "alpha": 5.0}

    run_id = record_import(exported.path)
    assert store.get_run(run_id)["executor"] == "import"
    assert {a["kind"] for a in store.list_artifacts(run_id)} >= {"adapter", "adapter_config"}
    loaded, method = load_adapter(config.run_dir(run_id))
    assert math.isclose(next(iter(method.adapted_layers(loaded).values())).scaling, 5 / math.sqrt(3))
    batch = batch_for(model)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)


def test_import_foreign_peft_adapter_with_mixed_ranks(tmp_path):
    """An adapter saved by PEFT itself (rank_pattern, no lab metadata) loads into our lora with equal logits."""
    base = load_model("tiny-bert", 3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                     rank_pattern={"layer.1.attention.self.value": 2}, alpha_pattern={"layer.0.*query": 3})  # fmt: skip
    peft_model = get_peft_model(base.net, cfg)
    _perturb(peft_model, scale=0.2)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "foreign"))
    batch = batch_for(base)
    expected = _peft_logits(peft_model, batch)
    loaded, method = load_adapter(tmp_path / "foreign", model=load_model("tiny-bert", 3))
    assert method.config.rank == 4 and method.config.target_roles == ["q", "v"]
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)


def test_fresh_model_rebuilds_the_base_by_name():
    meta = {"model": "tiny-bert", "num_labels": 2, "spec": {"model_options": {"init_seed": 3}}}
    a, b = fresh_model(meta), load_model("tiny-bert", 2, options={"init_seed": 3})
    weight = "net.bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(a.state_dict()[weight], b.state_dict()[weight], atol=0, rtol=0)
    assert a.info.num_labels == 2 and not Method.adapted_layers(a)
