"""Data from where researchers keep it: each source on a fixture this test writes itself (offline), trained end to end
on a tiny model; the papers' metrics against scikit-learn and SciPy; the on-disk cache of encoded data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import data as data_module
from engine import datacache
from engine.data import ImagePrep, load_data, read_raw
from engine.datatable import DataError
from engine.metrics import compute
from engine.spec import DatasetSpec, parse_spec
from engine.train import MemoryReporter, train
from tests.conftest import tiny_spec

WORDS = ["red", "green", "blue", "cold", "warm", "fast", "slow", "tall", "small", "round"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A PEFT Lab home of its own (the data cache lives there) and empty in-process caches."""
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data_module._CACHE.clear()
    yield tmp_path
    data_module._CACHE.clear()


def _pair_dataset(n: int, seed: int):
    """Sentence pairs labelled 'same' when the second sentence repeats the first's first word."""
    from datasets import ClassLabel, Dataset, Features, Value

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
    for _ in range(n):
        a, b, c = rng.choice(WORDS, 3, replace=False)
        same = bool(rng.integers(2))
        rows["sentence1"].append(f"{a} {b}")
        rows["sentence2"].append(f"{a if same else c} {b}")
        rows["label"].append(int(same))
    features = Features({"sentence1": Value("string"), "sentence2": Value("string"),
                         "label": ClassLabel(names=["different", "same"])})  # fmt: skip
    return Dataset.from_dict(rows, features=features)


def _run(tmp_path, **overrides):
    spec = parse_spec(tiny_spec(**overrides))
    reporter = MemoryReporter()
    return train(spec, reporter, tmp_path / "run", resume=False), reporter


# --- sources, each trained end to end ------------------------------------------------------------------


def test_save_to_disk_pair_classification_trains_with_tokenizer_pairs(home):
    from datasets import DatasetDict

    root = home / "pairs"
    DatasetDict({"train": _pair_dataset(96, 0), "validation": _pair_dataset(32, 1)}).save_to_disk(str(root))
    dataset = {"name": str(root), "split": "train", "eval_split": "validation", "text_column": "sentence1",
               "text_pair_column": "sentence2", "max_train": None, "max_eval": None, "max_length": 16}  # fmt: skip
    raw = read_raw(DatasetSpec(**dataset))
    assert raw.label_names == ["different", "same"] and raw.eval is not None and len(raw) == 96 and len(raw.eval) == 32
    from engine.models import load_model

    tokenizer = load_model("tiny-bert", 2).tokenizer
    bundle = load_data(DatasetSpec(**dataset), tokenizer)
    ids = bundle.train.tensors["input_ids"][0].tolist()
    assert ids.count(tokenizer.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]: the tokenizer's pair
    assert bundle.train.tensors["token_type_ids"][0].max() == 1
    result, reporter = _run(home, dataset=dataset, train={"epochs": 2, "lr": 0.003})
    assert result.status == "succeeded" and result.label_names == ["different", "same"]
    assert {"eval_accuracy", "eval_macro_f1", "eval_mcc", "eval_f1"} <= set(result.final_metrics)
    assert result.task == "classification" and result.headline_metric == "eval_accuracy"
    assert reporter.series("eval_mcc")


def test_parquet_regression_trains_a_one_output_head_with_mse(home):
    import pandas as pd

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 4)) for _ in range(160)]
    targets = [float(t.split().count("red") + 0.5 * t.split().count("blue")) for t in texts]
    path = home / "scores.parquet"
    pd.DataFrame({"text": texts, "score": targets}).to_parquet(path)
    raw = read_raw(DatasetSpec(name=str(path), label_column="score"))
    assert raw.task == "regression" and raw.labels.dtype == np.float32 and raw.label_names == []
    dataset = {"name": str(path), "label_column": "score", "max_train": 128, "max_eval": 32}
    result, reporter = _run(home, dataset=dataset, train={"epochs": 4, "lr": 0.01, "evals_per_epoch": 1})
    assert result.task == "regression" and result.headline_metric == "eval_pearson"
    assert set(result.final_metrics) == {"eval_loss", "eval_mse", "eval_pearson", "eval_spearman"}
    assert result.final_metrics["eval_mse"] == pytest.approx(result.final_metrics["eval_loss"], rel=1e-4)
    mse = [v for _, v in reporter.series("eval_mse")]
    assert len(mse) == 4 and mse[-1] < mse[0]  # it learns: the held-out MSE goes down
    with pytest.raises(DataError, match="dataset.task: classification, but column 'score'"):
        read_raw(DatasetSpec(name=str(path), label_column="score", task="classification"))


def _digits_folder(root, per_class: int = 12):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True)
        for k, index in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            Image.fromarray((digits.images[index] * 255 / 16).astype(np.uint8)).save(folder / f"{k}.png")
    return digits


