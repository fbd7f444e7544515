"""Rank spectra of weight updates: singular values of ΔW per adapted layer and the scalars derived from them.

For each layer with a dense update ``ΔW`` (``AdaptedLinear.delta_weight()``, or ``W − W0`` between two state
dicts for full fine-tuning) we report

* the singular values σ₁ ≥ σ₂ ≥ … of ΔW and their normalised cumulative energy ``Σ_{i≤k} σᵢ² / Σ σᵢ²``;
* the effective rank ``exp(H(p))``, ``pᵢ = σᵢ / Σσ`` (Roy & Vetterli 2007, "The effective rank", eq. 2-3);
* the stable rank ``‖ΔW‖_F² / σ₁²`` (Rudelson & Vershynin 2007, "Sampling from large matrices", sec. 1.2);
* the relative update size ``‖ΔW‖_F / ‖W0‖_F``;
* intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
  arXiv 2410.21228, Def. 1): among the top-k singular vectors of ``W0 + ΔW``, those whose best ``|cos|`` match
  among all singular vectors of ``W0`` is below ε (defaults k = 10, ε = 0.5).

Low-rank updates ``ΔW = B A`` (``low_rank_factors_of(layer)``, with the scaling folded into B) never form a dense
SVD: with the thin QR factorisations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the
singular values of ΔW are those of the small core ``R_B R_Aᵀ`` (at most r × r). Dense updates use
``torch.linalg.svdvals``.

Our choices where the papers are silent:

* values under the numerical-rank tolerance ``σ₁ · max(d_out, d_in) · ε_float32`` (the tolerance of
  ``torch.linalg.matrix_rank``) are stored as exactly 0, so a dense SVD and the factor route agree on the rank
  and rounding noise does not leak into the effective rank;
* intruders compare left singular vectors (the output space, ``side="left"``) by default; ``side="right"``
  compares input-space vectors;
* the reference ``W0`` is the layer's ``effective_base_weight()`` unless ``base_weights`` gives the pretrained
  weights (for residual methods such as PiSSA the effective base is the residual, not the pretrained weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from engine.analysis import layer_role_block, load_arrays, save_arrays
from engine.methods.base import Method, low_rank_factors_of

SCALAR_COLUMNS = [
    "rank",
    "sigma_max",
    "delta_fro",
    "base_fro",
    "relative_update",
    "effective_rank",
    "stable_rank",
    "energy_rank_90",
    "intruders",
]
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


# --- singular values -----------------------------------------------------------------------------


def dense_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """σ of a dense matrix, descending (``torch.linalg.svdvals`` in float32)."""
    return torch.linalg.svdvals(matrix.detach().float())


def low_rank_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """σ of ``ΔW = B A`` (B: d_out × r, A: r × d_in) from the factors, descending; ``min(d_out, d_in, r)`` values.

    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` (thin QR); ``Q_B``, ``Q_A`` have orthonormal columns, so
    ``σ(B A) = σ(R_B R_Aᵀ)``. The core is formed in float64: it is tiny and the products of two triangular
    factors lose precision in float32 when B and A are badly scaled (B starts at zero in LoRA).
    """
    _, r_b = torch.linalg.qr(b.detach().double())
    _, r_a = torch.linalg.qr(a.detach().double().T)
    return torch.linalg.svdvals(r_b @ r_a.T).float()


def rank_tolerance(sigma: np.ndarray, shape: tuple[int, int]) -> float:
    """``σ₁ · max(shape) · ε_float32``: below it a singular value is rounding noise."""
    return float(sigma.max(initial=0.0)) * max(shape) * FLOAT32_EPS


def clean_spectrum(sigma: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """σ as float64, sorted descending, with values under ``rank_tolerance`` set to 0."""
    values = np.sort(np.abs(np.asarray(torch.as_tensor(sigma).detach().cpu(), dtype=np.float64)))[::-1].copy()
    values[values <= rank_tolerance(values, shape)] = 0.0
    return values


# --- scalars -------------------------------------------------------------------------------------


def cumulative_energy(sigma: np.ndarray) -> np.ndarray:
    """``Σ_{i≤k} σᵢ² / Σ σᵢ²`` for k = 1..n (all zeros when ΔW = 0)."""
    energy = np.asarray(sigma, dtype=np.float64) ** 2
    total = energy.sum()
    return np.cumsum(energy) / total if total > 0 else np.zeros_like(energy)


def energy_rank(sigma: np.ndarray, fraction: float = 0.9) -> int:
    """Smallest k whose cumulative energy reaches ``fraction`` (0 when ΔW = 0)."""
    energy = cumulative_energy(sigma)
    if not energy.size or energy[-1] == 0:
        return 0
    return int(np.searchsorted(energy, fraction - 1e-12) + 1)


def effective_rank(sigma: np.ndarray) -> float:
    """``exp(−Σ pᵢ log pᵢ)`` with ``pᵢ = σᵢ / Σσ`` (Roy & Vetterli 2007); 0 for ΔW = 0; n for n equal values."""
    s = np.asarray(sigma, dtype=np.float64)
    s = s[s > 0]
    if not s.size:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(sigma: np.ndarray) -> float:
    """``‖ΔW‖_F² / σ₁² = Σσᵢ² / σ₁²`` (Rudelson & Vershynin 2007); 0 for ΔW = 0."""
    s = np.asarray(sigma, dtype=np.float64)
    top = s.max(initial=0.0)
    return float((s**2).sum() / top**2) if top > 0 else 0.0


def intruder_similarities(
    base: torch.Tensor, tuned: torch.Tensor, k: int = 10, side: Literal["left", "right"] = "left"
) -> np.ndarray:
    """For each of the top-k singular vectors of ``tuned``, its best ``|cos|`` with any singular vector of ``base``.

    Singular vectors are unit vectors defined up to sign, so the cosine is taken in absolute value.
    """
    base, tuned = base.detach().float(), tuned.detach().float()
    if side == "right":
        base, tuned = base.T, tuned.T
    u_base, _, _ = torch.linalg.svd(base, full_matrices=False)
    u_tuned, _, _ = torch.linalg.svd(tuned, full_matrices=False)
    top = u_tuned[:, : min(k, u_tuned.shape[1])]
    return (u_base.T @ top).abs().amax(dim=0).cpu().double().numpy()


def intruder_dimensions(
    base: torch.Tensor,
    tuned: torch.Tensor,
    k: int = 10,
    epsilon: float = 0.5,
    side: Literal["left", "right"] = "left",
) -> list[int]:
    """Indices (0-based, in the tuned spectrum) of the intruder dimensions among the top-k (Def. 1)."""
    sims = intruder_similarities(base, tuned, k, side)
    return [int(i) for i in np.flatnonzero(sims < epsilon)]


# --- one layer -----------------------------------------------------------------------------------


@dataclass
class LayerSpectrum:
    """σ of one layer's ΔW, its scalars and (when computed) the intruder similarities of the top-k vectors."""

    sigma: np.ndarray
    scalars: dict[str, float | int | None]
    intruder_similarity: np.ndarray | None
    source: str  # "factors" | "dense"


def layer_spectrum(
    base: torch.Tensor,
    delta: torch.Tensor | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    intruder_side: Literal["left", "right"] = "left",
) -> LayerSpectrum:
    """Spectrum of one update, from ``factors = (B, A)`` when given (no dense SVD), else from dense ``delta``.

    ``intruder_k = 0`` skips the intruder analysis, which needs two dense SVDs (of W0 and W0 + ΔW).
    """
    if factors is None and delta is None:
        raise ValueError("layer_spectrum needs the dense update `delta` or its factors (B, A)")
    shape = (int(base.shape[0]), int(base.shape[1]))
    if factors is not None:
        raw, source = low_rank_singular_values(*factors), "factors"
    else:
        assert delta is not None  # one of the two is given (checked above)
        raw, source = dense_singular_values(delta), "dense"
    sigma = clean_spectrum(raw, shape)
    delta_fro = float(np.sqrt((sigma**2).sum()))
    base_fro = float(torch.linalg.matrix_norm(base.detach().float()))
    sims = None
    if intruder_k > 0:
        if delta is None:
            assert factors is not None
            delta = factors[0] @ factors[1]
        tuned = base.detach().float() + delta.detach().float()
        sims = intruder_similarities(base, tuned, intruder_k, intruder_side)
    scalars = {
        "rank": int((sigma > 0).sum()),
        "sigma_max": float(sigma.max(initial=0.0)),
        "delta_fro": delta_fro,
        "base_fro": base_fro,
        "relative_update": delta_fro / base_fro if base_fro > 0 else float("nan"),
        "effective_rank": effective_rank(sigma),
        "stable_rank": stable_rank(sigma),
        "energy_rank_90": energy_rank(sigma, 0.9),
        "intruders": int((sims < intruder_epsilon).sum()) if sims is not None else None,
    }
    return LayerSpectrum(sigma, scalars, sims, source)


# --- many layers ---------------------------------------------------------------------------------


@dataclass
class Spectra:
    """Per-layer table (layer, role, block, shape, scalars) and σ per layer, in model order."""

    table: pd.DataFrame
    sigmas: dict[str, np.ndarray]
    intruder_similarity: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # adapted layers without a dense ΔW
    settings: dict[str, Any] = field(default_factory=dict)

    def energy(self, layer: str) -> np.ndarray:
        return cumulative_energy(self.sigmas[layer])


def _row(name: str, shape: tuple[int, ...], spectrum: LayerSpectrum) -> dict[str, Any]:
    role, block = layer_role_block(name)
    return {
        "layer": name,
        "role": role,
        "block": block,
        "d_out": shape[0],
        "d_in": shape[1],
        "source": spectrum.source,
        **spectrum.scalars,
    }


def _collect(rows, sigmas, sims, skipped, settings) -> Spectra:
    columns = ["layer", "role", "block", "d_out", "d_in", "source", *SCALAR_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    return Spectra(table, sigmas, sims, skipped, settings)


@torch.no_grad()
def adapter_spectra(
    model: nn.Module,
    *,
    use_factors: bool = True,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    intruder_side: Literal["left", "right"] = "left",
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> Spectra:
    """Spectra of every adapted layer of ``model`` (``Method.adapted_layers``) that has a dense ΔW.

    ``use_factors`` takes the factor route for layers with low-rank factors (``low_rank_factors_of``);
    ``base_weights`` maps layer names to the reference W0 (default: each layer's ``effective_base_weight()``).
    """
    rows, sigmas, sims, skipped = [], {}, {}, []
    for name, layer in Method.adapted_layers(model).items():
        low_rank = low_rank_factors_of(layer) if use_factors else None
        factors = (low_rank.scaled_B, low_rank.A) if low_rank is not None else None
        delta = layer.delta_weight() if factors is None or intruder_k > 0 else None
        if factors is None and delta is None:
            skipped.append(name)
            continue
        base = (base_weights or {}).get(name)
        if base is None:
            base = layer.effective_base_weight()
        spectrum = layer_spectrum(
            base, delta, factors, intruder_k=intruder_k, intruder_epsilon=intruder_epsilon, intruder_side=intruder_side
        )
        rows.append(_row(name, tuple(base.shape), spectrum))
        sigmas[name] = spectrum.sigma
        if spectrum.intruder_similarity is not None:
            sims[name] = spectrum.intruder_similarity
    settings = {
        "kind": "adapter",
        "use_factors": use_factors,
        "intruder_k": intruder_k,
        "intruder_epsilon": intruder_epsilon,
        "intruder_side": intruder_side,
    }
    return _collect(rows, sigmas, sims, skipped, settings)


def _state(obj: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


@torch.no_grad()
def update_spectra(
    before: nn.Module | Mapping[str, torch.Tensor],
    after: nn.Module | Mapping[str, torch.Tensor],
    *,
    keys: list[str] | None = None,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    intruder_side: Literal["left", "right"] = "left",
) -> Spectra:
    """Spectra of ``ΔW = W_after − W_before`` for full fine-tuning, from two models or two state dicts.

    By default every 2-D weight present in both with the same shape whose name has a layer role (q, k, v, o,
    fc1, fc2) is compared; ``keys`` picks the state-dict keys explicitly (e.g. embeddings too).
    """
    state_before, state_after = _state(before), _state(after)
    if keys is None:
        keys = [
            k
            for k, w in state_after.items()
            if k.endswith(".weight")
            and w.dim() == 2
            and w.is_floating_point()
            and layer_role_block(k)[0]
            and k in state_before
            and state_before[k].shape == w.shape
        ]
    missing = [k for k in keys if k not in state_before or k not in state_after]
    if missing:
        raise KeyError(f"update_spectra: keys missing from a state dict: {missing[:3]}")
    rows, sigmas, sims = [], {}, {}
    for key in keys:
        w0, w1 = state_before[key], state_after[key].to(state_before[key].device)
        if w0.shape != w1.shape or w0.dim() != 2:
            raise ValueError(f"update_spectra: {key} has shapes {tuple(w0.shape)} and {tuple(w1.shape)}; need 2-D")
        spectrum = layer_spectrum(
            w0,
            w1.float() - w0.float(),
            intruder_k=intruder_k,
            intruder_epsilon=intruder_epsilon,
            intruder_side=intruder_side,
        )
        name = key.removesuffix(".weight")
        rows.append(_row(name, tuple(w0.shape), spectrum))
        sigmas[name] = spectrum.sigma
        if spectrum.intruder_similarity is not None:
            sims[name] = spectrum.intruder_similarity
    settings = {
        "kind": "update",
        "intruder_k": intruder_k,
        "intruder_epsilon": intruder_epsilon,
        "intruder_side": intruder_side,
    }
    return _collect(rows, sigmas, sims, [], settings)


# --- artifact ------------------------------------------------------------------------------------


def save_spectra(spectra: Spectra, path: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (σ and intruder similarities per layer) and ``<stem>.json`` (table, settings)."""
    layers = list(spectra.sigmas)
    arrays = {f"sigma_{i}": spectra.sigmas[name] for i, name in enumerate(layers)}
    arrays |= {
        f"intruder_{i}": spectra.intruder_similarity[n]
        for i, n in enumerate(layers)
        if n in spectra.intruder_similarity
    }
    meta = {
        "artifact": "spectra",
        "layers": layers,
        "table": spectra.table.astype(object).where(spectra.table.notna(), None).to_dict(orient="records"),
        "skipped": spectra.skipped,
        "settings": spectra.settings,
    }
    return save_arrays(path, arrays, meta)


def load_spectra(path: str | Path) -> Spectra:
    arrays, meta = load_arrays(path)
    if meta.get("artifact") != "spectra":
        raise ValueError(f"{path} is not a spectra artifact (artifact = {meta.get('artifact')!r})")
    layers = meta["layers"]
    sigmas = {name: arrays[f"sigma_{i}"] for i, name in enumerate(layers)}
    sims = {name: arrays[f"intruder_{i}"] for i, name in enumerate(layers) if f"intruder_{i}" in arrays}
    columns = ["layer", "role", "block", "d_out", "d_in", "source", *SCALAR_COLUMNS]
    table = pd.DataFrame(meta["table"], columns=columns)
    return Spectra(table, sigmas, sims, meta.get("skipped", []), meta.get("settings", {}))
