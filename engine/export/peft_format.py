"""The Hugging Face PEFT LoRA layout (``adapter_model.safetensors`` + ``adapter_config.json``).

``PeftModel.from_pretrained(base, DIR)`` gives the lab's logits. Which tensors are written is decided from the
method contract alone (``delta_weight``, ``effective_base_weight``, ``low_rank_factors_of`` and the method's
``peft_lora_options``), never from the method's name:

- a layer with low-rank factors (``engine.methods.base.low_rank_factors_of``: ``s · B A``) is written exactly;
- if its frozen weight is not the pretrained one (PiSSA, CorDA keep a residual ``W_res = W0 − s B0 A0``), the
  residual difference ``W_res − W0`` is factored by SVD at its numerical rank and concatenated to the trained
  factors, ``[B, U_res] [A; V_res]``: PEFT's own PiSSA-to-LoRA conversion (``ΔW' = ΔW_trained − ΔW_init`` with
  rank-2r factors, ``path_initial_model_for_weight_conversion``), written against the pretrained ``W0``;
- any mergeable method can instead be converted by truncated SVD of ``W_eff + ΔW − W0`` at a chosen rank
  (Eckart–Young: the best rank-k approximation in Frobenius norm); the relative reconstruction error
  ``‖ΔW − B A‖_F / ‖ΔW‖_F`` is returned and written into the README;
- a non-zero ``Δb`` is carried exactly by PEFT's ``lora_bias`` (a bias on ``lora_B``);
- DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5: ``W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row``) is written with
  ``use_dora`` and ``lora_magnitude_vector = m``.

Every exact conversion is checked against the layer's dense weight ``W_eff + ΔW`` before anything is written.
A variant PEFT computes differently from plain LoRA says how through its ``Method.peft_variant`` (the flags it
needs, e.g. ``use_dora``, and the attributes holding its factors when its layers have no low-rank factors);
nothing here is keyed by method name.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from engine.artifacts import AdapterMeta, ExportError
from engine.methods import Method
from engine.methods.base import AdaptedLinear, PeftVariant, RankChoiceError, low_rank_factors_of
from engine.models import TaskModel

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# An exact (non-SVD) LoRA export must reproduce each layer's dense weight to this relative Frobenius error
# (float32 rounding of ``W0 + ΔW`` is ~1e-7).
EXACT_TOLERANCE = 1e-5


@dataclass
class LayerFactors:
    """One layer in PEFT's LoRA form: ``ΔW = (alpha / r) · lora_B @ lora_A`` (``/ √r`` with rsLoRA)."""

    name: str  # layer path in the TaskModel
    lora_A: torch.Tensor  # (r, d_in)
    lora_B: torch.Tensor  # (d_out, r), the PEFT scaling divided out
    alpha: float
    magnitude: torch.Tensor | None  # DoRA's m (d_out)
    bias: torch.Tensor | None  # lora_B.bias = Δb / scaling
    residual_rank: int  # components added for a frozen residual (PiSSA, CorDA)
    update_norm: float  # ‖W_eff + ΔW − W0‖_F, the update PEFT must reproduce
    weight_norm: float  # ‖W_eff + ΔW‖_F
    error_norm: float  # ‖(W_eff + ΔW − W0) − ΔW_peft‖_F

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def relative_error(self) -> float:
        """Error relative to the update (the SVD truncation error); 0 when both vanish."""
        return 0.0 if self.error_norm == 0.0 else self.error_norm / max(self.update_norm, 1e-300)

    @property
    def weight_error(self) -> float:
        """Error relative to the dense weight: what decides whether the outputs are reproduced."""
        return 0.0 if self.error_norm == 0.0 else self.error_norm / max(self.weight_norm, 1e-300)


def _aggregate(factors: list[LayerFactors], norm: str) -> float:
    """Error over all layers, ``√(Σ error_l²) / √(Σ norm_l²)``."""
    num = math.sqrt(sum(f.error_norm**2 for f in factors))
    den = math.sqrt(sum(getattr(f, norm) ** 2 for f in factors))
    return 0.0 if num == 0.0 else num / max(den, 1e-300)