def test_image_folder_of_digit_pngs_is_resized_as_the_backbone_expects_and_trains(home):
    from PIL import Image

    root = home / "digits-png"
    _digits_folder(root)
    raw = read_raw(DatasetSpec(name=str(root)))
    assert raw.modality == "image" and raw.label_names == [f"digit{i}" for i in range(10)] and len(raw) == 120
    bundle = load_data(DatasetSpec(name=str(root), max_eval=20), image=ImagePrep(32, "bicubic"))
    images = bundle.train.tensors["images"]
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    # The first training image is the file resized by PIL with the backbone's interpolation (timm's tiny-vit: bicubic).
    first = int(data_module.split_indices(120, DatasetSpec(name=str(root), max_eval=20))[0][0])
    expected = np.asarray(Image.open(raw.inputs[first]).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected)
    result, _ = _run(home, model="tiny-vit", dataset={"name": str(root), "max_eval": 30}, train={"epochs": 2})
    assert result.status == "succeeded" and result.label_names[0] == "digit0"
    assert {"eval_accuracy", "eval_macro_f1", "eval_mcc"} <= set(result.final_metrics)


def test_multiple_choice_jsonl_parses_every_answer_form(home):
    path = home / "commonsense.jsonl"
    rows = [
        {"question": "Where do fish live?", "choices": ["water", "trees", "sky"], "answer": 0},
        {"question": "Fire is", "choices": {"text": ["cold", "hot"], "label": ["A", "B"]}, "answer": "B"},
        {"question": "Ice is", "choices": ["hot", "cold"], "answer": "cold"},
        {"question": "Pick the second", "choices": ["x", "y", "z", "w"], "answer": "1"},  # 0-based (HellaSwag)
        {"question": "Pick D", "choices": ["a", "b", "c", "d"], "answer": "D"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = DatasetSpec(name=str(path), task="multiple_choice", text_column="question", label_column="answer")
    raw = read_raw(spec)
    assert raw.task == "multiple_choice" and raw.labels.tolist() == [0, 1, 1, 1, 3]
    assert raw.choices == [["water", "trees", "sky"], ["cold", "hot"], ["hot", "cold"], ["x", "y", "z", "w"],
                           ["a", "b", "c", "d"]]  # fmt: skip
    # Choices in named columns, answers counted from 1 (SIQA, WinoGrande); a yes/no answer without choices (BoolQ).
    named = home / "winogrande.jsonl"
    named.write_text(json.dumps({"sentence": "The _ is red.", "option1": "apple", "option2": "sky", "answer": "1"}))
    raw = read_raw(DatasetSpec(name=str(named), task="multiple_choice", text_column="sentence",
                               choices_column="option1,option2", label_column="answer"))  # fmt: skip
    assert raw.labels.tolist() == [0] and raw.choices == [["apple", "sky"]]
    boolq = home / "boolq.jsonl"
    boolq.write_text(json.dumps({"question": "is water wet", "answer": True}))
    raw = read_raw(DatasetSpec(name=str(boolq), task="multiple_choice", text_column="question",
                               label_column="answer"))  # fmt: skip
    assert raw.labels.tolist() == [1] and raw.choices == [["no", "yes"]]
    bad = home / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "c"}))
    with pytest.raises(DataError, match="line 1: answer 'c' in column 'answer' is not one of its 2 choices"):
        read_raw(DatasetSpec(name=str(bad), task="multiple_choice", text_column="question", label_column="answer"))
    # Training it is a causal language model's job: a classifier is refused before anything runs.
    from engine.preflight import PreflightError, check

    with pytest.raises(PreflightError, match="dataset.task: .* is multiple-choice data"):
        check(tiny_spec(dataset={"name": str(path), "task": "multiple_choice", "text_column": "question",
                                 "label_column": "answer"}))  # fmt: skip


# --- the hub, offline and unreachable (real calls, no network) -------------------------------------------


def test_hub_dataset_offline_and_unreachable_errors_name_the_id_and_the_way_offline(home, monkeypatch):
    spec = DatasetSpec(name="nyu-mll/glue", config="cola")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub dataset 'nyu-mll/glue' is not in the local datasets cache.*OFFLINE"):
        read_raw(spec)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DataError, match=r"'nyu-mll/glue'.*the hub \(http://127.0.0.1:9\) is unreachable.*"
                                        r"HF_DATASETS_OFFLINE=1"):  # fmt: skip
        read_raw(spec)


