"""Merging whole adapters: the checkpoints of one run, or the final adapters of several runs of one method.

The arithmetic is ``engine/merging.py``'s (pure functions on state dicts); this module decides what is merged and
how, from the method contract alone (docs/METHODS.md, "Merging"):

* A **low-rank layer** (``low_rank_factors_of`` answers, and its ``A`` and ``B`` are the layer's own parameters) is
  merged by its update: each source contributes ``ΔW_i = s · B_i A_i`` (dense), the merge combines the ``ΔW_i``, and
  the result is re-factorised at the method's rank by truncated SVD (``merging.refactorise``: exact when the merged
  ΔW has rank ≤ r, else the best rank-r one), with the relative Frobenius error recorded per layer. Averaging A and
  B separately would not average ΔW (``Σ w_i B_i · Σ w_j A_j`` has cross terms).
* **Every other tensor** (the task head, non-low-rank adapters such as Houlsby's or DoRA's) is merged directly.

Methods: ``mwa`` and ``uniform`` are the weighted mean ``Σ w_i θ_i`` with MWA's weights (``uniform`` is p = 0);
``linear``, ``ties`` and ``dare`` combine task vectors. An adapter's task vector is taken against zero: for
low-rank layers it is ``ΔW_i`` exactly, for the other tensors the tensor itself (PEFT's ``add_weighted_adapter``
also treats an adapter's tensors as its own task vector). ``linear`` with weights summing to 1 is the weighted mean.

Sources must share the method, its configuration and structural state (``method_state``), the base model and its
labels; anything else is a ``MergeError`` naming what differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file

from engine.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_FILE, AdapterMeta, apply_adapter, build_model
from engine.data import load_data, read_raw
from engine.errors import UserError
from engine.merging import (
    MwaMetric,
    average_state_dicts,
    dare_merge,
    linear_merge,
    mwa_weights,
    refactorise,
    ties_merge,
)
from engine.methods import Method
from engine.methods.base import low_rank_factors_of
from engine.models import TaskModel
from engine.spec import parse_spec
from engine.train import evaluate, pick_device

MergeMethod = Literal["mwa", "uniform", "linear", "ties", "dare"]
MERGE_METHODS: tuple[str, ...] = ("mwa", "uniform", "linear", "ties", "dare")
DELTA_SUFFIX = "::delta_weight"  # the key of a low-rank layer's dense ΔW while merging


class MergeError(UserError):
    """Sources that cannot be merged, or settings that do not fit them; the message names what and the fix."""


class MergeSettings(BaseModel):
    """How to merge: the method, MWA's metric and exponent, and the baselines' own parameters."""

    model_config = ConfigDict(extra="forbid")

    method: MergeMethod = "mwa"
    metric: MwaMetric = Field("loss", description="MWA's merit: 1/loss (the checkpoint's training loss) or the step")
    p: float | None = Field(None, ge=-16.0, le=64.0,
                            description="MWA's exponent (None: 1 for mwa, 0 for linear, ties and dare)")  # fmt: skip
    weights: list[float] | None = Field(None, description="explicit weights for linear, ties and dare (not normalised)")
    density: float = Field(0.2, gt=0.0, le=1.0, description="TIES: the share of each tensor kept by the trim")
    drop_prob: float = Field(0.9, ge=0.0, lt=1.0, description="DARE: the probability of dropping an entry")
    seed: int = Field(0, description="DARE: the seed of the drop masks")

    @model_validator(mode="after")
    def _consistent(self) -> MergeSettings:
        if self.method == "uniform" and self.p not in (None, 0.0):
            raise ValueError(f"p = {self.p} with method uniform: uniform is p = 0; use method mwa for another p")
        if self.weights is not None and self.method in ("mwa", "uniform"):
            raise ValueError(f"explicit weights are for linear, ties and dare; {self.method} computes its own")
        return self

    @property
    def exponent(self) -> float:
        if self.method == "uniform":
            return 0.0
        return self.p if self.p is not None else (1.0 if self.method == "mwa" else 0.0)

    def label(self) -> str:
        """A short name for tables and charts: ``mwa loss p=2``, ``uniform``, ``ties d=0.2``."""
        if self.method == "uniform":
            return "uniform"
        if self.method == "mwa":
            return f"mwa {self.metric} p={self.exponent:g}"
        extra = {"ties": f" d={self.density:g}", "dare": f" p_drop={self.drop_prob:g}"}.get(self.method, "")
        return self.method + extra


def merge_weights(values: Sequence[float], settings: MergeSettings) -> list[float]:
    """The weights of the sources: explicit ones, else MWA's ``(m_i)^p / Σ_j m_j^p`` (``m`` = 1/loss or step)."""
    if settings.weights is not None:
        if len(settings.weights) != len(values):
            raise MergeError(f"{len(settings.weights)} weights given for {len(values)} sources: give one per source")
        return list(settings.weights)
    try:
        return mwa_weights(values, settings.metric, settings.exponent)
    except ValueError as err:
        raise MergeError(f"cannot weigh the sources: {err}") from None


