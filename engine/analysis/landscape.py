"""Loss landscapes around a trained solution, in the space of the trainable parameters.

Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS, arXiv 1712.09913):

* 1-D: ``f(α) = L(θ* + α δ)``; 2-D: ``f(α, β) = L(θ* + α δ + β η)`` (sec. 3, eq. 1);
* filter normalisation (sec. 4): a random Gaussian direction is rescaled filter by filter,
  ``d_{i,j} ← d_{i,j} / ‖d_{i,j}‖ · ‖θ_{i,j}‖``, so the plot's scale follows the weights' scale.

And the linear interpolation of Goodfellow, Vinyals & Saxe 2015 ("Qualitatively characterizing neural network
optimization problems", arXiv 1412.6544, sec. 2): ``f(t) = L((1 − t) θ_a + t θ_b)``, from the initial adapter to
the trained one or between two solutions.

Our choices where the papers are silent:

* θ is the set of trainable parameters (``requires_grad``; adapters and the task head), each shared tensor once;
  the frozen backbone stays fixed.
* A "filter" is a slice along a tensor's first dimension: a row of a linear weight (one output unit; the r rows
  of LoRA's A), an output channel of a convolution, one expert of a stacked expert tensor.
* 1-D tensors (biases, norms, scalar gates) get a zero direction by default (``one_dim="zero"``, the option
  ``ignore='biasbn'`` of the authors' code), so the plot does not move them; ``one_dim="whole"`` normalises
  the whole vector as one filter instead.
* The second direction is orthogonalised to the first (Gram–Schmidt over all parameters jointly) and then
  rescaled to its norm before the projection. In high dimension the removed component is tiny, so row norms
  stay close to the weights' row norms; the first direction's row norms match exactly.
* The loss over the fixed batches is the example-weighted mean of the per-batch (mean) losses; accuracy is
  reported when the objective returns logits and the batch has ``labels``.

Evaluation is batched over grid points: the trainable tensors of a chunk of P points are stacked and
``torch.vmap`` maps ``torch.func.functional_call`` over them, so one forward serves P points. On CPU the
scaled-dot-product attention is pinned to its math backend inside the vmap (the fused CPU kernel has no
batching rule and would fall back to a per-point loop). ``naive`` evaluation (``batched=False``) writes each
point's values into the model in place and runs ordinary forwards; it is kept as the reference.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from engine.analysis import load_arrays, save_arrays

Objective = Callable[[nn.Module, Any], Any]  # (model, batch) -> loss or (loss, logits)
Params = dict[str, torch.Tensor]
Progress = Callable[[float], None]


# --- objective -----------------------------------------------------------------------------------


def make_objective(
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    model_loss: Objective | None = None,
) -> Objective:
    """One objective ``(model, batch) -> (loss, logits or None)`` from either kind of loss.

    ``loss_fn(model_output, batch)`` is called on ``model(batch)``, whose output is also used as logits;
    ``model_loss(model, batch)`` returns a loss or ``(loss, logits)`` (as ``engine.train.classification_loss``).
    Losses must be means over the batch's examples.
    """
    if (loss_fn is None) == (model_loss is None):
        raise ValueError("give exactly one of loss_fn (model_output, batch) or model_loss (model, batch)")
    if loss_fn is not None:

        def from_output(model: nn.Module, batch: Any):
            output = model(batch)
            return loss_fn(output, batch), output if isinstance(output, torch.Tensor) else None

        return from_output

    assert model_loss is not None  # exactly one of the two is given

    def from_model(model: nn.Module, batch: Any):
        result = model_loss(model, batch)
        return (result[0], result[1]) if isinstance(result, tuple) else (result, None)

    return from_model


def _labels(batch: Any) -> torch.Tensor | None:
    return batch.get("labels") if isinstance(batch, Mapping) else None


def _batch_size(batch: Any) -> int:
    labels = _labels(batch)
    if labels is not None:
        return len(labels)
    if isinstance(batch, Mapping):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        return int(first.shape[0]) if first is not None else 1
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 1


def _loss_and_correct(objective: Objective, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, number of correct predictions; NaN when the objective gives no logits or the batch no labels)."""
    loss, logits = objective(model, batch)
    labels = _labels(batch)
    if logits is None or labels is None or labels.dim() != 1:  # token labels (a causal LM): no class accuracy
        correct = torch.full((), float("nan"), device=loss.device, dtype=torch.float64)
    else:
        correct = (logits.argmax(-1) == labels).sum().double()
    return loss.double(), correct


