"""Checkpoint merging end to end: kept checkpoints in training, MWA's weights, ΔW merging of low-rank layers, the
merged run (executor ``merge``) from the command line, checked against a hand evaluation of the merged state dict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app import cli
from db import config, merges, store
from engine.adapter_merge import MergeSettings, merge_adapters, merge_weights
from engine.artifacts import read_adapter
from engine.data import load_data, read_raw
from engine.errors import UserError
from engine.merging import refactorise
from engine.models import load_model
from engine.spec import SpecError, parse_spec
from engine.train import MemoryReporter, train
from engine.trajectory import kept_steps, read_trajectory
from jobs.worker import execute
from tests.conftest import tiny_spec, wait_for

# --- where checkpoints are kept, and what each one records --------------------------------------------------------


def test_kept_steps_spread_evenly_or_every_n():
    assert kept_steps(94, keep=6) == [16, 32, 47, 63, 79, 94]
    assert kept_steps(4, keep=10) == [1, 2, 3, 4]  # at most one per step
    assert kept_steps(10, every=4) == [4, 8, 10]  # the last step is always kept
    assert kept_steps(10) == []


def test_keep_checkpoints_and_checkpoint_every_exclude_each_other():
    with pytest.raises(SpecError, match="keep_checkpoints and checkpoint_every both set"):
        parse_spec(tiny_spec(train={"keep_checkpoints": 3, "checkpoint_every": 2}))


def test_each_kept_checkpoint_has_its_step_averaged_loss_and_evaluation(tmp_path):
    spec = parse_spec(tiny_spec(dataset={"max_train": 96}, train={"keep_checkpoints": 3, "device": "cpu"}))
    reporter = MemoryReporter()
    result = train(spec, reporter, tmp_path)
    kept = read_trajectory(tmp_path)
    assert [c.step for c in kept] == [2, 4, 6] and result.artifacts["trajectory"].endswith("trajectory.json")
    losses = dict(reporter.series("train_loss"))  # log_every 1: the loss of each step
    accuracy, eval_loss = dict(reporter.series("eval_accuracy")), dict(reporter.series("eval_loss"))
    previous = 0
    for c in kept:
        window = [losses[s] for s in range(previous + 1, c.step + 1)]
        assert c.train_loss == pytest.approx(sum(window) / len(window), rel=1e-6)
        assert (c.eval_accuracy, c.eval_loss) == (accuracy[c.step], eval_loss[c.step])  # evaluated at that step
        previous = c.step
    _, last = read_adapter(tmp_path / kept[-1].path)
    _, final = read_adapter(tmp_path)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)


# --- MWA's weights ------------------------------------------------------------------------------------------------


def test_weights_are_inverse_loss_or_step_to_the_p_normalised():
    losses, steps = [0.9, 0.5, 0.3], [10, 20, 40]
    for p in (1.0, 2.0, 4.0):
        by_loss = merge_weights(losses, MergeSettings(p=p))
        raw = [(1 / x) ** p for x in losses]
        assert by_loss == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
        by_step = merge_weights(steps, MergeSettings(metric="step", p=p))
        raw = [s**p for s in steps]
        assert by_step == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert merge_weights(losses, MergeSettings(p=0.0)) == pytest.approx([1 / 3] * 3)
    assert merge_weights(losses, MergeSettings(method="uniform")) == pytest.approx([1 / 3] * 3)
    assert merge_weights(losses, MergeSettings(method="linear", weights=[1.0, 2.0, 0.5])) == [1.0, 2.0, 0.5]


def test_refactorisation_is_exact_when_the_merged_update_has_rank_at_most_r():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 12, generator=g, dtype=torch.float64)
    deltas = [torch.randn(10, 4, generator=g, dtype=torch.float64) @ a for _ in range(3)]  # one row space: rank ≤ 4
    merged = sum(w * d for w, d in zip((0.2, 0.3, 0.5), deltas, strict=True))
    result = refactorise(merged, rank=4, scale_out=2.0)
    assert result.relative_error < 1e-12
    assert torch.allclose(2.0 * result.B @ result.A, merged, atol=1e-12)
    truncated = refactorise(sum(torch.randn(10, 12, generator=g, dtype=torch.float64) for _ in range(2)), rank=4)
    assert truncated.relative_error > 0.1  # a full-rank sum is not exact at rank 4


# --- merging adapters ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-bert LoRA run with 3 kept checkpoints (its directory and parsed spec)."""
    out = tmp_path_factory.mktemp("run")
    spec = parse_spec(tiny_spec(dataset={"max_train": 96}, train={"keep_checkpoints": 3, "device": "cpu",
                                                                   "lr": 5e-3}))  # fmt: skip
    train(spec, MemoryReporter(), out)
    return out, spec


def _delta(tensors, scaling):
    """ΔW per LoRA layer of a state dict, by hand: s · B A."""
    return {k.removesuffix(".lora_A.weight"): scaling * tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
            for k in tensors if k.endswith("lora_A.weight")}  # fmt: skip