# --- metrics against scikit-learn and SciPy -------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_classification_metrics_equal_scikit_learn(classes):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 300)
    logits = rng.normal(size=(300, classes)) + 1.5 * np.eye(classes)[labels] * rng.integers(0, 2, (300, 1))
    pred = logits.argmax(-1)
    got = compute("classification", logits, labels, num_classes=classes)
    assert got["eval_accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    assert got["eval_macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-12)
    assert got["eval_mcc"] == pytest.approx(matthews_corrcoef(labels, pred), abs=1e-12)
    if classes == 2:
        assert got["eval_f1"] == pytest.approx(f1_score(labels, pred), abs=1e-12)
    # A class never predicted, and predictions of one class only (MCC's undefined case: 0).
    lopsided = np.where(pred == classes - 1, 0, pred)
    one_hot = np.eye(classes)[lopsided]
    assert compute("classification", one_hot, labels)["eval_macro_f1"] == pytest.approx(
        f1_score(labels, lopsided, average="macro", zero_division=0), abs=1e-12
    )
    constant = np.zeros((300, classes))
    assert compute("classification", constant, labels)["eval_mcc"] == matthews_corrcoef(labels, constant.argmax(-1))


def test_regression_metrics_equal_scipy_with_ties_and_constants():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    rng = np.random.default_rng(0)
    labels = np.round(rng.uniform(0, 5, 200), 1).astype(np.float32)  # many ties, as STS-B's scores
    pred = (labels + rng.normal(0, 1, 200)).astype(np.float32)
    pred[:40] = np.round(pred[:40])  # ties in the predictions too
    got = compute("regression", pred[:, None], labels)
    assert got["eval_mse"] == pytest.approx(mean_squared_error(labels, pred), rel=1e-6)
    assert got["eval_pearson"] == pytest.approx(pearsonr(pred, labels).statistic, abs=1e-9)
    assert got["eval_spearman"] == pytest.approx(spearmanr(pred, labels).statistic, abs=1e-9)
    flat = compute("regression", np.full(200, 2.0), labels)
    assert np.isnan(flat["eval_pearson"]) and np.isnan(flat["eval_spearman"])  # SciPy: NaN (and a warning)


# --- the on-disk cache ------------------------------------------------------------------------------------


def test_encoded_data_is_cached_on_disk_and_invalidated_when_the_source_changes(home):
    import pandas as pd

    from engine.models import load_model

    path = home / "reviews.parquet"
    labels = ["pos", "neg"] * 20
    pd.DataFrame({"text": [f"{w} review {i}" for i, w in enumerate(WORDS * 4)], "label": labels}).to_parquet(path)
    spec = DatasetSpec(name=str(path), max_train=30, max_eval=10, max_length=12)
    tokenizer = load_model("tiny-bert", 2).tokenizer
    before = dict(datacache.STATS)
    first = load_data(spec, tokenizer)
    assert datacache.STATS["misses"] == before["misses"] + 1 and len(list((home / "home").rglob("*.safetensors"))) == 1
    data_module._CACHE.clear()  # a new process: only the disk cache is left
    second = load_data(spec, tokenizer)
    assert datacache.STATS["disk_hits"] == before["disk_hits"] + 1
    assert all(torch.equal(first.train.tensors[k], second.train.tensors[k]) for k in first.train.tensors)
    assert second.label_names == ["neg", "pos"] and second.task == "classification"
    # Another max_length is another entry; an edited source (same size, new content) is read and encoded again.
    load_data(spec.model_copy(update={"max_length": 8}), tokenizer)
    assert datacache.STATS["misses"] == before["misses"] + 2
    pd.DataFrame({"text": [f"{w} note {i}" for i, w in enumerate(WORDS * 4)], "label": labels}).to_parquet(path)
    data_module._CACHE.clear()
    third = load_data(spec, tokenizer)
    assert datacache.STATS["misses"] == before["misses"] + 3
    assert not torch.equal(first.train.tensors["input_ids"], third.train.tensors["input_ids"])


def _load_and_report(spec, prep, queue) -> None:
    before = dict(datacache.STATS)
    load_data(spec, image=prep)
    queue.put({k: datacache.STATS[k] - before[k] for k in ("misses", "disk_hits")})


def test_trials_starting_together_encode_once(home):
    """A second process that needs the same entry while the first encodes it waits, then reads it."""
    import multiprocessing
    import time

    root = home / "digits-png"
    _digits_folder(root, per_class=3)
    spec, prep = DatasetSpec(name=str(root), max_eval=6), ImagePrep(16, "bilinear")
    raw = read_raw(spec)
    key = data_module.cache_key(spec, raw, image=prep)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with datacache.building(key):  # this process is encoding the entry
        child = ctx.Process(target=_load_and_report, args=(spec, prep, queue))
        child.start()
        time.sleep(1.0)
        assert child.is_alive() and queue.empty()  # waiting for the lock, not encoding
        data_module._encode_now(key, spec, None, raw, prep)
    child.join(60)
    assert queue.get(timeout=5) == {"misses": 0, "disk_hits": 1}