class _ObjectiveModule(nn.Module):
    """Wraps ``objective(model, batch)`` as a module so ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return _loss_and_correct(self.objective, self.model, batch)


# --- batches -------------------------------------------------------------------------------------


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def limit_examples(batches: Sequence[Any], max_examples: int | None) -> list[Any]:
    """The first ``max_examples`` examples of ``batches`` (the last batch sliced if it holds dicts of tensors)."""
    if max_examples is None:
        return list(batches)
    out, seen = [], 0
    for batch in batches:
        if seen >= max_examples:
            break
        n = _batch_size(batch)
        take = min(n, max_examples - seen)
        if take < n and isinstance(batch, Mapping):
            batch = {
                k: v[:take] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                for k, v in batch.items()
            }
        out.append(batch)
        seen += take
    return out


# --- directions ----------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module, names: Sequence[str] | None = None) -> Params:
    """Copies of the trainable tensors, each shared tensor once (``named_parameters`` deduplicates)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if names is not None:
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"not trainable parameters of the model: {unknown[:3]}")
        params = {n: params[n] for n in names}
    if not params:
        raise ValueError("the model has no trainable parameter to perturb")
    return params


def normalize_direction(
    direction: Params,
    params: Params,
    normalization: Literal["filter", "layer", "none"] = "filter",
    one_dim: Literal["zero", "whole"] = "zero",
) -> Params:
    """Rescale a direction to the weights' scale (Li et al. 2018, sec. 4).

    ``filter``: each slice along the first dimension gets the norm of the same slice of the weight;
    ``layer``: each tensor gets the norm of its weight; ``none``: unchanged. 1-D tensors: zero (``one_dim="zero"``)
    or normalised as one filter (``"whole"``). Scalars count as 1-D.
    """
    out = {}
    for name, d in direction.items():
        dtype = torch.promote_types(params[name].dtype, torch.float32)  # at least float32, float64 stays
        w, d = params[name].to(dtype), d.to(dtype)
        if normalization == "none":
            out[name] = d.clone()
        elif w.dim() <= 1:
            out[name] = torch.zeros_like(d) if one_dim == "zero" else d * (w.norm() / (d.norm() + 1e-10))
        elif normalization == "layer":
            out[name] = d * (w.norm() / (d.norm() + 1e-10))
        else:
            w_rows, d_rows = w.reshape(w.shape[0], -1), d.reshape(d.shape[0], -1)
            scale = w_rows.norm(dim=1) / (d_rows.norm(dim=1) + 1e-10)
            out[name] = (d_rows * scale[:, None]).reshape(d.shape)
    return out


def dot(a: Params, b: Params) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def orthogonalize(direction: Params, against: Params) -> Params:
    """``d − (⟨d, e⟩ / ⟨e, e⟩) e`` over all tensors jointly, rescaled to ``‖d‖`` (Gram–Schmidt)."""
    norm_e = dot(against, against)
    if norm_e == 0:
        return {n: t.clone() for n, t in direction.items()}
    coef = dot(direction, against) / norm_e
    out = {n: direction[n] - coef * against[n] for n in direction}
    before, after = math.sqrt(dot(direction, direction)), math.sqrt(dot(out, out))
    return {n: t * (before / after) for n, t in out.items()} if after > 0 else out