def test_merging_one_checkpoint_returns_it(trained):
    out, _ = trained
    meta, tensors = read_adapter(out / read_trajectory(out)[0].path)
    merged = merge_adapters([(meta, tensors)], [1.0], MergeSettings(p=2.0))
    assert merged.weights == [1.0] and merged.max_refactorisation_error < 1e-5
    scaling = meta.method_config["alpha"] / meta.method_config["rank"]
    ours, theirs = _delta(merged.tensors, scaling), _delta(tensors, scaling)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    assert all(torch.equal(merged.tensors[k], tensors[k]) for k in tensors if "lora_" not in k)


def test_low_rank_layers_merge_by_delta_weight_exactly_when_the_rank_suffices(trained):
    """Two sources sharing A: Σ w_i s B_i A has rank ≤ r, so the merge is exact, and it is not the product of the
    averaged factors (that would be the same here only by accident; with different A it has cross terms)."""
    out, _ = trained
    meta, tensors = read_adapter(out / read_trajectory(out)[-1].path)
    doubled = {k: 2 * v if "lora_B" in k else v for k, v in tensors.items()}
    merged = merge_adapters([(meta, tensors), (meta, doubled)], [0.5, 0.25], MergeSettings(p=1.0))
    w = merge_weights([0.5, 0.25], MergeSettings(p=1.0))
    assert w == pytest.approx([1 / 3, 2 / 3])
    scaling = meta.method_config["alpha"] / meta.method_config["rank"]
    expected = {k: w[0] * d + w[1] * 2 * d for k, d in _delta(tensors, scaling).items()}
    got = _delta(merged.tensors, scaling)
    assert merged.max_refactorisation_error < 1e-5
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


def test_sources_of_different_methods_are_refused(trained, tmp_path):
    out, _ = trained
    meta, tensors = read_adapter(out)
    other = meta.model_copy(update={"method_config": meta.method_config | {"rank": 2}})
    with pytest.raises(UserError, match="differs from source 0 in its method configuration"):
        merge_adapters([(meta, tensors), (other, tensors)], [1.0, 1.0], MergeSettings())


# --- the merged run, from the command line ------------------------------------------------------------------------


def _run(spec: dict) -> str:
    run_id = store.create_run(parse_spec(spec).model_dump(mode="json"), executor="inline")
    assert execute(run_id, echo=False)["status"] == "succeeded"
    return run_id


