"""What the transformers backends (text and image classification) share: role patterns, wrapping, saving."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.backends.base import Backend

if TYPE_CHECKING:
    from engine.models import TaskModel

HF_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
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
)

IMAGE_MODEL_TYPES = {"vit", "deit", "beit", "swin", "swinv2", "convnext", "dinov2", "levit", "mobilevit", "dinat"}


def is_image_config(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return config.model_type in IMAGE_MODEL_TYPES or any(a.endswith("ImageClassification") for a in archs)


def _freeze_report(missing: list[str]) -> list[str]:
    """Module prefixes holding newly initialised weights (the task head, a fresh pooler, ...)."""
    return sorted({k.rsplit(".", 1)[0] for k in missing})


class HFBackend(Backend):
    """A transformers ``PreTrainedModel`` with a classification head."""

    role_patterns = HF_ROLE_PATTERNS
    supports_peft = True

    def wrap(self, net, num_labels, name, source, missing, tokenizer=None, image_size=None, mean=None, std=None,
             interpolation="bilinear"):  # fmt: skip
        from engine.models import ModelInfo, TaskModel

        cfg = net.config
        head = ["net." + p for p in _freeze_report(missing)]
        for attr in ("classifier", "score"):
            if hasattr(net, attr) and f"net.{attr}" not in head:
                head.append(f"net.{attr}")
        info = ModelInfo(
            name=name,
            modality=self.modality,
            num_labels=num_labels,
            num_heads=int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_heads", 0)) or 0),
            num_layers=int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layers", 0)) or 0),
            head_names=head,
            image_size=image_size,
            image_mean=tuple(mean) if mean is not None else (0.5, 0.5, 0.5),
            image_std=tuple(std) if std is not None else (0.5, 0.5, 0.5),
            image_interpolation=interpolation,
            source=str(source),
        )
        return TaskModel(net, info, self.name, tokenizer)

    def save_merged(
        self, model: TaskModel, directory: Path, *, labels: list[str], lab_model: str, options: dict[str, Any]
    ) -> list[str]:
        from transformers import PreTrainedModel

        net = model.net
        assert isinstance(net, PreTrainedModel)  # the transformers backends wrap a transformers model
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
        net.save_pretrained(str(directory))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(directory))
        return []

    def merged_card(self) -> list[str]:
        auto = self.auto_class
        return ["```python", f"from transformers import {auto}", f"model = {auto}.from_pretrained('<this directory>')",
                "```"]  # fmt: skip
