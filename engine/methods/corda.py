"""CorDA: context-oriented decomposition adaptation (Yang et al., 2024, arXiv 2406.05223, §3).

The SVD is taken of ``W0 C``, the weight multiplied by the covariance ``C`` of the layer's inputs on
calibration data, so the components are ordered by how much they act on the task's context:
``SVD(W0 C) = U Σ Vᵀ`` and ``V̂ᵀ = Vᵀ C⁻¹`` (so ``U Σ V̂ᵀ = W0`` exactly). Instruction-previewed mode ("ipm")
moves the top r components into the adapter; knowledge-preserved mode ("kpm") the bottom r, leaving the
components that carry the calibration context frozen. ``A = √(Σ_r/s) V̂ᵀ_r``, ``B = U_r √(Σ_r/s)``, the frozen
weight becomes ``W0 − s B A`` (the residual; ``pretrained_weight()`` gives back ``W0``).

Calibration runs in ``on_train_start``: forward pre-hooks on the adapted layers collect the inputs of
``calib_batches`` training batches (eval mode, no gradient), then every layer is re-initialised in place (same
Parameter objects, so the optimizer built afterwards sees the new values). Before calibration, e.g. when a
model is built without the training loop, each layer is a valid plain LoRA (A Kaiming-uniform, B = 0,
residual = W0). An adapter saved after calibration carries its initial factors, so loading it into a freshly
built model restores the matching residual without re-calibrating (see ``ResidualLowRankLinear``).

Choices where the paper is silent, all as in the reference code and PEFT's ``preprocess_corda``:

* the covariance is the mean over calibration samples (sequences / images) of ``X_iᵀ X_i`` (``X_i``: that
  sample's token activations, a sum over tokens); with ``input_normalisation="max"`` each ``X_i`` is first
  divided by ``|max X_i|`` (its largest entry, signed, as the reference code does). PEFT runs one unpadded
  sequence per forward; we run padded batches and drop padding tokens (``attention_mask``), which gives the
  same covariance;
* damping: ``C + λ·mean(diag C)·I`` starting from λ = ``damping`` and doubling λ until
  ``‖C_λ C_λ⁻¹ − I‖_F < inverse_tolerance``; the damped ``C_λ`` is used in both ``W0 C_λ`` and ``C_λ⁻¹``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from engine.methods.base import Method, PeftLoraOptions, TrainContext, register_method
from engine.methods.lora import LoRAConfig
from engine.methods.pissa import ResidualLowRankLinear

# Our attribute names -> PEFT's LoRA names; the initial factors have no PEFT counterpart.
PEFT_NAMES = {"corda_A": "lora_A", "corda_B": "lora_B"}

MAX_DAMPING_DOUBLINGS = 60


class CorDAConfig(LoRAConfig):
    mode: Literal["ipm", "kpm"] = Field(
        "ipm", description="ipm: top r context components train (instruction-previewed); kpm: bottom r (knowledge)"
    )
    calib_batches: int = Field(8, ge=1, le=10_000, description="training batches used to estimate the covariance")
    damping: float = Field(0.01, gt=0.0, description="initial λ of the damping λ·mean(diag C)·I (doubled as needed)")
    inverse_tolerance: float = Field(0.05, gt=0.0, description="accept λ once ‖C_λ C_λ⁻¹ − I‖_F is below this")
    input_normalisation: Literal["max", "none"] = Field(
        "max", description="max: divide each sample's activations by |its largest entry| (reference code); none"
    )


class InputCovariance:
    """Accumulates ``(1/N) Σ_i X_iᵀ X_i`` over calibration samples ``X_i`` (tokens × d_in), in float32."""

    def __init__(self, dim: int, normalisation: str, device: torch.device):
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.count = 0
        self.normalisation = normalisation

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """``x``: (batch, ..., d_in) inputs of one forward; ``token_mask``: (batch, tokens) or None."""
        x = x.detach().float().reshape(x.shape[0], -1, x.shape[-1])
        mask = token_mask if token_mask is not None and tuple(token_mask.shape) == tuple(x.shape[:2]) else None
        for i in range(x.shape[0]):
            sample = x[i][mask[i].bool()] if mask is not None else x[i]
            if self.normalisation == "max":
                sample = sample / sample.max().abs()
            if not torch.isfinite(sample).all():
                raise ValueError("corda: non-finite calibration activations (an all-zero sample under 'max'?)")
            self.sum += sample.T @ sample
            self.count += 1

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("corda: no calibration sample reached this layer")
        return self.sum / self.count


def damped_inverse(
    covariance: torch.Tensor, damping: float, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C_λ, C_λ⁻¹, λ)`` for the first λ = damping·2^k with ``‖C_λ C_λ⁻¹ − I‖_F < tolerance``."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    mean_diag = torch.mean(torch.diag(covariance))
    lam = damping
    for _ in range(MAX_DAMPING_DOUBLINGS):
        damped = covariance + eye * mean_diag * lam
        try:
            inverse = torch.linalg.inv(damped)
        except torch.linalg.LinAlgError:
            lam *= 2
            continue
        if torch.dist(damped @ inverse, eye).item() < tolerance:
            return damped, inverse, lam
        lam *= 2
    raise ValueError(f"corda: covariance did not invert within tolerance {tolerance} even with damping λ = {lam}")


def context_factors(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    rank: int,
    mode: str,
    scaling: float,
    damping: float = 0.01,
    tolerance: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """CorDA's ``(A, B)`` from ``SVD(W0 C_λ)``, plus a summary (λ, the spectrum Σ) for the artifacts."""
    w = weight.detach().float()
    if rank > min(w.shape):
        raise ValueError(f"corda rank {rank} exceeds min(d_out, d_in) = {min(w.shape)} of a {tuple(w.shape)} weight")
    damped, inverse, lam = damped_inverse(covariance.float(), damping, tolerance)
    u, sigma, vh = torch.linalg.svd(w @ damped, full_matrices=False)
    vh_hat = vh @ inverse  # V̂ᵀ = Vᵀ C⁻¹
    keep = slice(0, rank) if mode == "ipm" else slice(sigma.shape[0] - rank, sigma.shape[0])
    root = torch.sqrt(sigma[keep] / scaling)
    factor_a = root[:, None] * vh_hat[keep]
    factor_b = u[:, keep] * root[None, :]
    return factor_a, factor_b, {"damping": lam, "singular_values": sigma.tolist()}


