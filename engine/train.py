"""The one training loop: setup, step, evaluate, checkpoint, report. It reads top to bottom.

Methods plug in through the registry and their hooks (``on_train_start``, ``on_step_end``, ``extra_loss``);
there is no method-specific branch here. Progress and metrics go through a small ``Reporter``: the Ray
worker passes one that writes to the database, tests pass ``MemoryReporter``. Observers of the loop (profilers)
come in as ``StepHook``s, built by a ``HookFactory`` the caller passes (the worker passes
``engine.analysis.importance.default_hooks``); this module imports no analysis. One optimisation step is
``train_step``, which the benchmarks time as well.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
from torch import nn

from engine import gpu
from engine.artifacts import ADAPTER_CONFIG_FILE as ADAPTER_CONFIG_FILE  # re-exported: callers import it here
from engine.artifacts import ADAPTER_FILE as ADAPTER_FILE
from engine.artifacts import save_adapter
from engine.data import DataBundle, ImagePrep, iterate_batches, load_data, read_raw
from engine.lm_data import LMSplit
from engine.lm_eval import causal_lm_loss, evaluate_lm, write_generations
from engine.methods import Method, TrainContext, build_method
from engine.metrics import compute as compute_metrics
from engine.models import TaskModel, count_parameters, load_model
from engine.quiet import library_log_to
from engine.spec import RunSpec
from engine.trajectory import Trajectory

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_EVERY_S = 1.0  # progress is reported at least this often between logged steps


class Reporter(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def restart_from(self, step: int) -> None: ...  # metrics after ``step`` are void (resumed from a checkpoint)
    def set_progress(self, progress: float) -> None: ...
    def should_stop(self) -> bool: ...
    def log(self, message: str) -> None: ...


@dataclass
class MemoryReporter:
    """Keeps everything in lists; for tests and the in-process CLI."""

    metrics: list[tuple[int, str, float]] = field(default_factory=list)
    progress: float = 0.0
    messages: list[str] = field(default_factory=list)
    stop_after_step: int | None = None
    echo: bool = False

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.extend((step, k, float(v)) for k, v in metrics.items())

    def restart_from(self, step: int) -> None:
        self.metrics = [m for m in self.metrics if m[0] <= step]

    def set_progress(self, progress: float) -> None:
        self.progress = progress

    def should_stop(self) -> bool:
        """True once a step after ``stop_after_step`` is logged: that step, its checkpoint included, is done (as a
        cancel that lands after it would find it), and the loop stops before the next checkpoint."""
        last = max((s for s, _, _ in self.metrics), default=0)
        return self.stop_after_step is not None and last > self.stop_after_step

    def log(self, message: str) -> None:
        self.messages.append(message)
        if self.echo:
            print(message, flush=True)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(s, v) for s, k, v in self.metrics if k == key]


class StepHook(Protocol):
    """Observes the loop: ``on_step(step)`` after each optimizer step (``step`` = steps done), ``close()`` once
    training has finished, then ``artifact()``: ``(kind, JSON-able data)``, written to ``<kind>.json`` in the run's
    directory and listed in ``TrainResult.artifacts`` under ``kind``, or None for nothing to store."""

    def on_step(self, step: int) -> None: ...
    def close(self) -> None: ...
    def artifact(self) -> tuple[str, dict[str, Any]] | None: ...


# Builds a run's hooks from its model (adapted, on its device, after any resume) and its total step count.
HookFactory = Callable[[nn.Module, int], Sequence[StepHook]]


class Cancelled(Exception):
    pass


class Diverged(Exception):
    """The loss or the gradient became NaN or infinite: the run fails at once (and is not retried)."""


@dataclass
class TrainResult:
    status: str  # succeeded | cancelled
    final_metrics: dict[str, float]
    trainable_params: int
    total_params: int
    adapter_params: int
    device: str
    steps: int
    timings: dict[str, float]
    artifacts: dict[str, str]  # kind -> path
    majority_rate: float
    task: str = "classification"  # "classification" | "regression"
    label_names: list[str] = field(default_factory=list)  # the classes, in the order of the head's outputs
    headline_metric: str = "eval_accuracy"  # what the run is judged by (the dataset spec's metric, or the task's)
    stored_params: int = 0  # values in the adapter file without the task head (Method.stored_size)
    stored_bytes: int = 0  # its bytes (packed low-bit codes, sparse indices + values, ...)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("artifacts")
        return d


@dataclass
class Prepared:
    """Everything built before the first step; also what export, analyses and benchmarks reuse."""

    spec: RunSpec
    model: TaskModel
    method: Method
    data: DataBundle
    device: torch.device
    data_s: float = 0.0  # seconds spent reading and encoding the data (the cache's hits make it small)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def prepare(spec: RunSpec) -> Prepared:
    """Seed, load data and model, apply the method, move to the device."""
    torch.manual_seed(spec.train.seed)
    if spec.train.num_threads:
        torch.set_num_threads(spec.train.num_threads)
    gpu.check(spec.train, spec.model_options)  # GPU-only switches refused here, before any work
    t_data = time.perf_counter()
    raw = read_raw(spec.dataset)
    data_s = time.perf_counter() - t_data
    outputs = 1 if raw.task == "regression" else len(raw.label_names)  # regression: one output, MSE loss
    model = load_model(spec.model, outputs, options=spec.model_options, trust_remote_code=spec.trust_remote_code)
    if model.info.modality != raw.modality:
        raise ValueError(
            f"model {spec.model!r} is a {model.info.modality} model but dataset {spec.dataset.name!r} is "
            f"{raw.modality}: pick a matching pair (e.g. minilm-l6 with tweets-sentiment, tiny-vit with digits)"
        )
    info = model.info
    image = ImagePrep(info.image_size, info.image_interpolation) if info.image_size else None
    t_data = time.perf_counter()
    data = load_data(spec.dataset, model.tokenizer, raw, image=image)
    data_s += time.perf_counter() - t_data
    torch.manual_seed(spec.train.seed)  # adapter init depends on the seed only, not on loading order
    method = build_method(spec.method.name, spec.method.params)
    method.apply(model)
    gpu.apply(model.net, spec.train)
    device = pick_device(spec.train.device)
    return Prepared(spec, model.to(device), method, data, device, data_s)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up to 1, then linear or cosine decay to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's loss and the model's outputs: cross-entropy on class ids, or the mean squared error of the one
    output when the labels are regression targets (floats)."""
    logits = model(batch)
    if logits.dim() == 3:  # a causal LM: next-token loss over the response tokens
        return causal_lm_loss(logits, batch["labels"]), logits
    if batch["labels"].is_floating_point():
        return nn.functional.mse_loss(logits.float().squeeze(-1), batch["labels"].float()), logits
    return nn.functional.cross_entropy(logits.float(), batch["labels"]), logits


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int, device: torch.device) -> dict[str, float]:
    """``eval_loss`` and the task's metrics (``engine.metrics``) on a split."""
    if isinstance(split, LMSplit):  # a causal LM: loss, perplexity, multiple-choice accuracy
        return evaluate_lm(model, split, batch_size, device)
    was_training = model.training
    model.eval()
    loss_sum, n, outputs, labels = 0.0, 0, [], []
    for batch in iterate_batches(split, batch_size, shuffle=False):
        batch = to_device(batch, device)
        loss, logits = classification_loss(model, batch)
        k = len(batch["labels"])
        loss_sum += float(loss) * k
        outputs.append(logits.float().cpu())
        labels.append(batch["labels"].cpu())
        n += k
    model.train(was_training)
    y, out = torch.cat(labels).numpy(), torch.cat(outputs).numpy()
    task = "regression" if split.tensors["labels"].is_floating_point() else "classification"
    return {"eval_loss": loss_sum / max(n, 1), **compute_metrics(task, out, y, num_classes=out.shape[-1])}


