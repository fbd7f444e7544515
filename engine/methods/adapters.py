"""Bottleneck adapters: sequential (Houlsby et al., 2019) and parallel to the MLP (AdaptFormer, Chen et al., 2022).

One bottleneck maps ``z ∈ R^{d_in}`` through a small hidden layer of size ``m`` back to ``R^{d_out}``::

    adapter(z) = W_up σ(W_down z + b_down) + b_up        W_down ∈ R^{m×d_in}, W_up ∈ R^{d_out×m}

``W_up`` and both biases start at zero, so every adapted model starts as its pretrained model; ``W_down`` keeps
``nn.Linear``'s Kaiming-uniform init (a = √5), as AdaptFormer's code does. Parameters per bottleneck
``m(d_in + d_out) + m + d_out`` (without the biases: ``m(d_in + d_out)``).

* **Houlsby** (arXiv 1902.00751, Fig. 2): ``h ← h + s·adapter(h)`` on the output ``h`` of the attention output
  projection and of the MLP output projection (roles ``o`` and ``fc2``), before the residual add and LayerNorm.
* **AdaptFormer** (arXiv 2205.13535, eq. 2-3): ``out = MLP(x) + s·W_up ReLU(W_down x)`` with ``x`` the MLP input,
  ``s = 0.1`` and ``m = 64``. The adapter input is captured by the wrapped ``fc1`` (an ``InputTap``) and its output
  added by the wrapped ``fc2``.

Neither is mergeable: the adapter is a nonlinear function of the activations, so there is no dense ΔW.
The mechanism of ``InputTap`` + ``Mailbox`` (read one layer's input, add a branch at a later layer of the same
block) is shared with Pear's parallel adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from engine.methods.base import AdaptedLinear, BlockList, Method, MethodConfig, TargetedConfig, register_method

if TYPE_CHECKING:
    from engine.models import AdaptableLayer, TaskModel

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class Bottleneck(nn.Module):
    """``W_up σ(W_down z + b_down) + b_up`` with ``W_up`` (and the biases) zero at init."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        size: int,
        activation: str,
        bias: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.down = nn.Linear(d_in, size, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(size, d_out, bias=bias, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]

    @staticmethod
    def param_count(d_in: int, d_out: int, size: int, bias: bool) -> int:
        return size * (d_in + d_out) + (size + d_out if bias else 0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(z)))


