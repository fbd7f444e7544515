"""Text classification with transformers (``AutoModelForSequenceClassification``): BERT, RoBERTa, MiniLM, ..."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import register_backend
from engine.backends.hf_common import HFBackend, is_image_config

if TYPE_CHECKING:
    from engine.models import TaskModel


@register_backend
class HFTextBackend(HFBackend):
    name = "hf-text"
    modality = "text"
    peft_task_type = "SEQ_CLS"
    auto_class = "AutoModelForSequenceClassification"

    def claims(self, name: str) -> bool:
        return name in ("minilm-l6", "tiny-bert")

    def accepts_config(self, config: Any) -> bool:
        from engine.backends.hf_causal import is_causal_config  # a causal LM is the hf-causal-lm backend's

        return not is_image_config(config) and not is_causal_config(config)

    def load(self, name: str, num_labels: int, options: dict[str, Any], trust_remote_code: bool) -> TaskModel:
        from transformers import AutoTokenizer

        from engine.models import minilm_path

        if name == "minilm-l6":
            return self._pretrained(minilm_path(), num_labels, False, name)
        if name == "tiny-bert":
            from transformers import BertConfig, BertForSequenceClassification

            cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
            cfg.num_labels = num_labels  # set after: transformers 5's typed __init__ does not declare num_labels
            torch.manual_seed(options.get("init_seed", 0))
            net = BertForSequenceClassification(cfg)
            tok = AutoTokenizer.from_pretrained(minilm_path())
            return self.wrap(net, num_labels, name, "random init", ["classifier.weight"], tokenizer=tok)
        return self._pretrained(name, num_labels, trust_remote_code, name)

    def _pretrained(self, path_or_id: str, num_labels: int, trust_remote_code: bool, name: str) -> TaskModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # weights_only: a pickled checkpoint (pytorch_model.bin) is read without running code, as safetensors are.
        net, loading = AutoModelForSequenceClassification.from_pretrained(
            path_or_id, num_labels=num_labels, trust_remote_code=trust_remote_code, output_loading_info=True,
            weights_only=True,
        )  # fmt: skip
        tok = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        return self.wrap(net, num_labels, name, path_or_id, loading["missing_keys"], tokenizer=tok)

    def forward(self, model: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pair = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}  # sentence pairs
        return model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **pair).logits
