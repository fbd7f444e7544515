"""Causal-LM train-step benchmarks: our LoRA against PEFT's, and every method against our LoRA.

The step is ``bench.bench_train.TrainStep`` (``engine.train.train_step``: next-token loss over the response tokens,
backward, clipping, AdamW), on one fixed batch of random tokens whose first half is prompt (label -100).

* ``causal-peft``: our LoRA (q, v, r = 8) / PEFT's LoRA on the same base with the same (copied) adapter weights, on
  ``tiny-llama`` and on ``llama-100m``, a random-init Llama of ~100M parameters (hidden 768, 8 layers, 12 query and
  4 key/value heads, MLP 2048, the bundled tokenizer's 30,522-token vocabulary). Target ≤ 1.0 (not slower than
  PEFT). Peak memory (RSS on CPU, ``max_memory_allocated`` on CUDA) of each, measured in a fresh child process.
* ``causal-methods``: every method's step / our LoRA's step on ``llama-100m`` (≤ 1.25), settings of
  ``bench.bench_train.BUDGET_PARAMS``; one child process per method.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.bench_train import BUDGET_PARAMS, LORA_PARAMS, NO_STEP_TARGET, TrainStep, Workload, adapt, fill_lora_b
from bench.common import MIB, Figure, PeakRSS, error_figure, interleaved_times, ratio_figure, synchronizer
from engine.methods import method_names
from engine.models import TaskModel, count_parameters, load_model
from engine.spec import RunSpec

LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


def causal_model(name: str, seed: int = 0) -> TaskModel:
    """``tiny-llama``, or ``llama-100m`` built from ``LLAMA_100M`` with the bundled tokenizer."""
    if name != "llama-100m":
        return load_model(name, 0, options={"init_seed": seed})
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.backends import get_backend
    from engine.backends.hf_causal import HFCausalBackend, minilm_tokenizer

    tok = minilm_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **LLAMA_100M)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    backend = get_backend("hf-causal-lm")
    assert isinstance(backend, HFCausalBackend)
    return backend.wrap_causal(LlamaForCausalLM(cfg), name, "random init", tok)


def lm_batch(batch_size: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; the first half of each sequence is prompt (label -100), the rest response."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def peft_lora(base: TaskModel, ours: TaskModel) -> TaskModel:
    """PEFT's LoRA on a copy of the base, with our adapter's weights (same function, same trainable set)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    base.net = get_peft_model(base.net, cfg)  # the TaskModel's forward calls net(input_ids=..., ...).logits
    ours_layers = {n: m for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, layer in ours_layers.items():
            theirs = base.net.base_model.model.get_submodule(name.removeprefix("net."))
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return base


def _spec() -> RunSpec:
    return RunSpec.model_validate({"model": "tiny-llama", "dataset": {"name": "tweets-instruct"},
                                   "method": {"name": "lora", **LORA_PARAMS}})  # fmt: skip


def _build(model_name: str, kind: str) -> TaskModel:
    base = causal_model(model_name)
    ours = copy.deepcopy(base)
    adapt(ours, "lora", LORA_PARAMS)
    fill_lora_b(ours)
    if kind == "ours":
        return ours
    return peft_lora(base, ours)


def _memory_child(model_name: str, kind: str, device_name: str, work: Workload, out_path: str) -> None:
    """In a fresh process: the peak memory of ``warmup + 1`` steps of one model."""
    try:
        device = torch.device(device_name)
        model = _build(model_name, kind).to(device)
        step = TrainStep(model, None, lm_batch(work.batch_size, work.length, device), _spec())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            for _ in range(work.warmup + 1):
                step()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak_bytes - rss.start_bytes
        result: dict[str, Any] = {"peak_mib": peak / MIB}
    except Exception as err:  # noqa: BLE001 - reported as an error row
        result = {"error": f"{type(err).__name__}: {err}"}
    Path(out_path).write_text(json.dumps(result))


def _in_child(target, args: tuple) -> dict[str, Any]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "engine.models", "engine.methods", "bench.bench_causal"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = ctx.Process(target=target, args=(*args, str(out)))
        proc.start()
        proc.join()
        try:
            return json.loads(out.read_text())
        except FileNotFoundError:
            return {"error": f"child process exited with code {proc.exitcode}"}


def bench_causal_peft(device: torch.device, work: Workload, models: tuple[str, ...]) -> list[Figure]:
    figures: list[Figure] = []
    for model_name in models:
        try:
            built = {kind: _build(model_name, kind).to(device) for kind in ("ours", "peft")}
            batch = lm_batch(work.batch_size, work.length, device)
            for m in built.values():
                m.eval()
            with torch.no_grad():
                diff = (built["ours"](batch) - built["peft"](batch)).abs().max().item()
            counts = {k: count_parameters(m)[0] for k, m in built.items()}
            if diff > 1e-4 or counts["ours"] != counts["peft"]:
                raise RuntimeError(f"our LoRA and PEFT's differ: max |Δlogits| {diff:.2e}, trainable {counts}")
            steps = {k: TrainStep(m, None, batch, _spec()) for k, m in built.items()}
            times = interleaved_times(steps, reps=work.reps, inner=work.inner, warmup=work.warmup,
                                      sync=synchronizer(device), clock=work.clock)  # fmt: skip
            del built, steps
            memory = {k: _in_child(_memory_child, (model_name, k, device.type, work)) for k in ("ours", "peft")}
            total = count_parameters(causal_model(model_name))[1]
            fig = ratio_figure(
                "causal-peft", f"train step: our LoRA / PEFT LoRA ({model_name}, q,v, r=8)", times, "ours", "peft",
                1.0, f"{work.describe()}, {total / 1e6:.1f}M parameters, trainable {counts['ours']:,}, "
                f"|Δlogits| {diff:.1e}",
            )  # fmt: skip
            figures.append(fig)
            for kind in ("ours", "peft"):
                mem = memory[kind]
                figures.append(Figure("causal-peft", f"peak memory of the step, {kind} ({model_name})",
                                      mem.get("peak_mib"), "MiB", detail=mem.get("error", "")))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - one failing model must not hide the other
            figures.append(error_figure("causal-peft", f"our LoRA / PEFT LoRA ({model_name})", err))
    return figures


def _method_child(name: str, params: dict[str, Any], device_name: str, work: Workload, out_path: str) -> None:
    """In a fresh process: the method's step against our LoRA's on ``llama-100m``, interleaved."""
    try:
        device = torch.device(device_name)
        batch = lm_batch(work.batch_size, work.length, device)
        spec = RunSpec.model_validate({"model": "tiny-llama", "dataset": {"name": "tweets-instruct"},
                                       "method": {"name": name, **params}})  # fmt: skip
        model = causal_model("llama-100m")
        method = adapt(model, name, params)
        model.to(device)
        step = TrainStep(model, method, batch, spec)
        step.start(total_steps=work.warmup + 1)
        reference = causal_model("llama-100m")
        lora = adapt(reference, "lora", LORA_PARAMS)
        lora_step = TrainStep(reference.to(device), lora, batch, _spec())
        times = interleaved_times({"lora": lora_step, name: step}, reps=work.reps, inner=work.inner,
                                  warmup=work.warmup, sync=synchronizer(device), clock=work.clock)  # fmt: skip
        result: dict[str, Any] = {"times": times, "adapter_params": method.adapter_param_count(model)}
    except Exception as err:  # noqa: BLE001 - reported as this method's error row
        result = {"error": f"{type(err).__name__}: {err}"}
    Path(out_path).write_text(json.dumps(result))


def bench_causal_methods(device: torch.device, work: Workload, only: list[str] | None) -> list[Figure]:
    figures: list[Figure] = []
    for name in [n for n in method_names() if (only is None or n in only) and n != "lora"]:
        params = BUDGET_PARAMS.get(name, {})
        result = _in_child(_method_child, (name, params, device.type, work))
        print(f"  causal-methods: {name} done", flush=True)
        title = f"train step: {name} / our LoRA (llama-100m)"
        if "error" in result:
            figures.append(Figure("causal-methods", title, None, detail=result["error"]))
            continue
        target = None if name in NO_STEP_TARGET else 1.25
        figures.append(ratio_figure("causal-methods", title, result["times"], name, "lora", target,
                                    f"{work.describe()}, adapter parameters {result['adapter_params']:,}"))  # fmt: skip
    return figures
