"""GPU-only switches of a run: bf16 weights, gradient checkpointing and a 4-bit base (QLoRA).

* ``train.bf16_weights``: the frozen base is stored in bfloat16 (half the memory of float32); the adapters stay
  float32 and the forward runs under bf16 autocast, as on any CUDA run.
* ``train.gradient_checkpointing``: transformers' activation checkpointing (recompute each block's activations in
  the backward instead of storing them).
* ``model_options.load_in_4bit``: the base's linears quantised to 4-bit NormalFloat with bitsandbytes (Dettmers
  et al. 2023, QLoRA, arXiv 2305.14314: NF4, double quantisation, bf16 compute); the adapters train on top.

Each needs CUDA (and the 4-bit base the ``bitsandbytes`` package); without them the run is refused before any
work, with one line that names the field and the fix.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

import torch
from torch import nn

from engine.errors import UserError


class GPUOptionError(UserError):
    """A GPU-only switch on a machine that cannot honour it."""


def _needs_cuda(field: str) -> None:
    if not torch.cuda.is_available():
        raise GPUOptionError(f"{field} needs a CUDA GPU and none is visible: turn it off or run on a GPU node")


def check(train: Any, model_options: dict[str, Any]) -> None:
    """Refuse the GPU-only switches of a spec that this machine cannot run (one line each)."""
    if getattr(train, "bf16_weights", False):
        _needs_cuda("train.bf16_weights")
    if getattr(train, "gradient_checkpointing", False):
        _needs_cuda("train.gradient_checkpointing")
    if model_options.get("load_in_4bit"):
        _needs_cuda("model_options.load_in_4bit")
        if find_spec("bitsandbytes") is None:
            raise GPUOptionError(
                "model_options.load_in_4bit needs the bitsandbytes package: pip install bitsandbytes, or turn it off"
            )


def load_options(options: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the model options (the 4-bit QLoRA base)."""
    if not options.get("load_in_4bit"):
        return {}
    check(None, {"load_in_4bit": True})
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    return {"quantization_config": quant, "device_map": {"": 0}}


def apply(net: nn.Module, train: Any) -> None:
    """Switch the base to bf16 weights and/or gradient checkpointing (after ``check``)."""
    if getattr(train, "bf16_weights", False):
        for p in net.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    if getattr(train, "gradient_checkpointing", False):
        enable = getattr(net, "gradient_checkpointing_enable", None)
        if enable is None:
            raise GPUOptionError("train.gradient_checkpointing: this model has no gradient checkpointing: turn it off")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
