"""Training-step, memory and merged-inference benchmarks on MiniLM-L6 (tweets-sentiment).

A *train step* is what one iteration of ``engine.train.train`` does: ``engine.train.train_step`` (forward under
bf16 autocast on CUDA, the method's extra loss, the finite-loss check, backward, gradient clipping at 1.0 with the
finite-norm check, AdamW from ``engine.train.make_optimizer``, zeroing the gradients), then the method's
``on_step_end`` hook, on one fixed batch (padded to a fixed length, so every step does the same work). Warm-up
steps are not timed.

* ``peft``: our LoRA against Hugging Face PEFT's LoRA, same base weights, same adapter weights (copied), same
  targets (q, v), same trainable set (adapters + task head) and optimizer. Timed in the same repetitions: the
  "frozen floor" (only the head trains) and the "no-adapter floor" (no adapter, but the q and v biases train,
  so backward runs as deep as LoRA's): what any change to the LoRA layer could gain is bounded by the gap
  between our step and the latter. When the target is missed, or with ``--profile``, both LoRA steps are
  profiled with ``torch.profiler`` and the operators that differ most are listed.
* ``methods``: every registered method at a trainable budget close to LoRA r = 8 on q, v (73,728 adapter
  parameters), one child process per method: peak memory first (RSS sampled with psutil on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA) with only that method's model alive, then its step against our
  LoRA step, interleaved.
* ``merged``: inference (no grad) of LoRA merged into dense weights against the base model without adapter.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    MIB,
    Figure,
    PeakRSS,
    error_figure,
    fixed_text_batch,
    interleaved_times,
    ratio_figure,
    synchronizer,
)
from engine.methods import Method, TrainContext, build_method, method_names
from engine.models import TaskModel, count_parameters, load_model
from engine.spec import RunSpec
from engine.train import classification_loss, make_optimizer, train_step

MODEL = "minilm-l6"
NUM_LABELS = 3  # tweets-sentiment: negative, neutral, positive
LORA_PARAMS: dict[str, Any] = {"rank": 8, "alpha": 16.0, "target_roles": ["q", "v"]}

# Settings whose adapter-parameter count on MiniLM-L6 is close to LoRA r = 8 on q, v (73,728); the actual
# counts are measured and reported. Calibration batches are cut to 2: calibration runs once, before (or, for
# Pear, during) the warm-up steps, and is never part of a timed step.
BUDGET_PARAMS: dict[str, dict[str, Any]] = {
    "lora": LORA_PARAMS,
    "dora": LORA_PARAMS,
    "pissa": LORA_PARAMS,
    "corda": LORA_PARAMS | {"calib_batches": 2},
    "dylora": LORA_PARAMS,
    "neat": {"rank": 8, "target_roles": ["q", "v"]},  # 2·r·d_out per layer: equal to LoRA's r(d_in + d_out) here
    "lily": {"rank": 14, "num_experts": 4, "target_roles": ["q", "v"]},
    "houlsby": {"bottleneck": 8},  # on o and fc2
    "adaptformer": {"bottleneck": 16},
    "pear": {"bottleneck": 8, "calibration_batches": 2},  # count before pruning
    "heat": {"rank": 4, "calibration_batches": 2},  # LoRA r = 4 on q, k, v, o
    "hydra": {"parallel_rank": 2, "sequential_rank": 4},  # on o and fc2
    "mola": {"rank": 2, "experts_per_group": "1,2,3,4", "target_roles": ["q", "v"]},
    "soka": {"max_rank": 8, "target_roles": ["q", "v"]},
    "full": {},
    "linear_probe": {},
}
# Methods whose step is not held to the 1.25 target: full fine-tuning trains 300× more parameters, the
# linear probe is the frozen floor reported by the ``peft`` benchmark.
NO_STEP_TARGET = {"full", "linear_probe"}


@dataclass
class Workload:
    batch_size: int
    length: int
    reps: int
    inner: int
    warmup: int
    clock: str = "wall"  # see bench.common.CLOCKS

    def describe(self) -> str:
        return f"batch {self.batch_size}×{self.length}" + (", CPU time" if self.clock == "cpu" else "")


class TrainStep:
    """One optimizer step of ``engine.train.train``'s loop, on a fixed batch, as a callable.

    ``method`` is None for a model adapted outside our registry (the PEFT reference): no extra loss and no hooks
    then, but the same ``engine.train.train_step`` as every other model.
    """

    def __init__(self, model: TaskModel, method: Method | None, batch: dict[str, torch.Tensor], spec: RunSpec):
        self.model, self.method, self.batch, self.spec = model, method, batch, spec
        self.device = next(model.parameters()).device
        self.grad_clip = spec.train.grad_clip
        self.optimizer = make_optimizer(model, spec)
        self.ctx = TrainContext(
            model=model, step=0, total_steps=1,
            loss_fn=lambda b: classification_loss(model, {k: v.to(self.device) for k, v in b.items()})[0],
            batches=lambda: iter([batch] * 64),
        )  # fmt: skip
        model.train()

    def start(self, total_steps: int) -> None:
        """The method's ``on_train_start`` (calibration); ``total_steps`` places schedules (Pear's pruning,
        HEAT's adapter warm-up) inside the warm-up steps, so timed steps see the trained structure."""
        self.ctx.total_steps = total_steps
        if self.method is not None and self.method.on_train_start(self.ctx):
            self.optimizer = make_optimizer(self.model, self.spec)

    def __call__(self) -> None:
        model, method = self.model, self.method
        train_step(
            model, method, self.optimizer, self.batch,
            lr=self.spec.train.lr, grad_clip=self.grad_clip, device=self.device, step=self.ctx.step,
        )  # fmt: skip
        self.ctx.step += 1
        if method is not None and method.on_step_end(self.ctx):
            self.optimizer = make_optimizer(model, self.spec)


