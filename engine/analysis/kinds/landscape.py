"""``landscape``: loss landscapes around the trained adapter, in ``analysis/landscape-<kind>.{npz,json}``.

``<kind>`` is ``2d``, ``1d`` or ``interpolation``.

Li et al. 2018 (arXiv 1712.09913) surfaces and slices, or the Goodfellow et al. 2015 line from the method's fresh
initialisation at the run's seed (what ``engine.train.prepare`` builds before the first step) to the trained
adapter, on the first examples of the run's eval split, batched over grid points with ``torch.vmap``
(``engine.analysis.landscape``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from engine.analysis.kinds._common import finite, value_at
from engine.analysis.kinds.base import Analysis, AnalysisInputs, AnalysisParams, Progress, register_analysis

LANDSCAPE_GRID_DEFAULTS = {"2d": 11, "1d": 21, "interpolation": 31}


class LandscapeParams(AnalysisParams):
    """Settings of a loss landscape (Li et al. 2018, arXiv 1712.09913) or interpolation (Goodfellow et al. 2015)."""

    kind: Literal["2d", "1d", "interpolation"] = Field(
        "2d", description="2-D surface, 1-D slice along a random direction, or the init → trained line"
    )
    grid: int | None = Field(
        None,
        ge=2,
        le=401,
        validate_default=True,
        description="points per axis (default 11 for 2d, 21 for 1d, 31 for interpolation)",
    )
    span: float = Field(1.0, gt=0.0, description="2d/1d: coordinates range over [−span, span] (filter-normalised)")
    margin: float = Field(0.25, ge=0.0, le=10.0, description="interpolation: t ranges over [−margin, 1 + margin]")
    examples: int = Field(64, ge=1, description="evaluation examples: the first ones of the run's eval split")
    seed: int = Field(0, description="2d/1d: seed of the random directions")
    normalization: Literal["filter", "layer", "none"] = Field(
        "filter", description="2d/1d: rescale directions per filter (Li et al. sec. 4), per tensor, or not at all"
    )
    chunk_size: int = Field(32, ge=1, le=4096, description="grid points evaluated by one batched (vmap) forward")

    @field_validator("grid")
    @classmethod
    def _grid_for_kind(cls, grid: int | None, info: ValidationInfo) -> int:
        kind = info.data.get("kind", "2d")
        if grid is None:
            return LANDSCAPE_GRID_DEFAULTS[kind]
        if kind != "interpolation" and grid % 2 == 0:
            raise ValueError(
                f"{grid} is even: use an odd grid (e.g. {grid + 1}) so that the trained solution (coordinate 0) is a "
                "grid point"
            )
        return grid

    def key(self) -> dict[str, Any]:
        unused = {"span", "seed", "normalization"} if self.kind == "interpolation" else {"margin"}
        return self.model_dump(mode="json", exclude=unused | {"chunk_size"})


@register_analysis
class Landscape(Analysis):
    kind = "landscape"
    order = 30
    params_cls = LandscapeParams
    record_holder = "meta"

    def stem(self, params: LandscapeParams) -> str:  # type: ignore[override]
        return f"landscape-{params.kind}"

    def compute(
        self, inputs: AnalysisInputs, params: LandscapeParams, record: dict, json_path: Path, progress: Progress
    ) -> None:
        from engine.analysis import landscape as ls
        from engine.artifacts import check_adapter_fits, read_adapter
        from engine.data import iterate_batches
        from engine.spec import parse_spec
        from engine.train import classification_loss, prepare

        spec = parse_spec(inputs.run["spec"])
        prep = prepare(spec)  # the method's fresh initialisation at the run's seed, as training started from
        model, method = prep.model, prep.method
        init = ls.trainable_parameters(model)
        meta, tensors = read_adapter(inputs.adapter_dir)
        method.load_state(model, meta.method_state)
        check_adapter_fits(meta, model, method, tensors)
        method.load_adapter_state_dict(model, {k: v.to(prep.device) for k, v in tensors.items()})
        model.eval()
        # The batches engine.train.evaluate uses, so the centre point reproduces the run's eval loss.
        batches = list(iterate_batches(prep.data.eval, spec.train.batch_size * 2, shuffle=False))
        common: dict[str, Any] = {"model_loss": classification_loss, "max_examples": params.examples,
                                  "chunk_size": params.chunk_size, "progress": progress}  # fmt: skip
        assert params.grid is not None  # _grid_for_kind fills in the default
        if params.kind == "interpolation":
            trained = ls.trainable_parameters(model)
            start = {n: t for n, t in init.items() if n in trained and t.shape == trained[n].shape}
            result = ls.interpolation(model, batches, start, steps=params.grid, margin=params.margin, **common)
            result["meta"]["fixed_parameters"] = sorted(set(trained) - set(start))
        else:
            fn = ls.landscape_2d if params.kind == "2d" else ls.landscape_1d
            result = fn(model, batches, steps=params.grid, span=params.span, seed=params.seed,
                        normalization=params.normalization, **common)  # fmt: skip
        result["meta"]["analysis"] = record
        result["meta"]["device"] = str(prep.device)
        ls.save_landscape(result, json_path)

    def load(self, json_path: Path) -> dict[str, Any]:
        from engine.analysis.landscape import load_landscape

        return load_landscape(json_path)

    def headline(self, json_path: Path) -> dict[str, Any]:
        """``min_loss``, ``max_loss``, ``center_loss`` and ``center_accuracy`` (at the trained solution; for
        interpolation t = 1), ``init_loss`` (interpolation, t = 0), points, examples, seconds."""
        result = self.load(json_path)
        losses, meta = np.asarray(result["losses"]), result["meta"]
        accs = np.asarray(result["accuracies"]) if "accuracies" in result else None
        out = {
            "landscape": result["kind"],
            "points": int(losses.size),
            "examples": meta.get("examples"),
            "min_loss": finite(np.nanmin(losses)),
            "max_loss": finite(np.nanmax(losses)),
            "seconds": meta.get("seconds"),
        }
        alphas = np.asarray(result["alphas"])
        if result["kind"] == "2d":
            i = j = int(np.argmin(np.abs(alphas)))  # odd grids: the exact centre
            out["center_loss"] = finite(losses[i, j])
            out["center_accuracy"] = finite(accs[i, j]) if accs is not None else None
        else:
            trained = 1.0 if result["kind"] == "interpolation" else 0.0
            out["center_loss"] = value_at(alphas, losses, trained)
            out["center_accuracy"] = value_at(alphas, accs, trained) if accs is not None else None
            if result["kind"] == "interpolation":
                out["init_loss"] = value_at(alphas, losses, 0.0)
        return out
