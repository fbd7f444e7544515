"""The adapter artifact (engine.artifacts): save and read back, fingerprint, apply, older files, mismatched bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.artifacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    AdapterFileError,
    AdapterMeta,
    BaseModelMismatch,
    base_fingerprint,
    build_model,
    load_adapted_model,
    read_adapter,
    save_adapter,
)
from engine.models import load_model
from engine.spec import parse_spec
from engine.train import Prepared, prepare
from tests.conftest import batch_for


def _trained(tmp_path: Path, seed: int = 2) -> tuple[Path, Prepared]:
    """A tiny-bert LoRA run saved as training leaves it, its trainable tensors moved off their initial values."""
    spec = parse_spec({"model": "tiny-bert", "dataset": {"name": "tweets-sentiment", "max_train": 8, "max_eval": 8},
                       "method": {"name": "lora", "rank": 2, "target_roles": ["q", "v"]},
                       "train": {"seed": seed}})  # fmt: skip
    prep = prepare(spec)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in prep.model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    prep.model.eval()
    run_dir = tmp_path / "run"
    save_adapter(prep, run_dir)
    return run_dir, prep


def test_save_then_read_round_trip(tmp_path):
    run_dir, prep = _trained(tmp_path)
    meta, tensors = read_adapter(run_dir)
    assert isinstance(meta, AdapterMeta) and meta.directory == run_dir
    assert (meta.method, meta.model, meta.num_labels) == ("lora", "tiny-bert", prep.data.num_labels)
    assert meta.method_config == prep.method.config.model_dump(mode="json")
    assert meta.label_names == prep.data.label_names and meta.seed == 2
    assert meta.spec == prep.spec.model_dump(mode="json")
    expected = prep.method.adapter_state_dict(prep.model)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(tensors[key], value.cpu(), atol=0, rtol=0)
    # The record writes itself back as the file it was read from, key order included.
    written = (run_dir / ADAPTER_CONFIG_FILE).read_text()
    assert json.dumps(meta.to_json(), indent=2) == written


def test_fingerprint_is_stable_and_tells_bases_apart():
    first, again = base_fingerprint(load_model("tiny-bert", 2)), base_fingerprint(load_model("tiny-bert", 2))
    assert first == again and first
    other = base_fingerprint(load_model("tiny-bert", 2, options={"init_seed": 9}))
    assert set(other) == set(first) and other != first


def test_applied_adapter_gives_the_trained_logits(tmp_path):
    run_dir, prep = _trained(tmp_path)
    batch = batch_for(prep.model)
    with torch.no_grad():
        expected = prep.model(batch)
        adapted = load_adapted_model(run_dir)
        got = adapted.model(batch)
    assert adapted.method.name == "lora" and adapted.meta.model == "tiny-bert"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_a_file_in_the_previous_layout_still_loads(tmp_path):
    """Before AdapterMeta an adapter_config.json could lack model_source, label_names, spec and method_state, and
    exports added keys the record does not declare: such a file loads, and the unknown keys are kept."""
    run_dir, prep = _trained(tmp_path, seed=0)  # an old file records no seed: the default (0) must match
    data = json.loads((run_dir / ADAPTER_CONFIG_FILE).read_text())
    old = {k: data[k] for k in ("method", "method_config", "model", "num_labels")}
    old["written_by"] = "peftlab 0.1"
    (run_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(old))
    meta, _ = read_adapter(run_dir)
    assert meta.spec is None and meta.model_source is None and meta.method_state == {} and meta.seed == 0
    assert meta.to_json() == old
    batch = batch_for(prep.model)
    with torch.no_grad():
        torch.testing.assert_close(load_adapted_model(run_dir).model(batch), prep.model(batch), atol=1e-6, rtol=1e-6)


def test_a_config_lacking_a_field_names_the_file(tmp_path):
    run_dir, _ = _trained(tmp_path)
    data = json.loads((run_dir / ADAPTER_CONFIG_FILE).read_text())
    data["num_labels"] = "three"
    (run_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=rf"{run_dir / ADAPTER_CONFIG_FILE}: field 'num_labels' is invalid"):
        read_adapter(run_dir)


def test_mismatched_base_raises_a_one_line_error_naming_the_file(tmp_path):
    run_dir, prep = _trained(tmp_path)
    n = prep.data.num_labels
    with pytest.raises(BaseModelMismatch) as err:
        load_adapted_model(run_dir, model=load_model("minilm-l6", n))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{run_dir / ADAPTER_FILE}: ")
    assert "'tiny-bert'" in message and "'minilm-l6'" in message

    # Tampered: the base model recorded with a fingerprint, then loaded on other weights of the same shapes.
    meta, _ = read_adapter(run_dir)
    data = meta.to_json()
    data["base_model"] = {"name": "tiny-bert", "fingerprint": base_fingerprint(build_model(meta))}
    (run_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(BaseModelMismatch) as err:
        load_adapted_model(run_dir, model=load_model("tiny-bert", n, options={"init_seed": 4}))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{run_dir / ADAPTER_CONFIG_FILE}: ")
    assert "different values" in message