def make_optimizer(model: nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {spec.method.name} left no trainable parameter")
    return torch.optim.AdamW(params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a temporary file in the same directory, fsync'd, then renamed over the old one,
    so a kill at any moment leaves either the previous checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_step(
    model: TaskModel,
    method: Method | None,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    lr: float,
    grad_clip: float | None,
    device: torch.device,
    step: int,
) -> float:
    """One optimisation step; returns the loss (with the method's extra loss). ``step`` counts the steps done
    before this one (messages name this one ``step + 1``). Sets the learning rate ``lr``, runs the forward under
    bf16 autocast on CUDA, adds ``method.extra_loss`` (no method: a model adapted outside the registry), raises
    ``Diverged`` on a non-finite loss or gradient norm, clips at ``grad_clip`` (None or 0: no clipping), steps the
    optimizer and zeroes the gradients. The method's ``on_step_end`` is the caller's."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = classification_loss(model, batch)
        extra = method.extra_loss(model) if method is not None else None
        if extra is not None:
            loss = loss + extra
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise Diverged(f"diverged at step {step + 1} (loss {loss_value}): lower train.lr or check the data")
    loss.backward()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_params, grad_clip or math.inf))
    if not math.isfinite(grad_norm):
        raise Diverged(f"diverged at step {step + 1} (gradient norm {grad_norm}): lower train.lr")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


def train(
    spec: RunSpec,
    reporter: Reporter,
    out_dir: str | Path,
    *,
    resume: bool = True,
    hooks: HookFactory | None = None,
) -> TrainResult:
    """Train ``spec``, writing checkpoints and artifacts to ``out_dir``. ``hooks`` builds the run's ``StepHook``s
    (None: none; runs built by the worker pass ``engine.analysis.importance.default_hooks``, the norm profile)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # --- setup ----------------------------------------------------------------------------------
    with library_log_to(reporter.log):  # routine library output while loading goes to the run's log
        prep = prepare(spec)
    model, method, data, device, cfg = prep.model, prep.method, prep.data, prep.device, spec.train
    reporter.log(f"model {spec.model} on {device}; {len(data.train)} train / {len(data.eval)} eval examples")
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = int(cfg.warmup_ratio * total_steps)
    # Several evaluations per epoch, or per run when max_steps ends it within its first epoch, so that a live
    # accuracy curve has points from early on.
    eval_every = max(1, min(steps_per_epoch, total_steps) // cfg.evals_per_epoch)
    trajectory = Trajectory.for_run(cfg, total_steps, out_dir)  # kept checkpoints for merging, if asked
    loss_fn = lambda batch: classification_loss(model, to_device(batch, device))[0]  # noqa: E731
    ctx = TrainContext(
        model=model, step=0, total_steps=total_steps, loss_fn=loss_fn,
        batches=lambda: iterate_batches(data.train, cfg.batch_size, shuffle=True), log=reporter.log,
    )  # fmt: skip
    if method.on_train_start(ctx):
        reporter.log("method changed its trainable parameters before training")
    optimizer = make_optimizer(model, spec)
    step, start_epoch = 0, 0
    running, running_n, final = 0.0, 0, {}

    ckpt_path = out_dir / CHECKPOINT_FILE
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        method.load_state(model, ckpt["method_state"])
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer = make_optimizer(model, spec)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, start_epoch = ckpt["step"], ckpt["epoch"]
        running, running_n, final = ckpt.get("running", 0.0), ckpt.get("running_n", 0), ckpt.get("final", {})
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"].cpu())
        if trajectory is not None:
            trajectory.resume(ckpt.get("trajectory", {}), step)
        reporter.log(f"resumed from checkpoint at step {step}")
    reporter.restart_from(step)  # what an earlier attempt logged after its checkpoint is redone from here

    def checkpoint(epochs_done: int) -> None:
        """Trainable and adapter tensors (frozen ones too, e.g. Pear's knowledge checkpoint), optimizer, method
        state, the RNG and the running loss, so a resumed run continues exactly where this one stood."""
        save_checkpoint(ckpt_path, {
            "trainable": _trainable_state(model) | method.adapter_state_dict(model),
            "optimizer": optimizer.state_dict(), "step": step, "epoch": epochs_done,
            "method_state": method.state(), "rng": torch.get_rng_state(),
            "running": running, "running_n": running_n, "final": final,
            "trajectory": trajectory.state() if trajectory is not None else {},
        })  # fmt: skip

    ctx.step = step
    trainable, total = count_parameters(model)
    step_hooks = list(hooks(model, total_steps)) if hooks is not None else []
    reporter.log(f"trainable {trainable:,} / total {total:,} parameters; {total_steps} steps")
    process = psutil.Process()
    peak_rss = process.memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_time, eval_time = 0.0, 0.0
    model.train()
    last_checkpoint = last_progress = time.monotonic()

    # --- loop -----------------------------------------------------------------------------------
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # same order after a resume
        batches = iterate_batches(data.train, cfg.batch_size, shuffle=True, generator=gen)
        for i, batch in enumerate(batches):
            if i < step - epoch * steps_per_epoch:
                continue  # skip what a resumed run already did in this epoch
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(step, total_steps, warmup, cfg.schedule)
            loss_value = train_step(
                model, method, optimizer, batch, lr=lr, grad_clip=cfg.grad_clip, device=device, step=step
            )
            step += 1
            step_time += time.perf_counter() - t0
            running, running_n = running + loss_value, running_n + 1
            if trajectory is not None:
                trajectory.add_loss(loss_value)

            ctx.step = step
            for hook in step_hooks:
                hook.on_step(step)
            if method.on_step_end(ctx):
                optimizer = make_optimizer(model, spec)  # the trainable set changed (e.g. Pear pruned)
                reporter.log(f"step {step}: method changed its trainable parameters; optimizer rebuilt")

            if step % cfg.log_every == 0 or step == total_steps:
                peak_rss = max(peak_rss, process.memory_info().rss)
                reporter.log_metrics(step, {"train_loss": running / running_n, "lr": optimizer.param_groups[0]["lr"],
                                            "epoch": step / steps_per_epoch})  # fmt: skip
                reporter.set_progress(step / total_steps)
                running, running_n = 0.0, 0
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress >= PROGRESS_EVERY_S:  # progress (and the heartbeat) stay live
                reporter.set_progress(step / total_steps)
                last_progress = time.monotonic()
            if step % eval_every == 0 or step == total_steps:
                t1 = time.perf_counter()
                final = evaluate(model, data.eval, cfg.batch_size * 2, device)
                eval_time += time.perf_counter() - t1
                reporter.log_metrics(step, final)
                reporter.log(f"step {step}/{total_steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
            if trajectory is not None and trajectory.due(step):
                if not (step % eval_every == 0 or step == total_steps):  # a kept checkpoint is always evaluated
                    t1 = time.perf_counter()
                    final = evaluate(model, data.eval, cfg.batch_size * 2, device)
                    eval_time += time.perf_counter() - t1
                    reporter.log_metrics(step, final)
                kept = trajectory.keep(prep, step, final)
                reporter.log(f"step {step}: kept checkpoint (train loss {kept.train_loss:.4f} since the last one)")
            # Stop before a checkpoint: one written after the run stopped being this attempt's would be ahead of
            # the metrics the database kept, and a resume from it would leave a gap in the curves.
            if reporter.should_stop():
                raise Cancelled(f"stopped at step {step}")
            due = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
            if step < total_steps and (due or time.monotonic() - last_checkpoint >= cfg.checkpoint_every_s):
                at_epoch_end = step % steps_per_epoch == 0
                checkpoint(epoch + 1 if at_epoch_end else epoch)
                last_checkpoint = time.monotonic()
        checkpoint(epoch + 1)  # every epoch end
        last_checkpoint = time.monotonic()
        if step >= total_steps:
            break

    # --- finish ---------------------------------------------------------------------------------
    weights, config = save_adapter(prep, out_dir)
    artifacts = {"adapter": str(weights), "adapter_config": str(config)}
    if trajectory is not None and trajectory.kept:
        artifacts["trajectory"] = str(trajectory.index_path)
    method_data = method.artifacts(model)
    if method_data:
        path = out_dir / f"{method.name}_analysis.json"
        path.write_text(json.dumps(method_data))
        artifacts["method_analysis"] = str(path)
    for hook in step_hooks:
        hook.close()
        stored = hook.artifact()
        if stored is not None:
            kind, hook_data = stored
            path = out_dir / f"{kind}.json"
            path.write_text(json.dumps(hook_data))
            artifacts[kind] = str(path)
    if isinstance(data.eval, LMSplit):  # base vs adapted greedy generations of a few evaluation prompts
        artifacts["generations"] = str(write_generations(prep, out_dir))
    # Measured after training: a method may have changed its trainable set and its modules (Pear prunes).
    _, total = count_parameters(model)
    trainable, stored_size = method.trainable_param_count(model), method.stored_size(model)
    peak_rss = max(peak_rss, process.memory_info().rss)
    steps_done = max(step, 1)
    timings = {
        "total_s": time.perf_counter() - t_start,
        "train_s": step_time,
        "eval_s": eval_time,
        "data_s": prep.data_s,
        "ms_per_step": 1000 * step_time / steps_done,
        "peak_rss_mb": peak_rss / 2**20,
    }
    if device.type == "cuda":
        timings["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return TrainResult(
        status="succeeded", final_metrics=final, trainable_params=trainable, total_params=total,
        adapter_params=method.adapter_param_count(model),
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        steps=step, timings=timings, artifacts=artifacts, majority_rate=data.majority_rate(),
        task=data.task, label_names=list(data.label_names), headline_metric=data.metric,
        stored_params=stored_size.params, stored_bytes=stored_size.bytes,
    )  # fmt: skip