def _svd_factors(matrix: torch.Tensor, rank: int | None, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U√S, √S Vᵀ) of the top ``rank`` components; ``rank=None``: the numerical rank.

    The numerical rank counts singular values above ``max(d_out, d_in) · ε_fp32 · σ_max(reference)``, the size of
    the rounding noise a float32 ``reference − s B0 A0`` carries (so a PiSSA residual keeps its r components).
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        sigma_max = float(torch.linalg.matrix_norm(reference, ord=2))
        tol = max(matrix.shape) * torch.finfo(torch.float32).eps * sigma_max
        rank = int((s > tol).sum())
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def lora_scaling_convention(method: Method, svd_rank: int | None) -> tuple[float | None, bool]:
    """(alpha, use_rslora) of the PEFT scaling to keep: the method's own PEFT LoRA options when it has them.

    ``alpha = None`` means scaling 1 (``lora_alpha = r``), used for SVD conversions and methods without a PEFT
    LoRA form.
    """
    options = method.peft_lora_options()
    if svd_rank is not None or options is None:
        return None, False
    return options.lora_alpha, options.use_rslora


def _scaling(alpha: float | None, rslora: bool, rank: int) -> float:
    return 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)


def _layer_factors(
    layer: nn.Module, variant: PeftVariant | None, factor_rank: int | None, alpha: float | None, rslora: bool
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(B, A, s) in float64 with the layer's low-rank update ``s · B A``, or None if the layer exposes none.

    From ``low_rank_factors_of`` (at ``factor_rank`` when the layer supports a rank choice, as DyLoRA's does) with
    the PEFT convention's scaling ``s``, else from the attributes the method's ``peft_variant`` names.
    """
    try:
        factors = low_rank_factors_of(layer, factor_rank)
    except RankChoiceError as err:  # its message names the layer and the fix (svd_rank)
        raise ExportError(str(err)) from None
    if factors is not None:
        s = _scaling(alpha, rslora, factors.rank)
        return factors.scaled_B.detach().double() / s, factors.A.detach().double(), s
    if variant is not None and variant.factor_A and variant.factor_B:
        a = getattr(layer, variant.factor_A).weight.detach().double()
        b = getattr(layer, variant.factor_B).weight.detach().double()
        return b, a, _scaling(alpha, rslora, a.shape[0])
    return None


def lora_factors(
    model: TaskModel,
    method: Method,
    base: TaskModel,
    *,
    svd_rank: int | None = None,
    factor_rank: int | None = None,
    variant: PeftVariant | None = None,
) -> list[LayerFactors]:
    """Each adapted layer as PEFT LoRA factors against the pretrained weights of ``base`` (see the module doc).

    ``svd_rank``: convert ``W_eff + ΔW − W0`` by truncated SVD at that rank (any mergeable method); otherwise
    the layers' low-rank factors are written exactly, plus the residual components, and checked against the
    dense weight. ``factor_rank`` asks layers that support a rank choice (DyLoRA) for that rank: the
    update is then truncated by design and its difference from ``ΔW`` is reported, not refused.

    The scaling kept is the method's (``peft_lora_options()``: ``lora_alpha`` and ``use_rslora``, 1 without;
    1 for SVD conversions), with ``alpha`` grown with the rank as PEFT's PiSSA conversion does.
    ``variant.magnitude`` (DoRA) writes ``W' = m ⊙ (W0 + sBA)/‖W0 + sBA‖_row`` instead of ``W0 + sBA``.
    """
    alpha, rslora = lora_scaling_convention(method, svd_rank)
    use_dora = variant is not None and dict(variant.flags).get("use_dora", False)
    layers = method.adapted_layers(model)
    if not layers:
        raise ExportError(f"method {method.name} has no adapted linear layers: there is nothing to write as LoRA")
    out = []
    with torch.no_grad():
        for name, layer in layers.items():
            delta = layer.delta_weight()
            if delta is None:
                raise ExportError(
                    f"layer {name} ({type(layer).__name__}) of method {method.name} has no dense ΔW (it is not "
                    "linear in its input): it cannot be written as LoRA; use the native format"
                )
            pretrained = base.get_submodule(name)
            assert isinstance(pretrained, nn.Linear)  # what the adapted layer wrapped, in the unadapted model
            w0 = pretrained.weight.double()
            w_eff = layer.effective_base_weight().double()
            if w_eff.shape != w0.shape:
                raise ExportError(f"layer {name}: weight {tuple(w_eff.shape)} vs pretrained {tuple(w0.shape)}")
            dense = w_eff + delta.double()
            target = dense - w0
            bias = _bias_update(layer, pretrained)
            residual_rank, magnitude = 0, None
            if svd_rank is not None:
                b, a = _svd_factors(target, svd_rank, w0)
                scaling = 1.0
            else:
                found = _layer_factors(layer, variant, factor_rank, alpha, rslora)
                if found is None:
                    raise ExportError(
                        f"layer {name} ({type(layer).__name__}) of method {method.name} has no "
                        "low-rank factors: convert it by truncated SVD of ΔW with svd_rank=<rank>"
                    )
                b, a, scaling = found
                residual = w_eff - w0
                if bool(residual.abs().max() > 0):
                    if use_dora:
                        raise ExportError(f"layer {name}: DoRA export needs the frozen weight to be the pretrained one")
                    u_res, v_res = _svd_factors(residual, None, w0)
                    residual_rank = u_res.shape[1]
                    b, a = torch.cat([b, u_res / scaling], 1), torch.cat([a, v_res], 0)
            approx = scaling * (b @ a)
            if use_dora:
                assert variant is not None  # use_dora is one of its flags
                direction = w0 + approx
                norms = direction.norm(dim=1)
                stored = getattr(layer, variant.magnitude or "", None)
                if stored is None:
                    raise ExportError(f"layer {name}: the DoRA magnitude attribute {variant.magnitude!r} is missing")
                magnitude = stored.detach().double()
                approx = (magnitude / norms)[:, None] * direction - w0
            factors = LayerFactors(
                name=name, lora_A=a, lora_B=b, alpha=scaling * (math.sqrt(a.shape[0]) if rslora else a.shape[0]),
                magnitude=magnitude, bias=None if bias is None else bias / scaling, residual_rank=residual_rank,
                update_norm=float(torch.linalg.matrix_norm(target)), weight_norm=float(torch.linalg.matrix_norm(dense)),
                error_norm=float(torch.linalg.matrix_norm(target - approx)),
            )  # fmt: skip
            exact = svd_rank is None and factor_rank is None  # a chosen rank truncates by design
            if exact and factors.weight_error > EXACT_TOLERANCE:
                raise ExportError(
                    f"layer {name}: its low-rank factors reproduce its weight only to relative error "
                    f"{factors.weight_error:.2e}; convert it by truncated SVD with svd_rank=<rank>"
                )
            dtype = layer.base.weight.dtype
            for attr in ("lora_A", "lora_B", "magnitude", "bias"):
                value = getattr(factors, attr)
                if value is not None:
                    setattr(factors, attr, value.to(dtype).contiguous())
            out.append(factors)
    return out


def _bias_update(layer: AdaptedLinear, pretrained: nn.Linear) -> torch.Tensor | None:
    """``b_eff + Δb − b0``, or None when it is zero."""
    d_out = pretrained.out_features
    b0 = pretrained.bias.double() if pretrained.bias is not None else torch.zeros(d_out, dtype=torch.float64)
    b_eff = layer.base.bias.double() if layer.base.bias is not None else torch.zeros(d_out, dtype=torch.float64)
    db = layer.delta_bias()
    update = b_eff - b0 + (db.double() if db is not None else 0)
    return update if bool(update.abs().max() > 0) else None


def _peft_targets(net: nn.Module, paths: list[str], exclude: list[str]) -> list[str]:
    """Module names as PEFT matches them: the leaf names if they select exactly ``paths``, else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    matched = {
        n for n, m in net.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in leaves)
        and not any(n == e or n.startswith(e + ".") or n.endswith("." + e) for e in exclude)
    }  # fmt: skip
    return leaves if matched == set(paths) else sorted(paths)


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _clean_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _peft_base_name(meta: AdapterMeta, model: TaskModel) -> str | None:
    """What PEFT's ``base_model_name_or_path`` should hold: a hub id or directory the Auto classes can load."""
    source = model.info.source
    if model.backend.supports_peft and source and source != "random init":
        return source
    return None


