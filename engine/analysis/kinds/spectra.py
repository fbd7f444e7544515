"""``spectra``: singular values of ΔW per adapted layer (``engine.analysis.spectra``), in ``analysis/spectra.*``.

The files are ``analysis/spectra.npz`` and ``analysis/spectra.json``.

A run without adapted layers (full fine-tuning, linear probe) is compared with a freshly loaded base model
(``update_spectra``, ``ΔW = W_trained − W_pretrained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from engine.analysis.kinds._common import finite, load_trained
from engine.analysis.kinds.base import Analysis, AnalysisInputs, AnalysisParams, Progress, register_analysis


class SpectraParams(AnalysisParams):
    """Settings of ``engine.analysis.spectra`` (intruder dimensions: Shuttleworth et al. 2024, Def. 1)."""

    intruder_k: int = Field(10, ge=0, le=1000, description="top singular vectors checked for intruders (0: skip)")
    intruder_epsilon: float = Field(0.5, gt=0.0, le=1.0, description="a vector is an intruder below this |cos|")
    intruder_side: Literal["left", "right"] = Field(
        "left", description="compare output-space (left) or input-space (right) singular vectors"
    )
    use_factors: bool = Field(True, description="take σ(BA) from the low-rank factors when a layer exposes them")


@register_analysis
class Spectra(Analysis):
    kind = "spectra"
    order = 10
    params_cls = SpectraParams
    record_holder = "settings"

    def compute(
        self, inputs: AnalysisInputs, params: SpectraParams, record: dict, json_path: Path, progress: Progress
    ) -> None:
        from engine.analysis.spectra import adapter_spectra, save_spectra, update_spectra
        from engine.artifacts import build_model, run_trusts_remote_code
        from engine.methods import Method

        trust = run_trusts_remote_code(inputs.run)
        meta, model, _method = load_trained(inputs.adapter_dir, trust)
        intruders: dict[str, Any] = {"intruder_k": params.intruder_k, "intruder_epsilon": params.intruder_epsilon,
                                     "intruder_side": params.intruder_side}  # fmt: skip
        if Method.adapted_layers(model):
            spectra = adapter_spectra(model, use_factors=params.use_factors, **intruders)
        else:  # every weight trained (or none): ΔW = W_trained − W_pretrained
            spectra = update_spectra(build_model(meta, trust_remote_code=trust), model, **intruders)
        spectra.settings["analysis"] = record
        save_spectra(spectra, json_path)

    def load(self, json_path: Path) -> Any:
        from engine.analysis.spectra import load_spectra

        return load_spectra(json_path)

    def headline(self, json_path: Path) -> dict[str, Any]:
        """Per-layer ``effective_rank``, ``rank``, ``stable_rank`` and ``relative_update``, their mean effective
        rank, skipped layers (no dense ΔW)."""
        spectra = self.load(json_path)
        table = spectra.table.set_index("layer")
        out: dict[str, Any] = {"layers": len(table), "skipped": spectra.skipped, "source": spectra.settings["kind"]}
        for column in ("effective_rank", "rank", "stable_rank", "relative_update"):
            out[column] = {name: finite(v) if column != "rank" else int(v) for name, v in table[column].items()}
        out["mean_effective_rank"] = finite(table["effective_rank"].mean()) if len(table) else None
        return out
