"""Baselines: full fine-tuning (every weight trains) and the linear probe (only the task head trains)."""

from __future__ import annotations

from engine.methods.base import Method, MethodConfig, register_method


class FullConfig(MethodConfig):
    pass


@register_method
class FullFineTuning(Method):
    """Every parameter trains. ``adapter_state_dict`` is the whole model's state."""

    name = "full"
    config_cls = FullConfig
    prefix = ""
    summary = "Full fine-tuning: every weight trains"
    paper = "baseline"

    def is_adapter_key(self, key: str) -> bool:
        return True

    def inject(self, model) -> None:
        pass

    def adapter_param_count(self, model) -> int:
        head = set(model.head_parameter_names())
        return sum(p.numel() for n, p in model.named_parameters() if n not in head)


@register_method
class LinearProbe(Method):
    """The backbone is frozen; only the task head trains."""

    name = "linear_probe"
    config_cls = FullConfig
    prefix = ""
    summary = "Linear probe: only the classification head trains"
    paper = "baseline"

    def __init__(self, config: FullConfig | None = None):
        super().__init__(config)
        self.probe: set[str] = set()  # a model without a task head (a causal LM): its output projection trains

    def is_adapter_key(self, key: str) -> bool:
        return key in self.probe

    def inject(self, model) -> None:
        if not model.info.head_names:
            self.probe = set(model.info.extra.get("probe", []))

    def adapter_param_count(self, model) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if self.is_adapter_key(n))
