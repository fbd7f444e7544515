"""Image classification with transformers (``AutoModelForImageClassification``): ViT, DeiT, BEiT, Swin, ..."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import register_backend
from engine.backends.hf_common import HFBackend, is_image_config

if TYPE_CHECKING:
    from engine.models import TaskModel


# PIL's resampling filters by number, as HF image processors store them (``resample``)
PIL_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def processor_size(size: Any) -> int | None:
    """The square input size of an HF image processor's ``size`` ({height, width}, {shortest_edge} or an int)."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        value = size.get("height") or size.get("shortest_edge")
        return int(value) if value else None
    return None


@register_backend
class HFImageBackend(HFBackend):
    name = "hf-image"
    modality = "image"
    peft_task_type = None
    auto_class = "AutoModelForImageClassification"

    def claims(self, name: str) -> bool:
        return name == "tiny-hf-vit"

    def accepts_config(self, config: Any) -> bool:
        return is_image_config(config)

    def load(self, name: str, num_labels: int, options: dict[str, Any], trust_remote_code: bool) -> TaskModel:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if name == "tiny-hf-vit":
            from transformers import ViTConfig, ViTForImageClassification

            vit_cfg = ViTConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=8,
            )  # fmt: skip
            vit_cfg.num_labels = num_labels
            torch.manual_seed(options.get("init_seed", 0))
            return self.wrap(ViTForImageClassification(vit_cfg), num_labels, name, "random init",
                             ["classifier.weight"], image_size=32)  # fmt: skip
        net, loading = AutoModelForImageClassification.from_pretrained(
            name,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            weights_only=True,  # a pickled checkpoint is read without running code
        )
        size, mean, std, interpolation = getattr(net.config, "image_size", 224), None, None, "bilinear"
        try:
            proc = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
            mean, std = proc.image_mean, proc.image_std
            size = processor_size(getattr(proc, "size", None)) or size
            interpolation = PIL_INTERPOLATIONS.get(int(getattr(proc, "resample", 2) or 2), "bilinear")
        except (OSError, ValueError, TypeError):
            pass  # no processor config saved: keep the 0.5/0.5 normalisation ViT uses
        missing = loading["missing_keys"] + [k for k, *_ in loading.get("mismatched_keys", [])]
        return self.wrap(net, num_labels, name, name, missing, image_size=size, mean=mean, std=std,
                         interpolation=interpolation)  # fmt: skip

    def forward(self, model: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.net(pixel_values=model.preprocess_images(batch["images"])).logits

    def save_merged(
        self, model: TaskModel, directory: Path, *, labels: list[str], lab_model: str, options: dict[str, Any]
    ) -> list[str]:
        from transformers import ViTImageProcessor

        notes = super().save_merged(model, directory, labels=labels, lab_model=lab_model, options=options)
        size = model.info.image_size or 224
        ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=list(model.info.image_mean),
            image_std=list(model.info.image_std),
        ).save_pretrained(str(directory))  # fmt: skip
        return notes + ["The image processor resizes bilinearly and normalises as PEFT Lab does."]
