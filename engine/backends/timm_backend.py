"""timm image models (``timm/<name>`` and the bundled ``tiny-vit``), their fused ``qkv`` split into q, k, v."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from engine.backends.base import Backend, register_backend

if TYPE_CHECKING:
    from engine.models import TaskModel

MERGED_WEIGHTS = "model.safetensors"
MERGED_CONFIG = "config.json"


def fuse_split_qkv(net: nn.Module) -> None:
    """Replace each ``SplitQKV`` by the fused ``nn.Linear`` timm expects (the rows of q, k, v stacked)."""
    from engine.models import ModelError, SplitQKV

    for name, module in list(net.named_modules()):
        if isinstance(module, SplitQKV):
            parts = [p for p in (module.q, module.k, module.v) if isinstance(p, nn.Linear)]
            if len(parts) < 3:
                raise ModelError(f"{name} still holds adapted layers: merge the method first")
            fused = nn.Linear(parts[0].in_features, 3 * parts[0].out_features, bias=parts[0].bias is not None)
            fused = fused.to(parts[0].weight.device, parts[0].weight.dtype)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([p.weight for p in parts]))
                if fused.bias is not None:
                    fused.bias.copy_(torch.cat([p.bias for p in parts]))
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, fused)


@register_backend
class TimmBackend(Backend):
    name = "timm"
    modality = "image"
    # the fused qkv split into three linears by ``SplitQKV`` (see ``prepare``)
    role_patterns = (
        (r"blocks\.(\d+)\.attn\.qkv\.q$", "q"),
        (r"blocks\.(\d+)\.attn\.qkv\.k$", "k"),
        (r"blocks\.(\d+)\.attn\.qkv\.v$", "v"),
        (r"blocks\.(\d+)\.attn\.proj$", "o"),
        (r"blocks\.(\d+)\.mlp\.fc1$", "fc1"),
        (r"blocks\.(\d+)\.mlp\.fc2$", "fc2"),
    )

    def claims(self, name: str) -> bool:
        return name == "tiny-vit" or name.startswith("timm/")

    def load(self, name: str, num_labels: int, options: dict[str, Any], trust_remote_code: bool) -> TaskModel:
        import timm

        from engine.models import ModelError

        if name == "tiny-vit":
            torch.manual_seed(options.get("init_seed", 0))
            net = timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, num_classes=num_labels,
                img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4,
            )  # fmt: skip
            return self.wrap(net, num_labels, name, "random init")
        arch = name.removeprefix("timm/")
        options = dict(options)
        pretrained = bool(options.pop("pretrained", True))
        options.pop("init_seed", None)
        try:
            net = timm.create_model(arch, pretrained=pretrained, num_classes=num_labels, **options)
        except RuntimeError as err:
            raise ModelError(f"model {name}: {err}. Check the timm name (timm.list_models()).") from err
        return self.wrap(net, num_labels, name, f"timm:{arch}" + (" (pretrained)" if pretrained else ""))

    def prepare(self, net: nn.Module) -> nn.Module:
        from engine.models import SplitQKV

        for block_name, module in list(net.named_modules()):
            if block_name.endswith(".attn") and isinstance(getattr(module, "qkv", None), nn.Linear):
                module.qkv = SplitQKV(module.qkv)
        return net

    def wrap(self, net: nn.Module, num_labels: int, name: str, source: str) -> TaskModel:
        from engine.models import ModelInfo, TaskModel

        net = self.prepare(net)
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        blocks = getattr(net, "blocks", [])
        num_heads = int(getattr(getattr(blocks[0], "attn", None), "num_heads", 0)) if len(blocks) else 0
        img = getattr(getattr(net, "patch_embed", None), "img_size", None)
        size = int(img[0] if isinstance(img, (tuple, list)) else img or cfg.get("input_size", (3, 224, 224))[-1])
        info = ModelInfo(
            name=name,
            modality="image",
            num_labels=num_labels,
            num_heads=num_heads,
            num_layers=len(blocks),
            head_names=["net.head"],
            image_size=size,
            image_mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
            image_std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
            image_interpolation=str(cfg.get("interpolation", "bicubic")),  # timm's data config
            source=source,
        )
        return TaskModel(net, info, self.name)

    def forward(self, model: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.net(model.preprocess_images(batch["images"]))

    def save_merged(
        self, model: TaskModel, directory: Path, *, labels: list[str], lab_model: str, options: dict[str, Any]
    ) -> list[str]:
        fuse_split_qkv(model.net)
        state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
        save_file(state, str(directory / MERGED_WEIGHTS))
        timm_cfg = {
            "library": "timm",
            "architecture": (getattr(model.net, "pretrained_cfg", None) or {}).get("architecture"),
            "lab_model": lab_model,
            "num_classes": int(model.info.num_labels),
            "label_names": labels,
            "model_options": {k: v for k, v in options.items() if k not in ("pretrained", "init_seed")},
            "image_size": model.info.image_size,
            "mean": list(model.info.image_mean),
            "std": list(model.info.image_std),
        }
        (directory / MERGED_CONFIG).write_text(json.dumps(timm_cfg, indent=2))
        return []

    def merged_card(self) -> list[str]:
        return [
            f"A timm state dict (`{MERGED_WEIGHTS}`, q/k/v fused back into `qkv`) and `{MERGED_CONFIG}`.",
            "",
            "```python",
            "import json, timm",
            "from safetensors.torch import load_file",
            "cfg = json.load(open('<this directory>/config.json'))",
            "net = timm.create_model(cfg['architecture'], pretrained=False, num_classes=cfg['num_classes'],",
            "                        **cfg['model_options'])",
            "net.load_state_dict(load_file('<this directory>/model.safetensors'))",
            "```",
            "",
            "Inputs: images resized to `image_size` and normalised with `mean`/`std`. A PEFT Lab bundled test model "
            "(e.g. tiny-vit) has architecture arguments of its own: load it with "
            "`engine.export.load_merged('<this directory>')`.",
        ]

    def load_merged(
        self, directory: Path, build: Callable[[], TaskModel], read: Callable[[Path], dict[str, torch.Tensor]]
    ) -> TaskModel | None:
        from engine.models import SplitQKV

        cfg_path = directory / MERGED_CONFIG
        if not cfg_path.is_file() or json.loads(cfg_path.read_text()).get("library") != "timm":
            return None
        model = build()
        state = read(directory / MERGED_WEIGHTS)
        for name, module in model.net.named_modules():
            if isinstance(module, SplitQKV):
                d = module.q.out_features
                for suffix in ("weight", "bias"):
                    fused = state.pop(f"{name}.{suffix}", None)
                    if fused is not None:
                        for i, part in enumerate("qkv"):
                            state[f"{name}.{part}.{suffix}"] = fused[i * d : (i + 1) * d]
        model.net.load_state_dict(state, strict=True)
        return model