class CorDALinear(ResidualLowRankLinear):
    factor_prefix = "corda_"


@register_method
class CorDA(Method):
    name = "corda"
    config_cls = CorDAConfig
    config: CorDAConfig
    prefix = "corda_"
    mergeable = True
    summary = "LoRA initialised from the SVD of W0·C (input covariance on calibration batches), ipm or kpm"
    paper = (
        "Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for "
        "Task-Aware Parameter-Efficient Fine-tuning (arXiv 2406.05223)"
    )
    test_params = {"rank": 2, "alpha": 4.0, "target_roles": ["q", "v"], "calib_batches": 1}

    def __init__(self, config: CorDAConfig | None = None):
        super().__init__(config)
        self.calibration: dict[str, dict[str, Any]] = {}
        self.calibration_batches_seen = 0

    def make_layer(self, base, layer, model):
        cfg: CorDAConfig = self.config
        return CorDALinear(base, cfg.rank, cfg.scaling(), cfg.dropout)

    def peft_lora_options(self) -> PeftLoraOptions:
        return self.config.peft_lora_options(init="corda")

    def adapter_param_count(self, model) -> int:
        r = self.config.rank
        return sum(r * (l.module.in_features + l.module.out_features) for l in self.target_layers(model))

    @torch.no_grad()
    def collect_covariances(self, model: nn.Module, batches: Callable[[], Any]) -> dict[str, torch.Tensor]:
        """Input covariance of every adapted layer over the first ``calib_batches`` batches of ``batches()``."""
        cfg: CorDAConfig = self.config
        layers = self.adapted_layers(model)
        device = next(model.parameters()).device
        accumulators = {
            name: InputCovariance(layer.in_features, cfg.input_normalisation, device) for name, layer in layers.items()
        }
        current_mask: list[torch.Tensor | None] = [None]

        def hook_for(name: str):
            return lambda module, args: accumulators[name].add(args[0], current_mask[0])

        handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
        was_training = model.training
        model.eval()
        self.calibration_batches_seen = 0
        try:
            for batch in batches():
                if self.calibration_batches_seen >= cfg.calib_batches:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                current_mask[0] = batch.get("attention_mask")
                model(batch)
                self.calibration_batches_seen += 1
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return {name: acc.mean() for name, acc in accumulators.items()}

    @torch.no_grad()
    def initialise_from_covariances(self, model: nn.Module, covariances: dict[str, torch.Tensor]) -> None:
        """Re-initialise each adapted layer (A, B, residual) from its input covariance, in place."""
        cfg: CorDAConfig = self.config
        for name, layer in self.adapted_layers(model).items():
            assert isinstance(layer, CorDALinear)  # CorDA adapts layers only with CorDALinear
            factor_a, factor_b, summary = context_factors(
                layer.pretrained_weight(), covariances[name], cfg.rank, cfg.mode, cfg.scaling(), cfg.damping,
                cfg.inverse_tolerance,
            )  # fmt: skip
            layer.initialise_from(factor_a, factor_b)
            self.calibration[name] = summary

    def on_train_start(self, ctx: TrainContext) -> bool:
        """Calibrate on the training batches and re-initialise in place: the trainable set is unchanged."""
        self.initialise_from_covariances(ctx.model, self.collect_covariances(ctx.model, ctx.batches))
        if ctx.log is not None:
            lams = [s["damping"] for s in self.calibration.values()]
            seen = self.calibration_batches_seen
            ctx.log(
                f"corda ({self.config.mode}): calibrated {len(lams)} layers on {seen} batches; "
                f"damping λ from {min(lams):g} to {max(lams):g}"
            )
        return False

    def artifacts(self, model) -> dict[str, Any]:
        """Per layer: the damping λ used and the spectrum Σ of ``W0 C`` (the adapter took its top or bottom r)."""
        if not self.calibration:
            return {}
        return {"mode": self.config.mode, "rank": self.config.rank, "layers": self.calibration}
