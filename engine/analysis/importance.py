"""Importance views: method artifacts as tidy tables, and a per-layer gradient / update norm profile.

Methods store their analysis data with ``Method.artifacts()`` as JSON-able dicts. We read them by shape, never
by method name:

* 2-D score matrices (rows × columns, e.g. blocks × heads of a head-importance score, or blocks × sites of
  per-position adapter scores), possibly with ``None`` holes and with same-shaped companions (a keep mask, a
  pruned map, a "shares block" map) → ``matrix_table`` / ``matrices_table``: one row per cell;
* per-layer vectors → ``vector_table``;
* per-layer vectors of different lengths (e.g. each layer's expert loads) → ``vectors_table``;
* histories of per-layer vectors over training (e.g. router loads: the mean mixing/routing weight of each expert
  in windows of steps), kept per layer (``router_load_table``) or as a list of step snapshots
  (``snapshot_table``).

``artifact_tables`` walks a whole artifact dict and applies whichever fits.

``LayerNormProfiler`` records, at chosen steps, per adapted layer: ``‖∇θ‖`` (the gradient norm of the layer's
adapter parameters at the step's backward pass, before clipping) and ``‖θ − θ_start‖``, the distance travelled
since the profiler started. Cheap: the gradient norm is read by a post-accumulate-grad hook only on the steps to
be recorded (one fused reduction per tensor), and one host transfer per recorded step. It is a training-loop
``StepHook`` (``engine.train``); ``default_hooks`` is the factory the worker passes to ``engine.train.train``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from engine.analysis import layer_role_block
from engine.methods.base import Method


def _numeric(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float, bool)) and not isinstance(value, str))


def is_matrix(value: Any) -> bool:
    """A rectangular 2-D list (or array) of numbers, booleans or ``None``, with at least one row."""
    if isinstance(value, np.ndarray):
        return value.ndim == 2
    if isinstance(value, torch.Tensor):
        return value.dim() == 2
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, (list, tuple)) for r in value):
        return False
    width = len(value[0])
    return width > 0 and all(len(r) == width and all(_numeric(x) for x in r) for r in value)


def is_vector(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and bool(value) and all(_numeric(x) and x is not None for x in value)


def as_float_matrix(value: Any) -> np.ndarray:
    """A 2-D float array; ``None`` cells become NaN, booleans 0/1."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.array([[np.nan if x is None else float(x) for x in row] for row in np.asarray(value, dtype=object)])