def write_peft(
    model: TaskModel,
    method: Method,
    base: TaskModel,
    directory: Path,
    meta: AdapterMeta,
    *,
    svd_rank: int | None = None,
    factor_rank: int | None = None,
) -> dict[str, Any]:
    """Write the PEFT LoRA layout of an adapted model into ``directory``; returns the conversion report."""
    from peft import LoraConfig

    if not model.backend.supports_peft:
        raise ExportError(
            f"PEFT export needs a Hugging Face transformers model; {model.info.name} is a {model.kind} model "
            "(PEFT's LoRA on timm's fused qkv differs from our split q/k/v): use the native or merged format"
        )
    if svd_rank is not None and svd_rank < 1:
        raise ExportError(f"svd_rank must be at least 1, got {svd_rank}")
    layers = method.adapted_layers(model)
    head = set(model.head_parameter_names())
    stray = [
        k for k in method.adapter_state_dict(model)
        if k not in head and not any(k.startswith(name + ".") for name in layers)
    ]  # fmt: skip
    if stray:
        raise ExportError(f"adapter tensor {stray[0]} lies outside every adapted layer: PEFT's LoRA cannot carry it")
    variant = method.peft_variant
    flags = dict(variant.flags) if variant is not None else {}
    use_dora = bool(flags.pop("use_dora", False))
    factors = lora_factors(model, method, base, svd_rank=svd_rank, factor_rank=factor_rank, variant=variant)
    factors, layout_options = model.backend.peft_layout(factors)  # e.g. GPT-2: q, k, v fused back into c_attn
    use_bias = any(f.bias is not None for f in factors)
    if use_dora and use_bias:
        raise ExportError("PEFT cannot combine DoRA with lora_bias, and this adapter changes a bias")

    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        path = PEFT_PREFIX + f.name.removeprefix("net.")
        tensors[f"{path}.lora_A.weight"] = f.lora_A
        tensors[f"{path}.lora_B.weight"] = f.lora_B
        if use_bias:
            tensors[f"{path}.lora_B.bias"] = f.bias if f.bias is not None else torch.zeros_like(f.lora_B[:, 0])
        if f.magnitude is not None:
            tensors[f"{path}.lora_magnitude_vector"] = f.magnitude
    for key, value in model.state_dict().items():
        if key in head:
            tensors[PEFT_PREFIX + key.removeprefix("net.")] = value.detach()
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(directory / PEFT_WEIGHTS_FILE))

    paths = [f.name.removeprefix("net.") for f in factors]
    modules_to_save = [h.removeprefix("net.") for h in model.info.head_names]
    rank, alpha = _common([f.rank for f in factors]), _common([f.alpha for f in factors])
    options = method.peft_lora_options()
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=cast(int, _clean_number(alpha)),  # PEFT annotates int; it takes any number (α = s·r)
        target_modules=_peft_targets(base.net, paths, modules_to_save),
        lora_dropout=options.lora_dropout if options is not None and svd_rank is None else 0.0,
        use_rslora=lora_scaling_convention(method, svd_rank)[1],
        use_dora=use_dora,
        lora_bias=use_bias,
        modules_to_save=modules_to_save,
        rank_pattern={re.escape(p): f.rank for p, f in zip(paths, factors) if f.rank != rank},
        alpha_pattern={re.escape(p): _clean_number(f.alpha) for p, f in zip(paths, factors) if f.alpha != alpha},
        task_type=model.backend.peft_task_type,
        base_model_name_or_path=_peft_base_name(meta, model),
        revision=meta.base_model.revision if meta.base_model is not None else None,
        inference_mode=True,
        **flags,
        **layout_options,
    )
    lora_config.save_pretrained(str(directory))
    carried = model.backend.save_peft_base(base, directory)  # a bundled random-init base travels with it
    residual = sum(f.residual_rank for f in factors)
    return {
        "mode": "svd" if svd_rank is not None else "factors" if factor_rank is not None else "exact",
        "svd_rank": svd_rank,
        "factor_rank": factor_rank,
        "rank": rank,
        "lora_alpha": _clean_number(alpha),
        "use_dora": use_dora,
        "lora_bias": use_bias,
        "relative_error": _aggregate(factors, "update_norm"),
        "weight_error": _aggregate(factors, "weight_norm"),
        "layer_errors": {f.name: f.relative_error for f in factors},
        "residual_components": residual,
        "base_model_dir": carried,
    }