def random_directions(
    params: Params,
    count: int = 2,
    *,
    seed: int = 0,
    normalization: Literal["filter", "layer", "none"] = "filter",
    one_dim: Literal["zero", "whole"] = "zero",
    orthogonal: bool = True,
) -> list[Params]:
    """``count`` Gaussian directions, normalised; each orthogonalised to the previous ones when ``orthogonal``."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Params] = []
    for _ in range(count):
        raw = {n: torch.randn(p.shape, generator=gen).to(p.device) for n, p in params.items()}
        d = normalize_direction(raw, params, normalization, one_dim)
        if orthogonal:
            for previous in out:
                d = orthogonalize(d, previous)
        out.append(d)
    return out


# --- evaluation ----------------------------------------------------------------------------------


def _attention_context(device: torch.device):
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


@torch.no_grad()
def evaluate_points(
    model: nn.Module,
    batches: Sequence[Any],
    objective: Objective,
    center: Params,
    directions: Sequence[Params],
    coords: np.ndarray,
    *,
    batched: bool = True,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy at ``θ = center + Σ_k coords[p, k] · directions[k]`` for each point p.

    ``batched`` maps the forward over chunks of ``chunk_size`` points with ``torch.vmap`` (halving the chunk on
    out-of-memory); otherwise each point is written into the model and evaluated by a plain forward.
    Returns (losses, accuracies), each of shape (P,); accuracies are NaN without logits or labels.
    """
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    if coords.shape[1] != len(directions):
        raise ValueError(f"coords have {coords.shape[1]} columns for {len(directions)} directions")
    device = next(iter(center.values())).device
    batches = [_move(b, device) for b in batches]
    if not batches:
        raise ValueError("no batches to evaluate the loss on")
    sizes = [_batch_size(b) for b in batches]
    total = float(sum(sizes))
    stacked_dirs = {n: torch.stack([d[n].to(t.dtype) for d in directions]) for n, t in center.items()}
    was_training = model.training
    model.eval()
    try:
        if batched:
            sums = _evaluate_batched(
                model, batches, sizes, objective, center, stacked_dirs, coords, chunk_size, progress
            )
        else:
            sums = _evaluate_naive(model, batches, sizes, objective, center, stacked_dirs, coords, progress)
    finally:
        model.train(was_training)
    return sums[:, 0] / total, sums[:, 1] / total


def _point_values(center: Params, stacked_dirs: Params, coord: torch.Tensor) -> Params:
    """``center + Σ_k coord[..., k] d_k`` for a coordinate row (k,) or a chunk of rows (P, k)."""
    out = {}
    for name, c in center.items():
        d = stacked_dirs[name]
        shift = torch.tensordot(coord.to(d.dtype), d, dims=([coord.dim() - 1], [0]))
        out[name] = c + shift
    return out


def _evaluate_batched(model, batches, sizes, objective, center, stacked_dirs, coords, chunk_size, progress):
    wrapper = _ObjectiveModule(model, objective)
    device = next(iter(center.values())).device

    def point(values: Params, batch: Any):
        return functional_call(wrapper, {f"model.{n}": v for n, v in values.items()}, (batch,))

    mapped = vmap(point, in_dims=(0, None))
    sums = np.zeros((len(coords), 2))
    start, chunk = 0, max(1, chunk_size)
    while start < len(coords):
        rows = torch.as_tensor(coords[start : start + chunk], device=device)
        values = _point_values(center, stacked_dirs, rows)
        try:
            acc = torch.zeros(len(rows), 2, device=device, dtype=torch.float64)
            with _attention_context(device):
                for batch, n in zip(batches, sizes):
                    loss, correct = mapped(values, batch)
                    acc[:, 0] += loss.double() * n
                    acc[:, 1] += correct.double()
        except RuntimeError as err:
            if chunk > 1 and _is_out_of_memory(err):
                chunk //= 2
                continue
            raise
        sums[start : start + len(rows)] = acc.cpu().numpy()
        start += len(rows)
        if progress is not None:
            progress(start / len(coords))
    return sums