class Mailbox:
    """Hands the input of an ``InputTap`` to the layer later in the same block that adds a parallel branch.

    The value is taken (and released) by the reader, so no activation outlives the forward pass.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def post(self, x: torch.Tensor) -> None:
        self.value = x

    def take(self) -> torch.Tensor:
        x = self.value
        if x is None:
            raise RuntimeError(
                "a parallel adapter ran before the layer that captures its input: the model calls its layers in "
                "an order this method does not support"
            )
        self.value = None
        return x


class InputTap(AdaptedLinear):
    """The frozen linear layer unchanged (no ΔW, no parameters); it posts its input to a ``Mailbox``."""

    def __init__(self, base: nn.Linear, mailbox: Mailbox):
        super().__init__(base)
        self.mailbox = mailbox

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mailbox.post(x)
        return self.base(x)


def paired_layers(
    model: TaskModel, input_role: str, output_role: str, blocks: list[int] | None
) -> list[tuple[int, AdaptableLayer, AdaptableLayer]]:
    """``(block, input layer, output layer)`` for every block holding both roles, in depth order.

    A parallel branch reads the input of ``input_role`` and adds to the output of ``output_role`` of one block.
    """
    by_block: dict[int, dict[str, AdaptableLayer]] = {}
    for layer in model.adaptable_layers([input_role, output_role]):
        by_block.setdefault(layer.block, {})[layer.role] = layer
    pairs = [
        (block, roles[input_role], roles[output_role])
        for block, roles in sorted(by_block.items())
        if input_role in roles and output_role in roles and (blocks is None or block in blocks)
    ]
    if not pairs:
        raise ValueError(
            f"model {model.info.name} has no block with both a {input_role} and a {output_role} layer"
            + (f" among blocks {blocks}" if blocks is not None else "")
        )
    return pairs


# --- Houlsby: sequential ------------------------------------------------------------------------


class HoulsbyConfig(TargetedConfig):
    target_roles: list[str] = Field(
        ["o", "fc2"], description="layers whose output passes through an adapter (Houlsby: o and fc2)"
    )
    bottleneck: int = Field(64, ge=1, le=16384, description="m, the adapter's hidden size (Houlsby: 8-256, often 64)")
    activation: Literal["gelu", "relu"] = Field("gelu", description="σ inside the adapter (Houlsby's code: GELU)")
    scaling: float = Field(1.0, gt=0, description="s, multiplies the adapter output (Houlsby: 1)")
    bias: bool = Field(True, description="biases in the down- and up-projections (Houlsby: yes)")


class HoulsbyLinear(AdaptedLinear):
    """``h = W0 x + b0``, then ``h + s·adapter(h)`` (Houlsby et al., 2019, Fig. 2, right)."""

    linear_in_x = False

    def __init__(self, base: nn.Linear, size: int, activation: str, scaling: float, bias: bool):
        super().__init__(base)
        d, w = base.out_features, base.weight
        self.houlsby_adapter = Bottleneck(d, d, size, activation, bias, device=w.device, dtype=w.dtype)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.scaling * self.houlsby_adapter(h)


@register_method
class Houlsby(Method):
    """Sequential bottleneck adapters (Houlsby et al., 2019, arXiv 1902.00751, Sec. 2.1 and Fig. 2).

    Placement: on the outputs of the attention output projection and the MLP output projection, before the
    residual add/LayerNorm. Our choices where the paper differs or is silent: the adapter sits right after the
    projection, before the dropout that BERT applies there (the paper's code: after it; equal at evaluation);
    the up-projection is zero-initialised (the paper: near-zero normal, std 1e-3) so training starts exactly at
    the pretrained model; the paper also trains the LayerNorms, which we leave frozen (the adapter alone is
    counted). Not mergeable.
    """

    name = "houlsby"
    config_cls = HoulsbyConfig
    config: HoulsbyConfig
    prefix = "houlsby_"
    summary = "Sequential bottleneck adapters h ← h + W_up σ(W_down h) after the attention and MLP outputs"
    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv 1902.00751)"
    test_params = {"bottleneck": 4}

    def make_layer(self, base, layer, model):
        cfg: HoulsbyConfig = self.config
        return HoulsbyLinear(base, cfg.bottleneck, cfg.activation, cfg.scaling, cfg.bias)

    def adapter_param_count(self, model) -> int:
        cfg: HoulsbyConfig = self.config
        return sum(
            Bottleneck.param_count(l.module.out_features, l.module.out_features, cfg.bottleneck, cfg.bias)
            for l in self.target_layers(model)
        )


# --- AdaptFormer: parallel to the MLP -------------------------------------------------------------


class AdaptFormerConfig(MethodConfig):
    bottleneck: int = Field(64, ge=1, le=16384, description="m, the adapter's hidden size (AdaptFormer: 64)")
    scaling: float = Field(0.1, gt=0, description="s, multiplies the adapter output (AdaptFormer: 0.1)")
    activation: Literal["relu", "gelu"] = Field("relu", description="σ inside the adapter (AdaptFormer: ReLU)")
    bias: bool = Field(True, description="biases in the down- and up-projections (AdaptFormer: yes)")
    blocks: BlockList = Field(None, description="transformer blocks to adapt (None: all)")


class AdaptFormerLinear(AdaptedLinear):
    """The MLP's output projection plus the parallel branch: ``W0 x + b0 + s·adapter(x_mlp)``.

    ``x_mlp``, the MLP input, is what the block's ``fc1`` (an ``InputTap``) saw in this forward pass.
    """

    linear_in_x = False

    def __init__(self, base: nn.Linear, mailbox: Mailbox, d_in: int, size: int, scaling: float, activation: str,
                 bias: bool):  # fmt: skip
        super().__init__(base)
        w = base.weight
        self.adaptformer_adapter = Bottleneck(
            d_in, base.out_features, size, activation, bias, device=w.device, dtype=w.dtype
        )
        self.mailbox = mailbox
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.adaptformer_adapter(self.mailbox.take())


@register_method
class AdaptFormer(Method):
    """AdaptFormer's AdaptMLP (Chen et al., 2022, arXiv 2205.13535, eq. 2-3): a bottleneck parallel to the MLP.

    ``out = MLP(x) + s·W_up ReLU(W_down x)``, added before the block's residual connection. Our choice where the
    models differ: ``x`` is the input of the MLP's first linear layer (``fc1``), i.e. the normalised residual
    stream in pre-LN models such as ViT (the official ViT code feeds the adapter the stream before ``norm2``)
    and the attention sub-layer's output in post-LN BERT. The optional adapter LayerNorm of the official code
    (off by default there) is not offered. Not mergeable.
    """

    name = "adaptformer"
    config_cls = AdaptFormerConfig
    config: AdaptFormerConfig
    prefix = "adaptformer_"
    summary = "Parallel bottleneck beside the MLP: out = MLP(x) + s·W_up ReLU(W_down x)"
    paper = (
        "Chen et al. 2022, AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition (arXiv 2205.13535)"  # noqa: E501
    )
    test_params = {"bottleneck": 4}

    def inject(self, model) -> None:
        cfg: AdaptFormerConfig = self.config
        for _block, fc1, fc2 in paired_layers(model, "fc1", "fc2", cfg.blocks):
            mailbox = Mailbox()
            model.set_submodule(fc1.name, InputTap(fc1.module, mailbox))
            model.set_submodule(
                fc2.name,
                AdaptFormerLinear(fc2.module, mailbox, fc1.module.in_features, cfg.bottleneck, cfg.scaling,
                                  cfg.activation, cfg.bias),
            )  # fmt: skip

    def adapter_param_count(self, model) -> int:
        cfg: AdaptFormerConfig = self.config
        return sum(
            Bottleneck.param_count(fc1.module.in_features, fc2.module.out_features, cfg.bottleneck, cfg.bias)
            for _block, fc1, fc2 in paired_layers(model, "fc1", "fc2", cfg.blocks)
        )