@dataclass
class LowRankPair:
    """A layer merged by its ΔW: the names of its factor tensors, its scaling and rank."""

    layer: str
    a_key: str
    b_key: str
    scaling: float
    rank: int


@dataclass
class MergedAdapter:
    meta: AdapterMeta
    tensors: dict[str, torch.Tensor]
    weights: list[float]
    refactorisation_errors: dict[str, float] = field(default_factory=dict)  # layer -> ‖ΔW − s B'A'‖_F / ‖ΔW‖_F
    model: TaskModel | None = None  # the base model with the merged adapter applied (eval mode)
    method: Method | None = None

    @property
    def max_refactorisation_error(self) -> float:
        return max(self.refactorisation_errors.values(), default=0.0)


def low_rank_pairs(model: TaskModel) -> list[LowRankPair]:
    """The adapted layers of ``model`` whose ΔW is ``s · B A`` with A and B its own parameters (by identity)."""
    names = {id(p): n for n, p in model.named_parameters()}
    pairs = []
    for layer_name, layer in Method.adapted_layers(model).items():
        factors = low_rank_factors_of(layer)
        if factors is None or id(factors.A) not in names or id(factors.B) not in names:
            continue
        pairs.append(LowRankPair(layer_name, names[id(factors.A)], names[id(factors.B)], factors.scaling,
                                 factors.rank))  # fmt: skip
    return pairs


def check_compatible(metas: Sequence[AdapterMeta], labels: Sequence[str]) -> None:
    """The sources share method, configuration, structural state, base model and labels, or a ``MergeError``."""
    first = metas[0]
    for meta, label in zip(metas[1:], labels[1:], strict=True):
        for what, ours, theirs in (
            ("method", first.method, meta.method),
            ("method configuration", first.method_config, meta.method_config),
            ("structural state (method_state)", first.method_state, meta.method_state),
            ("base model", first.model, meta.model),
            ("base model options", first.options(), meta.options()),
            ("labels", first.label_names, meta.label_names),
        ):
            if ours != theirs:
                raise MergeError(
                    f"{label} differs from {labels[0]} in its {what} ({theirs!r} vs {ours!r}): merge sources of one "
                    "method, configuration and base model"
                )


def _task_dict(tensors: dict[str, torch.Tensor], pairs: Sequence[LowRankPair]) -> dict[str, torch.Tensor]:
    """A source as merging sees it: its low-rank layers as dense ``ΔW = s·B A`` (float64), its other tensors as is."""
    paired = {k for p in pairs for k in (p.a_key, p.b_key)}
    out = {k: v for k, v in tensors.items() if k not in paired}
    for p in pairs:
        out[p.layer + DELTA_SUFFIX] = p.scaling * (tensors[p.b_key].double() @ tensors[p.a_key].double())
    return out