def _evaluate_naive(model, batches, sizes, objective, center, stacked_dirs, coords, progress):
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in center}
    sums = np.zeros((len(coords), 2))
    try:
        for i, row in enumerate(coords):
            values = _point_values(center, stacked_dirs, torch.as_tensor(row, device=next(iter(saved.values())).device))
            for name, value in values.items():
                named[name].copy_(value)
            for batch, n in zip(batches, sizes):
                loss, correct = _loss_and_correct(objective, model, batch)
                sums[i, 0] += float(loss) * n
                sums[i, 1] += float(correct)
            if progress is not None:
                progress((i + 1) / len(coords))
    finally:
        for name, value in saved.items():
            named[name].copy_(value)
    return sums


# --- landscapes ----------------------------------------------------------------------------------


def _result(kind: str, arrays: dict[str, np.ndarray], accuracies: np.ndarray, meta: dict[str, Any]) -> dict:
    result: dict[str, Any] = {"kind": kind, **arrays}
    if not np.all(np.isnan(accuracies)):
        result["accuracies"] = accuracies
    result["meta"] = meta
    return result


def _evaluate_grid(
    model: nn.Module,
    batches: Sequence[Any],
    objective: Objective,
    origin: Params,
    directions: list[Params],
    points: np.ndarray,
    *,
    batched: bool,
    chunk_size: int,
    progress: Progress | None,
    started: float,
    meta: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``evaluate_points``, and the meta every landscape records: its settings, then the examples, the number of
    parameters moved, the route and the seconds since ``started``."""
    losses, accs = evaluate_points(
        model, batches, objective, origin, directions, points,
        batched=batched, chunk_size=chunk_size, progress=progress,
    )  # fmt: skip
    meta = meta | {
        "examples": sum(_batch_size(b) for b in batches),
        "parameters": int(sum(t.numel() for t in origin.values())),
        "batched": batched,
        "seconds": time.perf_counter() - started,
    }
    return losses, accs, meta


def landscape_1d(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    model_loss: Objective | None = None,
    steps: int = 51,
    span: float = 1.0,
    seed: int = 0,
    direction: Params | None = None,
    normalization: Literal["filter", "layer", "none"] = "filter",
    one_dim: Literal["zero", "whole"] = "zero",
    max_examples: int | None = None,
    param_names: Sequence[str] | None = None,
    batched: bool = True,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``L(θ* + α δ)`` for ``steps`` values of α in ``[−span, span]`` (Li et al. 2018, eq. 1 in one dimension).

    Returns ``{"kind": "1d", "alphas", "losses", "accuracies" (when available), "meta"}``.
    """
    t0 = time.perf_counter()
    objective = make_objective(loss_fn, model_loss)
    center = trainable_parameters(model, param_names)
    if direction is None:
        (direction,) = random_directions(center, 1, seed=seed, normalization=normalization, one_dim=one_dim)
    batches = limit_examples(batches, max_examples)
    alphas = np.linspace(-span, span, steps)
    settings = {"steps": steps, "span": span, "seed": seed, "normalization": normalization, "one_dim": one_dim}
    losses, accs, meta = _evaluate_grid(
        model, batches, objective, center, [direction], alphas[:, None],
        batched=batched, chunk_size=chunk_size, progress=progress, started=t0, meta=settings,
    )  # fmt: skip
    return _result("1d", {"alphas": alphas, "losses": losses}, accs, meta)


def landscape_2d(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    model_loss: Objective | None = None,
    steps: int = 21,
    span: float = 1.0,
    seed: int = 0,
    directions: tuple[Params, Params] | None = None,
    normalization: Literal["filter", "layer", "none"] = "filter",
    one_dim: Literal["zero", "whole"] = "zero",
    max_examples: int | None = None,
    param_names: Sequence[str] | None = None,
    batched: bool = True,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``L(θ* + α δ + β η)`` on a ``steps × steps`` grid over ``[−span, span]²`` (Li et al. 2018, eq. 1).

    Returns ``{"kind": "2d", "alphas", "betas", "losses", "accuracies", "meta"}`` with
    ``losses[i, j] = L(alphas[i], betas[j])``.
    """
    t0 = time.perf_counter()
    objective = make_objective(loss_fn, model_loss)
    center = trainable_parameters(model, param_names)
    if directions is None:
        first, second = random_directions(center, 2, seed=seed, normalization=normalization, one_dim=one_dim)
        directions = (first, second)
    batches = limit_examples(batches, max_examples)
    alphas = np.linspace(-span, span, steps)
    betas = np.linspace(-span, span, steps)
    grid = np.stack(np.meshgrid(alphas, betas, indexing="ij"), axis=-1).reshape(-1, 2)
    settings = {
        "steps": steps, "span": span, "seed": seed, "normalization": normalization, "one_dim": one_dim,
        "direction_cosine": dot(*directions)
        / math.sqrt(dot(directions[0], directions[0]) * dot(directions[1], directions[1]) or 1.0),
    }  # fmt: skip
    losses, accs, meta = _evaluate_grid(
        model, batches, objective, center, list(directions), grid,
        batched=batched, chunk_size=chunk_size, progress=progress, started=t0, meta=settings,
    )  # fmt: skip
    shape = (steps, steps)
    return _result("2d", {"alphas": alphas, "betas": betas, "losses": losses.reshape(shape)}, accs.reshape(shape), meta)


def interpolation(
    model: nn.Module,
    batches: Sequence[Any],
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor] | None = None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    model_loss: Objective | None = None,
    steps: int = 31,
    margin: float = 0.25,
    max_examples: int | None = None,
    batched: bool = True,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``L((1 − t) θ_start + t θ_end)`` for t in ``[−margin, 1 + margin]`` (Goodfellow et al. 2015, sec. 2).

    ``start`` and ``end`` are state dicts (e.g. the adapter at initialisation and after training, or two
    runs' adapters); ``end`` defaults to the model's current values. Only the model's trainable parameters
    present in ``start`` move; other keys (buffers, frozen tensors) are ignored, other parameters stay as they
    are. ``alphas`` holds t, so t = 0 is ``start`` and t = 1 is ``end``.
    """
    t0 = time.perf_counter()
    objective = make_objective(loss_fn, model_loss)
    current = trainable_parameters(model)
    names = [n for n in current if n in start and (end is None or n in end)]
    if not names:
        raise ValueError("interpolation: start/end share no trainable parameter name with the model")
    device = next(iter(current.values())).device
    theta_a = {n: start[n].to(device=device, dtype=current[n].dtype) for n in names}
    theta_b = {n: (end[n] if end is not None else current[n]).to(device=device, dtype=current[n].dtype) for n in names}
    for n in names:
        if theta_a[n].shape != current[n].shape or theta_b[n].shape != current[n].shape:
            raise ValueError(
                f"interpolation: {n} has shape {tuple(theta_a[n].shape)}, model has {tuple(current[n].shape)}"
            )
    direction = {n: theta_b[n] - theta_a[n] for n in names}
    batches = limit_examples(batches, max_examples)
    alphas = np.linspace(-margin, 1.0 + margin, steps)
    settings = {"steps": steps, "margin": margin, "distance": math.sqrt(dot(direction, direction))}
    losses, accs, meta = _evaluate_grid(
        model, batches, objective, theta_a, [direction], alphas[:, None],
        batched=batched, chunk_size=chunk_size, progress=progress, started=t0, meta=settings,
    )  # fmt: skip
    return _result("interpolation", {"alphas": alphas, "losses": losses}, accs, meta)


# --- artifact ------------------------------------------------------------------------------------


def save_landscape(result: Mapping[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the arrays to ``<stem>.npz`` and kind + meta to ``<stem>.json``."""
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    return save_arrays(path, arrays, {"artifact": "landscape", "kind": result["kind"], "meta": result.get("meta", {})})


def load_landscape(path: str | Path) -> dict[str, Any]:
    arrays, meta = load_arrays(path)
    if meta.get("artifact") != "landscape":
        raise ValueError(f"{path} is not a landscape artifact (artifact = {meta.get('artifact')!r})")
    return {"kind": meta["kind"], **arrays, "meta": meta.get("meta", {})}
