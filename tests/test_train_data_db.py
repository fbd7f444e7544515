"""The training loop, data splits and the database, each against what it promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from db import store
from engine.data import iterate_batches, load_data, read_raw, split_indices
from engine.spec import DatasetSpec, SpecError, load_spec, parse_spec
from engine.train import Cancelled, MemoryReporter, lr_factor, train
from tests.conftest import tiny_spec

# --- data ----------------------------------------------------------------------------------------


def test_tweets_dataset_is_the_real_corpus():
    raw = read_raw(DatasetSpec(name="tweets-sentiment"))
    assert len(raw.labels) == 38158 and raw.label_names == ["negative", "neutral", "positive"]
    assert np.bincount(raw.labels).tolist() == [16186, 15018, 6954]


def test_splits_are_deterministic_disjoint_and_capped():
    spec = DatasetSpec(name="tweets-sentiment", max_train=500, max_eval=100, split_seed=3)
    a_train, a_eval = split_indices(38158, spec)
    b_train, b_eval = split_indices(38158, spec)
    assert (a_train == b_train).all() and (a_eval == b_eval).all()
    assert len(a_train) == 500 and len(a_eval) == 100 and not set(a_train) & set(a_eval)
    c_train, _ = split_indices(38158, spec.model_copy(update={"split_seed": 4}))
    assert not (a_train == c_train).all()


def test_digits_and_dynamic_padding():
    data = load_data(DatasetSpec(name="digits", max_train=100, max_eval=50))
    assert data.train.tensors["images"].shape == (100, 3, 8, 8) and data.num_labels == 10
    assert 0.0 <= float(data.train.tensors["images"].min()) and float(data.train.tensors["images"].max()) <= 1.0
    from engine.models import load_model

    tok = load_model("tiny-bert", 3).tokenizer
    text = load_data(DatasetSpec(name="tweets-sentiment", max_train=64, max_eval=8, max_length=64), tok)
    batch = next(iterate_batches(text.train, 16, shuffle=False))
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) <= 64


def test_user_csv_and_clear_errors(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "\n".join(f"text {i},{'good' if i % 2 else 'bad'}" for i in range(40)))
    spec = DatasetSpec(name=str(path), text_column="review", label_column="stars")
    raw = read_raw(spec)
    assert raw.label_names == ["bad", "good"] and len(raw.inputs) == 40
    with pytest.raises(ValueError, match="dataset.text_column"):
        read_raw(DatasetSpec(name=str(path)))


# --- spec ----------------------------------------------------------------------------------------


def test_spec_errors_name_the_field(tmp_path):
    with pytest.raises(SpecError, match="train.batch_size"):
        parse_spec(tiny_spec(train={"batch_size": 0}))
    with pytest.raises(SpecError, match="method.rank"):
        parse_spec(tiny_spec(method={"name": "lora", "rank": 0}))
    with pytest.raises(SpecError, match="method.name 'nope'"):
        parse_spec(tiny_spec(method={"name": "nope"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_spec(path)


# --- training ------------------------------------------------------------------------------------


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0


def test_training_learns_and_resume_continues_exactly(tmp_path):
    spec = parse_spec(tiny_spec(model="tiny-vit", dataset={"name": "digits", "max_train": 64, "max_eval": 64},
                                train={"epochs": 3, "lr": 0.01}))  # fmt: skip
    straight = train(spec, MemoryReporter(), tmp_path / "a", resume=False)
    # Interrupt after the first epoch's checkpoint, then resume in the same directory.
    first = MemoryReporter(stop_after_step=6)
    with pytest.raises(Cancelled):
        train(spec, first, tmp_path / "b", resume=False)
    resumed_reporter = MemoryReporter()
    resumed = train(spec, resumed_reporter, tmp_path / "b", resume=True)
    assert any("resumed from checkpoint at step 4" in m for m in resumed_reporter.messages)
    assert resumed.final_metrics["eval_loss"] == pytest.approx(straight.final_metrics["eval_loss"], abs=1e-6)
    assert straight.steps == resumed.steps == 12


def test_model_and_dataset_modality_mismatch_is_clear(tmp_path):
    spec = parse_spec(tiny_spec(dataset={"name": "digits"}))
    with pytest.raises(ValueError, match="text model.*dataset 'digits' is image"):
        train(spec, MemoryReporter(), tmp_path)


# --- database ------------------------------------------------------------------------------------


def test_db_round_trip(lab_env, tmp_path):
    spec = parse_spec(tiny_spec()).model_dump(mode="json")
    run_id = store.create_run(spec, executor="inline")
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["spec"] == spec and run["method"] == "lora"
    assert store.mark_running(run_id, "cpu")
    store.log_metrics(run_id, [(1, "train_loss", 1.5), (2, "train_loss", 1.25), (2, "eval_accuracy", 0.5)])
    df = store.get_metrics([run_id])
    assert df[df.key == "train_loss"].value.tolist() == [1.5, 1.25]
    assert store.latest_metrics([run_id])[run_id] == {"eval_accuracy": 0.5, "train_loss": 1.25}
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    art = store.add_artifact(run_id, "adapter", f)
    assert art["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" and art["bytes"] == 3
    assert store.finish_run(run_id, "cancelled")
    assert not store.finish_run(run_id, "succeeded")  # the first final status wins
    assert store.get_run(run_id)["status"] == "cancelled"
    with store.get_engine().connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert store.migrate(store.get_engine()) == store.head_revision()  # already current: nothing to do


def test_metric_ingestion_is_batched(lab_env):
    run_id = store.create_run(parse_spec(tiny_spec()).model_dump(mode="json"))
    rows = [(i, "train_loss", float(i)) for i in range(20000)]
    assert store.log_metrics(run_id, rows) == 20000
    assert len(store.get_metrics([run_id])) == 20000
    assert torch.tensor(store.get_metrics([run_id]).value.to_numpy()).sum() == sum(range(20000))
