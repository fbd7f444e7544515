"""The ``Backend`` interface and its registry (after timm's ``register_model``/``get_model``)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.models import TaskModel


class Backend(ABC):
    """One model library behind the ``TaskModel`` interface. Subclass, set the attributes, implement the abstract
    methods (loading, forward), register; merged save/load are optional.

    ``name`` is what ``TaskModel.kind`` holds and what export metadata stores, so it never changes.
    """

    name: str = ""
    modality: str = ""  # "text" | "image"
    # (regex on a module's dotted name, role); the first group is the block index, patterns end in "$"
    role_patterns: tuple[tuple[str, str], ...] = ()
    peft_task_type: str | None = None  # PEFT's LoraConfig.task_type
    supports_peft: bool = False  # the PEFT LoRA layout (a transformers model PEFT can wrap)
    auto_class: str | None = None  # the transformers Auto class that loads a merged export

    def __init__(self) -> None:
        self._compiled = [(re.compile(p), role) for p, role in self.role_patterns]

    # -- loading ---------------------------------------------------------------------------------
    def claims(self, name: str) -> bool:
        """Whether this backend loads the model name itself (a bundled alias, a prefix such as ``timm/``)."""
        return False

    def accepts_config(self, config: Any) -> bool:
        """Whether a transformers config (a hub id or a local directory) is this backend's."""
        return False

    @abstractmethod
    def load(self, name: str, num_labels: int, options: dict[str, Any], trust_remote_code: bool) -> TaskModel:
        """The model ``name`` with a fresh ``num_labels`` head, as a ``TaskModel``."""

    # -- running ---------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, model: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of a batch."""

    def match_role(self, module_name: str) -> tuple[str, int] | None:
        """(role, block) of an adaptable linear from its dotted name, None when it is not one."""
        for pattern, role in self._compiled:
            m = pattern.search(module_name)
            if m:
                return role, int(m.group(1))
        return None

    def prepare(self, net: nn.Module) -> nn.Module:
        """Make the net's adaptable layers plain linears (e.g. split a fused qkv); identity by default."""
        return net

    # -- merged export ---------------------------------------------------------------------------
    def save_merged(
        self, model: TaskModel, directory: Path, *, labels: list[str], lab_model: str, options: dict[str, Any]
    ) -> list[str]:
        """Save a merged (plain) model into ``directory``; returns notes for the model card. A backend without a
        merged layout keeps this refusal (merged export is optional)."""
        raise UserError(f"model backend {self.name} has no merged format: export the native or PEFT format instead")

    # -- PEFT export ------------------------------------------------------------------------------
    def peft_layout(self, factors: list[Any]) -> tuple[list[Any], dict[str, Any]]:
        """PEFT LoRA factors (``engine.export.peft_format.LayerFactors``) in the library's own module layout (e.g. a
        split projection fused back), and extra ``LoraConfig`` fields; unchanged by default."""
        return factors, {}

    def save_peft_base(self, base: TaskModel, directory: Path) -> str | None:
        """Write the base model into a PEFT export when PEFT could not find it otherwise (a bundled random-init
        model); returns its path relative to ``directory``, None when nothing is written (the default)."""
        return None

    def merged_card(self) -> list[str]:
        """Model-card lines that show how to load a merged export."""
        return []

    def load_merged(
        self, directory: Path, build: Callable[[], TaskModel], read: Callable[[Path], dict[str, torch.Tensor]]
    ) -> TaskModel | None:
        """A merged export in this backend's own layout (``build`` makes the fresh model), None if not one."""
        return None


_BACKENDS: dict[str, Backend] = {}

B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (a duplicate name is refused)."""
    if not cls.name:
        raise ValueError(f"backend {cls.__name__} has no name")
    if cls.name in _BACKENDS:
        raise ValueError(f"a backend named {cls.name!r} is already registered ({type(_BACKENDS[cls.name]).__name__})")
    _BACKENDS[cls.name] = cls()
    return cls


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise KeyError(f"no model backend {name!r}; registered: {', '.join(_BACKENDS)}") from None


def list_backends() -> list[str]:
    return list(_BACKENDS)