def _cli_json(capsys, *argv: str) -> tuple[int, dict]:
    code = cli.main(list(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(lines[-1])


@torch.no_grad()
def _hand_evaluation(spec: dict, tensors: dict[str, torch.Tensor], scaling: float) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``tensors`` (a LoRA adapter + head) on the run's held-out split, with
    the LoRA updates folded into the base weights by hand."""
    run_spec = parse_spec(spec)
    raw = read_raw(run_spec.dataset)
    model = load_model(run_spec.model, len(raw.label_names))
    params = dict(model.named_parameters())
    for layer, delta in _delta(tensors, scaling).items():
        params[f"{layer}.weight"].add_(delta)
    for key, value in tensors.items():
        if "lora_" not in key:
            params[key].copy_(value)
    model.eval()
    data = load_data(run_spec.dataset, model.tokenizer, raw).eval
    correct, loss, n = 0, 0.0, 0
    for i in range(0, len(data), 7):
        batch = {k: v[i : i + 7] for k, v in data.tensors.items()}
        logits = model(batch)
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        n += len(batch["labels"])
    return correct / n, loss / n


def test_cli_merge_end_to_end_matches_a_hand_evaluation(lab_env, capsys):
    spec = tiny_spec(dataset={"max_train": 96}, train={"keep_checkpoints": 3, "lr": 5e-3, "device": "cpu"})
    source = _run(spec)
    code, result = _cli_json(capsys, "merge", source, "--method", "mwa", "--p", "2", "--json")
    assert code == 0 and result["status"] == "succeeded"
    merged = store.get_run(result["run_id"])
    assert merged["executor"] == "merge" and "merge" in merged["tags"]
    # the weights are (1/loss_i)^2 normalised over the kept checkpoints' averaged training losses
    kept = read_trajectory(config.run_dir(source))
    raw = [(1 / c.train_loss) ** 2 for c in kept]
    assert [c["step"] for c in result["checkpoints"]] == [c.step for c in kept]
    assert [c["loss"] for c in result["checkpoints"]] == [c.train_loss for c in kept]
    assert [c["weight"] for c in result["checkpoints"]] == pytest.approx([r / sum(raw) for r in raw], rel=1e-9)
    assert merges.sources_of(result["run_id"]) == [{"run_id": source, "step": c["step"], "loss": c["loss"],
                                                    "weight": c["weight"]} for c in result["checkpoints"]]  # fmt: skip
    # the stored adapter is the hand merge of the checkpoints' ΔW (re-factorised; its error is reported)
    adapter_dir = store.list_artifacts(result["run_id"], "adapter")[0]["path"].rsplit("/", 1)[0]
    meta, tensors = read_adapter(adapter_dir)
    checkpoints = [read_adapter(config.run_dir(source) / c.path)[1] for c in kept]
    weights = [c["weight"] for c in result["checkpoints"]]
    scaling = meta.method_config["alpha"] / meta.method_config["rank"]
    by_hand = {k: sum(w * _delta(t, scaling)[k] for w, t in zip(weights, checkpoints, strict=True))
               for k in _delta(tensors, scaling)}  # fmt: skip
    for layer, delta in _delta(tensors, scaling).items():
        truncated = refactorise(by_hand[layer].double(), meta.method_config["rank"])
        assert torch.allclose(delta.double(), truncated.B @ truncated.A, atol=1e-5)
    head = [k for k in tensors if "lora_" not in k]
    for k in head:
        assert torch.allclose(tensors[k], sum(w * t[k] for w, t in zip(weights, checkpoints, strict=True)), atol=1e-6)
    # the run's accuracy is a hand evaluation of that state dict on the same split
    accuracy, loss = _hand_evaluation(spec, tensors, scaling)
    assert result["final_metrics"]["eval_accuracy"] == accuracy
    assert result["final_metrics"]["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert 0 <= result["max_refactorisation_error"] < 1 and math.isfinite(result["max_refactorisation_error"])
    # it is a run like any other: exported, and refused by resume
    out = str(lab_env / "exports" / "merged")
    assert cli.main(["export", result["run_id"], "--format", "native", "--out", out]) == 0
    assert cli.main(["resume", result["run_id"], "--inline"]) == 2
    assert "is a merge" in capsys.readouterr().err


def test_cli_merge_refuses_bad_sources_in_one_line(lab_env, capsys):
    plain = _run(tiny_spec(train={"device": "cpu"}))
    assert cli.main(["merge", plain, "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run {plain} kept no checkpoints") and "\n" not in err
    other = _run(tiny_spec(method={"name": "dora", "rank": 4}, train={"device": "cpu"}))
    assert cli.main(["merge", plain, other]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: run {other} has method dora but run {plain} has lora: merge runs of one method and base "
                   "model")  # fmt: skip
    assert cli.main(["merge", plain, "--method", "uniform", "--p", "2"]) == 2
    assert "uniform is p = 0" in capsys.readouterr().err
    assert len(store.list_runs()) == 2  # nothing recorded for refused merges


def test_final_adapters_of_several_runs_merge(lab_env, capsys):
    runs = [_run(tiny_spec(train={"device": "cpu", "seed": s})) for s in (0, 1)]
    code, result = _cli_json(capsys, "merge", *runs, "--method", "ties", "--density", "0.5", "--json")
    assert code == 0 and result["status"] == "succeeded"
    assert [c["run_id"] for c in result["checkpoints"]] == runs
    assert [c["weight"] for c in result["checkpoints"]] == pytest.approx([0.5, 0.5])  # p = 0 by default for ties
    assert {m["id"] for m in merges.merges_of(runs)} == {result["run_id"]}


@pytest.mark.slow
def test_merge_runs_as_a_ray_job_when_a_head_is_up(ray_lab, capsys):
    """With the local head up, the CLI's merge is a Ray job (its submission id is the merged run's id)."""
    from jobs import cluster

    source = _run(tiny_spec(train={"keep_checkpoints": 2, "device": "cpu"}))
    code, result = _cli_json(capsys, "merge", source, "--method", "uniform", "--json")
    assert code == 0 and result["status"] == "succeeded"
    assert [c["weight"] for c in result["checkpoints"]] == pytest.approx([0.5, 0.5])
    client = cluster.job_client()  # the job exits just after its run's final status is written
    assert wait_for(lambda: str(client.get_job_status(result["run_id"])) == "SUCCEEDED", timeout=60)
    assert store.get_run(result["run_id"])["executor"] == "merge"


@pytest.mark.parametrize("method_name", __import__("engine.methods", fromlist=["method_names"]).method_names())
def test_every_method_merged_with_itself_gives_the_same_outputs(method_name):
    """The merge path of every registered method: an adapter merged with a copy of itself (weights ½, ½) computes
    what it computed (low-rank layers: ΔW re-factorised exactly, rank ≤ r; other tensors averaged)."""
    from engine.artifacts import AdapterMeta
    from tests.conftest import batch_for
    from tests.test_methods_contract import _adapted, _perturb

    model, method = _adapted(method_name, "tiny-bert")
    _perturb(model, method)
    batch = batch_for(model)
    expected = model(batch)
    meta = AdapterMeta(
        method=method_name,
        method_config=method.config.model_dump(mode="json"),
        method_state=method.state(),
        model="tiny-bert",
        num_labels=5,
        spec={"train": {"seed": 0}},
    )
    tensors = method.adapter_state_dict(model)
    merged = merge_adapters([(meta, tensors), (meta, tensors)], [1.0, 1.0], MergeSettings(method="uniform"),
                            model=load_model("tiny-bert", 5))  # fmt: skip
    assert merged.max_refactorisation_error < 1e-5
    assert merged.model is not None
    assert torch.allclose(merged.model(batch), expected, atol=1e-4)