def run_spec(method: str, params: dict[str, Any]) -> RunSpec:
    """The RunSpec a user would write for this benchmark (its optimizer settings are the loop's defaults)."""
    return RunSpec.model_validate({"model": MODEL, "method": {"name": method, **params}})


def adapt(model: TaskModel, method_name: str, params: dict[str, Any], seed: int = 0) -> Method:
    torch.manual_seed(seed)
    method = build_method(method_name, params)
    method.apply(model)
    return method


def load_base() -> tuple[TaskModel, Any]:
    """MiniLM-L6 with a seeded head, and its tokenizer (detached so the model can be deep-copied cheaply)."""
    torch.manual_seed(0)
    model = load_model(MODEL, NUM_LABELS)
    tokenizer, model.tokenizer = model.tokenizer, None
    return model, tokenizer


@torch.no_grad()
def fill_lora_b(model: torch.nn.Module) -> None:
    """Give every LoRA B noise, so ΔW ≠ 0 (a model part-way through training, and a non-trivial merge)."""
    g = torch.Generator().manual_seed(1)
    for layer in Method.adapted_layers(model).values():
        b = layer.lora_B.weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.02)


# --- our LoRA vs PEFT's LoRA, and the frozen floor -------------------------------------------------------


def peft_lora_model(base: TaskModel, ours: TaskModel) -> TaskModel:
    """``base`` with Hugging Face PEFT's LoRA on the same layers as ``ours``, holding a copy of our factors.

    The trainable set is made equal to ours: PEFT freezes everything but its adapters, so the task head is
    unfrozen again (the same tensors our ``Method.apply`` leaves trainable).
    """
    from peft import LoraConfig, get_peft_model

    head = [p for n, p in base.named_parameters() if n in set(base.head_parameter_names())]
    config = LoraConfig(
        r=LORA_PARAMS["rank"], lora_alpha=LORA_PARAMS["alpha"], lora_dropout=0.0, bias="none",
        target_modules=["query", "value"],  # BERT's names for the q and v projections
    )  # fmt: skip
    with warnings.catch_warnings():  # transformers' deprecation notices, raised from inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        base.net = get_peft_model(base.net, config)
    for p in head:
        p.requires_grad_(True)
    peft_layers = dict(base.net.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in Method.adapted_layers(ours).items():
            target = peft_layers[name.removeprefix("net.")]
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return base


def profile_step(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    """Self time per step (ms) of each operator over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronizer(device)()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: getattr(e, attr) / 1000 / steps for e in prof.key_averages()}


def profile_comparison(ours: dict[str, float], reference: dict[str, float], top: int = 15) -> list[dict[str, Any]]:
    """Operators sorted by how much more time per step ours spends than the reference (then by ours' time)."""
    rows = [
        {"op": op, "ours_ms": ours.get(op, 0.0), "peft_ms": reference.get(op, 0.0),
         "diff_ms": ours.get(op, 0.0) - reference.get(op, 0.0)}
        for op in set(ours) | set(reference)
    ]  # fmt: skip
    rows.sort(key=lambda r: (-abs(r["diff_ms"]), -r["ours_ms"]))
    return rows[:top]


def bench_peft(device: torch.device, work: Workload, profile: bool) -> list[Figure]:
    group = "peft"
    base, tokenizer = load_base()
    batch = fixed_text_batch(tokenizer, work.batch_size, work.length, device)
    ours = copy.deepcopy(base)
    adapt(ours, "lora", LORA_PARAMS)
    fill_lora_b(ours)
    reference = peft_lora_model(copy.deepcopy(base), ours)
    # No adapter, but the same backward depth as LoRA on q, v: only the q and v biases (and the head) train, so
    # the input gradients run down to block 0 as they do for LoRA. What LoRA costs beyond this is its own.
    no_adapter = copy.deepcopy(base)
    adapt(no_adapter, "linear_probe", {})
    for name, p in no_adapter.named_parameters():
        if name.endswith(("query.bias", "value.bias")):
            p.requires_grad_(True)
    floor = base
    adapt(floor, "linear_probe", {})
    models = {"peft": reference, "ours": ours, "no_adapter": no_adapter, "head_only": floor}
    models = {k: m.to(device) for k, m in models.items()}

    # Same function, same trainable set: otherwise the comparison would not be like for like.
    for m in models.values():
        m.eval()
    with torch.no_grad():
        diff = (models["ours"](batch) - models["peft"](batch)).abs().max().item()
    counts = {k: count_parameters(m)[0] for k, m in models.items()}
    if diff > 1e-4 or counts["ours"] != counts["peft"]:
        raise RuntimeError(f"our LoRA and PEFT's differ: max |Δlogits| {diff:.2e}, trainable {counts}")

    spec = run_spec("lora", LORA_PARAMS)
    steps = {k: TrainStep(m, None, batch, spec) for k, m in models.items()}
    times = interleaved_times(
        steps, reps=work.reps, inner=work.inner, warmup=work.warmup, sync=synchronizer(device), clock=work.clock
    )
    shape = work.describe()
    vs_peft = ratio_figure(
        group, "train step: our LoRA / PEFT LoRA (minilm-l6, q,v, r=8)", times, "ours", "peft", 0.95,
        f"{shape}, trainable {counts['ours']:,}, |Δlogits| {diff:.1e}",
    )  # fmt: skip
    floor_fig = ratio_figure(
        group, "frozen floor: head-only step / our LoRA step", times, "head_only", "ours", None,
        f"{shape}, trainable {counts['head_only']:,}",
    )  # fmt: skip
    no_adapter_fig = ratio_figure(
        group, "no-adapter floor: q,v biases only / our LoRA step", times, "no_adapter", "ours", None,
        f"{shape}, same backward depth as LoRA, no adapter compute; trainable {counts['no_adapter']:,}",
    )  # fmt: skip
    if profile or vs_peft.status == "MISS":
        prof_steps = max(2, work.inner)
        ours_ops = profile_step(steps["ours"], prof_steps, device)
        peft_ops = profile_step(steps["peft"], prof_steps, device)
        vs_peft.extra["profile"] = profile_comparison(ours_ops, peft_ops)
        vs_peft.extra["profile_total_ms"] = {"ours": sum(ours_ops.values()), "peft": sum(peft_ops.values())}
    return [vs_peft, floor_fig, no_adapter_fig]


# --- every method against our LoRA, one child process per method -------------------------------------------


def method_child(name: str, params: dict[str, Any], device_name: str, threads: int | None, work: Workload) -> dict:
    """Runs in a fresh child process: the method's peak memory, then its step against our LoRA step."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    model, tokenizer = load_base()
    batch = fixed_text_batch(tokenizer, work.batch_size, work.length, device)
    method = adapt(model, name, params)
    model.to(device)
    adapter_params, (trainable, _) = method.adapter_param_count(model), count_parameters(model)
    step = TrainStep(model, method, batch, run_spec(name, params))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        step.start(total_steps=work.warmup + 1)
        for _ in range(work.warmup + 1):
            step()
    out: dict[str, Any] = {
        "method": name, "params": params, "adapter_params": adapter_params,
        "trainable_params": trainable, "trainable_after_warmup": count_parameters(model)[0],
        "rss_before_mib": rss.start_bytes / MIB, "peak_rss_mib": rss.peak_bytes / MIB,
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
    if name != "lora":
        reference, _ = load_base()
        lora = adapt(reference, "lora", LORA_PARAMS)
        reference.to(device)
        lora_step = TrainStep(reference, lora, batch, run_spec("lora", LORA_PARAMS))
        out["times"] = interleaved_times(
            {"lora": lora_step, name: step},
            reps=work.reps,
            inner=work.inner,
            warmup=1,
            sync=synchronizer(device),
            clock=work.clock,
        )
    return out


def _child_entry(name, params, device_name, threads, work, out_path) -> None:
    try:
        result = method_child(name, params, device_name, threads, work)
    except Exception as err:  # noqa: BLE001 - reported as this method's error row
        result = {"method": name, "error": f"{type(err).__name__}: {err}"}
    Path(out_path).write_text(json.dumps(result))


def bench_methods(device: torch.device, work: Workload, threads: int | None, only: list[str] | None) -> list[Figure]:
    """Each method in its own process (forked from a server that has imported torch and the engine once)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "transformers", "engine.models", "engine.methods", "engine.train", "bench.bench_train"]
    )
    figures: list[Figure] = []
    names = [n for n in method_names() if only is None or n in only]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            params = BUDGET_PARAMS.get(name, {})
            out_path = Path(tmp) / f"{name}.json"
            proc = ctx.Process(target=_child_entry, args=(name, params, device.type, threads, work, str(out_path)))
            proc.start()
            proc.join()
            try:
                result = json.loads(out_path.read_text())
            except FileNotFoundError:
                result = {"method": name, "error": f"child process exited with code {proc.exitcode}"}
            print(f"  methods: {name} done", flush=True)
            figures.extend(method_figures(name, params, result, work))
    return figures


def method_figures(name: str, params: dict[str, Any], result: dict[str, Any], work: Workload) -> list[Figure]:
    group = "methods"
    if "error" in result:
        return [error_figure(group, f"step / LoRA step: {name}", RuntimeError(result["error"]))]
    budget = f"{result['adapter_params']:,} adapter params ({result['adapter_params'] / 73_728:.2f}× LoRA)"
    if result["trainable_after_warmup"] != result["trainable_params"]:
        budget += f", {result['trainable_after_warmup']:,} trainable after the warm-up steps"
    if name not in BUDGET_PARAMS:
        budget += ", default config"
    figures = []
    if "times" in result:
        target = None if name in NO_STEP_TARGET else 1.25
        figures.append(
            ratio_figure(
                group,
                f"step / LoRA step: {name}",
                result["times"],
                name,
                "lora",
                target,
                f"{budget}; {work.describe()}",
            )  # fmt: skip
        )
    if "peak_cuda_mib" in result:
        value, what = result["peak_cuda_mib"], "torch.cuda.max_memory_allocated"
    else:
        value = result["peak_rss_mib"]
        what = f"process RSS; +{result['peak_rss_mib'] - result['rss_before_mib']:,.0f} MiB over the loaded model"
    figures.append(Figure(group, f"peak memory: {name}", value, "MiB", detail=f"{what}; {budget}"))
    return figures


# --- merged inference ------------------------------------------------------------------------------------


def bench_merged(device: torch.device, work: Workload) -> list[Figure]:
    """Forward of the merged LoRA model against the base model; the unmerged adapter is reported alongside."""
    group = "merged"
    base, tokenizer = load_base()
    batch = fixed_text_batch(tokenizer, work.batch_size, work.length, device)
    adapted = copy.deepcopy(base)
    method = adapt(adapted, "lora", LORA_PARAMS)
    fill_lora_b(adapted)
    merged = method.merge(copy.deepcopy(adapted))
    models = {"base": base, "merged": merged, "unmerged": adapted}
    for m in models.values():
        m.to(device).eval()
    with torch.inference_mode():
        diff = (merged(batch) - adapted(batch)).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"merged LoRA differs from the unmerged adapter by {diff:.2e}")

    def forward(model: TaskModel) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(batch)

        return run

    times = interleaved_times(
        {k: forward(m) for k, m in models.items()}, reps=work.reps, inner=work.inner, warmup=work.warmup,
        sync=synchronizer(device), clock=work.clock,
    )  # fmt: skip
    shape = f"{work.describe()}, LoRA r=8 on q,v"
    return [
        ratio_figure(group, "merged inference / base inference", times, "merged", "base", 1.02,
                     f"{shape}; |merged − unmerged| {diff:.1e}"),
        ratio_figure(group, "unmerged LoRA inference / base inference", times, "unmerged", "base", None, shape),
    ]  # fmt: skip