def combine(task_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], settings: MergeSettings):
    """Merge the sources' task dicts with the chosen method."""
    if settings.method in ("mwa", "uniform"):
        return average_state_dicts(task_dicts, weights)
    # An adapter's task vector is against zero; non-float tensors (which must agree) are kept from the first source.
    zero = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in task_dicts[0].items()}
    if settings.method == "linear":
        return linear_merge(task_dicts, zero, weights)
    if settings.method == "ties":
        return ties_merge(task_dicts, zero, weights, density=settings.density)
    return dare_merge(task_dicts, zero, weights, drop_prob=settings.drop_prob, seed=settings.seed)


def merge_adapters(
    sources: Sequence[tuple[AdapterMeta, dict[str, torch.Tensor]]],
    values: Sequence[float],
    settings: MergeSettings,
    *,
    labels: Sequence[str] | None = None,
    model: TaskModel | None = None,
    trust_remote_code: bool = False,
) -> MergedAdapter:
    """Merge adapters (records and tensors) whose MWA merits are ``values`` (losses or steps, per
    ``settings.metric``). Returns the merged adapter, applied to ``model`` (fresh and unadapted; default: the base
    model rebuilt by name)."""
    if not sources:
        raise MergeError("nothing to merge: give at least one source")
    labels = list(labels or [f"source {i}" for i in range(len(sources))])
    metas = [m for m, _ in sources]
    check_compatible(metas, labels)
    weights = merge_weights(values, settings)
    base = model if model is not None else build_model(metas[0], trust_remote_code=trust_remote_code)
    adapted, method = apply_adapter(metas[0], sources[0][1], base)
    pairs = low_rank_pairs(adapted)
    try:
        merged = combine([_task_dict(t, pairs) for _, t in sources], weights, settings)
    except ValueError as err:
        raise MergeError(f"the sources' tensors do not line up ({err}): merge adapters of one configuration") from None
    dtypes = {k: v.dtype for k, v in sources[0][1].items()}
    errors = {}
    for p in pairs:
        delta = merged.pop(p.layer + DELTA_SUFFIX)
        result = refactorise(delta, p.rank, p.scaling)
        merged[p.a_key], merged[p.b_key] = result.A.to(dtypes[p.a_key]), result.B.to(dtypes[p.b_key])
        errors[p.layer] = result.relative_error
    tensors = {k: merged[k].to(dtypes[k]).contiguous() for k in sources[0][1]}
    device = next(adapted.parameters()).device
    method.load_adapter_state_dict(adapted, {k: v.to(device) for k, v in tensors.items()})
    adapted.eval()
    record = metas[0].to_json()
    record.pop("checkpoint", None)  # a kept checkpoint's own step and losses are not the merge's
    meta = AdapterMeta.model_validate(record)
    return MergedAdapter(meta, tensors, weights, errors, adapted, method)


def evaluate_merged(merged: MergedAdapter, spec: dict) -> dict[str, float]:
    """``eval_loss`` and ``eval_accuracy`` of the merged adapter on the held-out split of ``spec`` (a source's
    RunSpec: the same deterministic split its runs were evaluated on)."""
    assert merged.model is not None
    run_spec = parse_spec(spec)
    data = load_data(run_spec.dataset, merged.model.tokenizer, read_raw(run_spec.dataset))
    device = pick_device(run_spec.train.device)
    return evaluate(merged.model.to(device), data.eval, run_spec.train.batch_size * 2, device)


def write_adapter(meta: AdapterMeta, tensors: dict[str, torch.Tensor], out_dir: Path) -> tuple[Path, Path]:
    """A native adapter directory (as ``engine.artifacts.save_adapter`` writes), each file atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config = out_dir / ADAPTER_FILE, out_dir / ADAPTER_CONFIG_FILE
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, weights)
    tmp = config.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta.to_json(), indent=2))
    os.replace(tmp, config)
    return weights, config