def matrix_table(
    matrix: Any,
    *,
    row_name: str = "row",
    col_name: str = "col",
    value_name: str = "score",
    row_labels: Sequence[Any] | None = None,
    col_labels: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """A rows × columns matrix as one row per cell: (row label, column label, value). ``None`` cells are NaN."""
    return matrices_table(
        {value_name: matrix}, row_name=row_name, col_name=col_name, row_labels=row_labels, col_labels=col_labels
    )


def matrices_table(
    matrices: Mapping[str, Any],
    *,
    row_name: str = "row",
    col_name: str = "col",
    row_labels: Sequence[Any] | None = None,
    col_labels: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Same-shaped matrices side by side, one row per cell and one column per matrix (e.g. score, mask)."""
    arrays = {name: as_float_matrix(m) for name, m in matrices.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"matrices_table needs matrices of one shape, got {sorted(shapes)}")
    (rows, cols) = shapes.pop()
    row_labels = list(row_labels) if row_labels is not None else list(range(rows))
    col_labels = list(col_labels) if col_labels is not None else list(range(cols))
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"labels ({len(row_labels)}, {len(col_labels)}) do not fit a {rows} × {cols} matrix")
    data = {row_name: np.repeat(row_labels, cols), col_name: np.tile(col_labels, rows)}
    data |= {name: a.reshape(-1) for name, a in arrays.items()}
    return pd.DataFrame(data)


def head_importance_table(
    scores: Any, keep_mask: Any | None = None, blocks: Sequence[int] | None = None
) -> pd.DataFrame:
    """Head scores (blocks × heads) as (block, head, score, masked); ``keep_mask`` is 1 for kept heads, 0 masked."""
    matrices = {"score": scores} if keep_mask is None else {"score": scores, "keep": keep_mask}
    table = matrices_table(matrices, row_name="block", col_name="head", row_labels=blocks)
    table["masked"] = table.pop("keep") == 0 if keep_mask is not None else False
    table["rank"] = table["score"].rank(ascending=False, method="first").astype(int)
    return table


def sharing_table(
    scores: Any,
    pruned: Any,
    shares: Any,
    *,
    row_labels: Sequence[Any] | None = None,
    col_labels: Sequence[Any] | None = None,
    row_name: str = "block",
    col_name: str = "site",
) -> pd.DataFrame:
    """Per-position scores with the prune-and-share map, one row per position that exists.

    ``scores``, ``pruned`` (bool) and ``shares`` (the row label whose adapter a pruned position uses, else None)
    are same-shaped matrices; cells that are ``None`` in ``scores`` (no adapter there) are dropped.
    """
    table = matrices_table(
        {"score": scores, "pruned": pruned, "shares": shares},
        row_name=row_name,
        col_name=col_name,
        row_labels=row_labels,
        col_labels=col_labels,
    )
    table = table[table["score"].notna()].reset_index(drop=True)
    table["pruned"] = table["pruned"].fillna(0).astype(bool)
    table["shares"] = pd.Series([int(s) if pd.notna(s) else None for s in table["shares"]], dtype=object)
    table["rank"] = table["score"].rank(ascending=False, method="first").astype(int)
    return table


def vector_table(
    values: Mapping[str, float] | Sequence[float], *, index_name: str = "layer", value_name: str = "value"
) -> pd.DataFrame:
    """A per-layer vector (a mapping name → value, or a sequence indexed 0..n−1) as a two-column table."""
    index: list[str] | list[int]
    if isinstance(values, Mapping):
        index, data = list(values), [np.nan if v is None else float(v) for v in values.values()]
    else:
        data = [np.nan if v is None else float(v) for v in values]
        index = list(range(len(data)))
    return pd.DataFrame({index_name: index, value_name: data})


def history_table(
    steps: Sequence[int], history: Any, *, layer: str = "", value_name: str = "load", item_name: str = "expert"
) -> pd.DataFrame:
    """A history of vectors (steps × items, e.g. expert loads per window) as (layer, step, item, value)."""
    values = as_float_matrix(history) if len(history) else np.zeros((0, 0))
    if len(steps) != len(values):
        raise ValueError(f"history has {len(values)} points for {len(steps)} steps")
    n_items = values.shape[1] if values.size else 0
    return pd.DataFrame(
        {
            "layer": layer,
            "step": np.repeat(np.asarray(steps, dtype=int), n_items),
            item_name: np.tile(np.arange(n_items), len(steps)),
            value_name: values.reshape(-1),
        }
    )


def _history_of(entry: Mapping[str, Any]) -> tuple[Sequence[int], Any] | None:
    history = entry.get("history")
    steps = entry.get("history_steps", entry.get("steps"))
    if history is None or steps is None:
        return None
    return steps, history


def router_load_table(loads: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per-layer router-load histories as (layer, role, block, step, expert, load).

    ``loads`` maps a layer name to a dict with ``history`` (windows × experts) and ``history_steps`` (or
    ``steps``), the shape ``RouterLoads``-style recorders produce. Role and block come from the entry when
    present, else from the layer name.
    """
    frames = []
    for layer, entry in loads.items():
        found = _history_of(entry) if isinstance(entry, Mapping) else None
        if found is None:
            continue
        frame = history_table(*found, layer=layer)
        role, block = layer_role_block(layer)
        frame.insert(1, "role", entry.get("role", role))
        frame.insert(2, "block", entry.get("block", block))
        frames.append(frame)
    columns = ["layer", "role", "block", "step", "expert", "load"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def vectors_table(
    vectors: Mapping[str, Sequence[float]], *, name: str = "layer", item_name: str = "expert", value_name: str = "load"
) -> pd.DataFrame:
    """Per-layer vectors, possibly of different lengths (e.g. each layer's expert loads), as (layer, item, value)."""
    rows = [
        {name: layer, item_name: i, value_name: np.nan if v is None else float(v)}
        for layer, vector in vectors.items()
        for i, v in enumerate(vector)
    ]
    return pd.DataFrame(rows, columns=[name, item_name, value_name])


def router_mean_table(loads: Mapping[str, Any]) -> pd.DataFrame:
    """Whole-run loads per layer and expert, (layer, expert, load); an entry is a vector or a dict with ``mean``."""
    vectors: dict[str, Any] = {}
    for layer, entry in loads.items():
        vector = entry.get("mean") if isinstance(entry, Mapping) else entry
        if is_vector(vector):
            vectors[layer] = vector
    return vectors_table(vectors)


def _snapshot_vectors(snapshot: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The one mapping of layer → vector in a ``{"step": s, <key>: {layer: vector}}`` snapshot."""
    found = [v for k, v in snapshot.items() if k != "step" and isinstance(v, Mapping)]
    if len(found) != 1 or not all(is_vector(x) for x in found[0].values()):
        return None
    return found[0]


def is_snapshot_list(value: Any) -> bool:
    """A list of ``{"step": s, <key>: {layer: vector}}`` snapshots (per-layer loads recorded every few steps)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(s, Mapping) and "step" in s and _snapshot_vectors(s) is not None for s in value)
    )


def snapshot_table(snapshots: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Snapshots of per-layer vectors over training as (layer, role, block, step, expert, load)."""
    frames = []
    for snapshot in snapshots:
        vectors = _snapshot_vectors(snapshot)
        assert vectors is not None, "not a snapshot list (is_snapshot_list)"
        frame = vectors_table(vectors)
        frame["step"] = int(snapshot["step"])
        frames.append(frame)
    columns = ["layer", "role", "block", "step", "expert", "load"]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)
    roles = {name: layer_role_block(name) for name in table["layer"].unique()}
    table["role"] = table["layer"].map(lambda n: roles[n][0])
    table["block"] = table["layer"].map(lambda n: roles[n][1])
    return table[columns]


def artifact_tables(artifacts: Mapping[str, Any], prefix: str = "") -> dict[str, pd.DataFrame]:
    """Every table an artifact dict holds, found by shape; keys are the dotted paths to the data.

    * 2-D matrices at one level are grouped by shape into one table (one column per matrix), named after the
      first of them (``"scores"`` with a ``head_mask`` column, ``"importance"`` with ``pruned`` …);
    * a mapping whose values are dicts with a ``history`` becomes one router-load table (``<path>``), and their
      ``mean`` vectors one more (``<path>.mean``); a list of ``{"step", <key>: {layer: vector}}`` snapshots
      becomes one history table;
    * 1-D numeric lists become vector tables; mappings of names to vectors (of any lengths) or to numbers become
      per-name tables;
    * other mappings are walked recursively; scalars and strings are left out.
    """
    tables: dict[str, pd.DataFrame] = {}
    by_shape: dict[tuple[int, int], dict[str, Any]] = {}
    for key, value in artifacts.items():
        path = f"{prefix}{key}"
        if is_matrix(value):
            by_shape.setdefault(as_float_matrix(value).shape, {})[key] = value
        elif is_vector(value):
            tables[path] = vector_table(value, index_name="index", value_name=key)
        elif is_snapshot_list(value):
            tables[path] = snapshot_table(value)
        elif isinstance(value, Mapping) and value:
            entries = list(value.values())
            if all(isinstance(e, Mapping) and _history_of(e) is not None for e in entries):
                tables[path] = router_load_table(value)
                means = router_mean_table(value)
                if len(means):
                    tables[f"{path}.mean"] = means
            elif all(is_vector(e) for e in entries):
                tables[path] = vectors_table(value, item_name="index", value_name=key)
            elif all(_numeric(e) and e is not None for e in entries):
                tables[path] = vector_table(value, index_name="name", value_name=key)
            else:
                tables |= artifact_tables(value, prefix=f"{path}.")
    for group in by_shape.values():
        first = next(iter(group))
        tables[f"{prefix}{first}"] = matrices_table(group)
    return tables


# --- gradient / update norms ---------------------------------------------------------------------


class LayerNormProfiler:
    """Per-layer ‖grad‖ and ‖θ − θ_start‖ of the adapter parameters, recorded at chosen steps.

    ``layers`` maps names to modules (default: ``Method.adapted_layers(model)``, each layer's
    ``adapter_parameters()``; other modules contribute all their trainable parameters). A tensor shared by several
    layers counts in each. The training loop calls ``record(step)`` after each optimizer step; the gradient read
    is the one accumulated in that step's backward pass (a hook stores its squared norm, so it survives
    ``zero_grad``). Steps recorded: ``every``-th steps, plus the explicit ``steps``. Parameters that appear later
    (a method that rebuilds its trainable set) join at their next record, with θ_start taken then.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module] | None = None,
        *,
        every: int = 10,
        steps: Iterable[int] = (),
    ):
        self.layers = dict(layers) if layers is not None else dict(Method.adapted_layers(model))
        self.every = every
        self.steps = set(int(s) for s in steps)
        self.records: list[dict[str, Any]] = []
        self._tracked: dict[int, nn.Parameter] = {}  # keeps tracked tensors alive, so their ids stay unique
        self._start: dict[int, torch.Tensor] = {}
        self._grad_sq: dict[int, torch.Tensor] = {}
        self._hooks: dict[int, Any] = {}
        self._armed = False
        self._scan()
        self._armed = self.wants(1)

    def wants(self, step: int) -> bool:
        return step in self.steps or (self.every > 0 and step % self.every == 0)

    @staticmethod
    def _layer_params(module: nn.Module) -> list[nn.Parameter]:
        adapter_parameters = getattr(module, "adapter_parameters", None)
        params = adapter_parameters() if callable(adapter_parameters) else list(module.parameters())
        return [p for p in params if p.requires_grad]

    def _scan(self) -> dict[str, list[nn.Parameter]]:
        layer_params = {name: self._layer_params(module) for name, module in self.layers.items()}
        for params in layer_params.values():
            for p in params:
                if id(p) not in self._start:
                    self._tracked[id(p)] = p
                    self._start[id(p)] = p.detach().clone()
                    self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._grad_hook)
        return layer_params

    def _grad_hook(self, param: torch.Tensor) -> None:
        if self._armed and param.grad is not None:
            self._grad_sq[id(param)] = param.grad.detach().float().pow(2).sum()

    @torch.no_grad()
    def record(self, step: int) -> bool:
        """Record ``step`` if it is scheduled; returns whether it did. Arms the hooks for the next step."""
        recorded = self.wants(step)
        if recorded:
            self._append_records(step)
        self._grad_sq.clear()
        self._armed = self.wants(step + 1)
        return recorded

    def _append_records(self, step: int) -> None:
        layer_params = {name: params for name, params in self._scan().items() if params}
        if not layer_params:
            return
        device = next(iter(layer_params.values()))[0].device
        grad_sq, update_sq, has_grad = [], [], []
        for params in layer_params.values():
            grads = [self._grad_sq[id(p)].to(device) for p in params if id(p) in self._grad_sq]
            updates = [(p.detach().float() - self._start[id(p)].float()).pow(2).sum().to(device) for p in params]
            grad_sq.append(torch.stack(grads).sum() if grads else torch.zeros((), device=device))
            update_sq.append(torch.stack(updates).sum())
            has_grad.append(bool(grads))
        grad_norms, update_norms = torch.stack([torch.stack(grad_sq), torch.stack(update_sq)]).sqrt().tolist()
        for name, g, u, seen in zip(layer_params, grad_norms, update_norms, has_grad):
            self.records.append({"step": int(step), "layer": name, "grad_norm": g if seen else None, "update_norm": u})

    def table(self) -> pd.DataFrame:
        """(step, layer, role, block, grad_norm, update_norm), one row per recorded step and layer."""
        return norm_profile_table(self.records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able records (for storing with the run's artifacts); ``norm_profile_table`` reads them back."""
        return {"every": self.every, "steps": sorted(self.steps), "records": list(self.records)}

    def close(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # --- engine.train.StepHook ---

    def on_step(self, step: int) -> None:
        self.record(step)

    def artifact(self) -> tuple[str, dict[str, Any]] | None:
        """The ``norm_profile`` artifact (``to_dict()``), or None when nothing was recorded."""
        return ("norm_profile", self.to_dict()) if self.records else None


def default_hooks(model: nn.Module, total_steps: int) -> list[LayerNormProfiler]:
    """The hooks every run gets (an ``engine.train.HookFactory``): per-layer gradient and update norms of the
    adapters, about 20 points over the run plus the last step (the Importance view's ``norm_profile``)."""
    return [LayerNormProfiler(model, every=max(1, total_steps // 20), steps=[total_steps])]


def norm_profile_table(records: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> pd.DataFrame:
    """Profiler records (or ``LayerNormProfiler.to_dict()``) as (step, layer, role, block, grad_norm, update_norm)."""
    if isinstance(records, Mapping):
        records = records.get("records", [])
    columns = ["step", "layer", "role", "block", "grad_norm", "update_norm"]
    if not records:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(list(records))
    roles = {name: layer_role_block(name) for name in table["layer"].unique()}
    table["role"] = table["layer"].map(lambda n: roles[n][0])
    table["block"] = table["layer"].map(lambda n: roles[n][1])
    table["grad_norm"] = table["grad_norm"].astype(float)
    return table[columns]
