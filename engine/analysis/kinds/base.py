"""The contract of an analysis kind, and the registry every kind adds itself to.

An analysis kind is one class with ``@register_analysis``, in its own module of this package (imported by
``engine.analysis.kinds``), that declares:

* ``kind``: the name (``analyze --kind``, artifact kind ``analysis:<kind>``);
* ``params_cls``: a pydantic ``AnalysisParams`` subclass, its settings; the CLI's flags are generated from it;
* ``needs``: the run artifact kinds it reads; their sha256 (as recorded) decide reuse, and their latest paths are
  handed to ``compute`` in ``AnalysisInputs.artifacts``;
* ``stem``/``suffixes``: the files it writes under the run's ``analysis/`` folder, the JSON one (written last,
  the completion marker) last;
* ``compute``: writes the files, with the reuse record stored in the JSON file (where ``record_holder`` says);
* ``load`` and ``headline``: the stored result, and the scalars a table row or the CLI shows.

The runner (``jobs.analysis``: cache lookup, Ray jobs, recording artifacts) knows no kind by name.
"""

from __future__ import annotations

import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from engine.errors import UserError

Progress = Callable[[float], None]


class AnalysisError(UserError):
    """An analysis that cannot be done as asked; the message names the argument or field and the fix."""


class AnalysisParams(BaseModel):
    """Base of every kind's settings: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")

    def key(self) -> dict[str, Any]:
        """The parameters that decide the result (what reuse compares and the artifact records)."""
        return self.model_dump(mode="json")


@dataclass
class AnalysisInputs:
    """What the runner hands to ``compute``: the run row, its adapter directory, the paths of ``needs``."""

    run: dict[str, Any]
    adapter_dir: Path
    artifacts: dict[str, Path | None] = field(default_factory=dict)


class Analysis(ABC):
    """One analysis kind; see the module docstring. Subclasses set the class attributes and ``compute``."""

    kind: ClassVar[str]
    params_cls: ClassVar[type[AnalysisParams]] = AnalysisParams
    needs: ClassVar[tuple[str, ...]] = ("adapter", "adapter_config")
    suffixes: ClassVar[tuple[str, ...]] = (".npz", ".json")
    record_holder: ClassVar[str | None] = None  # key of the JSON object holding the reuse record (None: top level)
    order: ClassVar[int] = 100  # where the kind comes in listings (``--kind`` choices, flags), then by name

    def stem(self, params: AnalysisParams) -> str:
        return self.kind

    def files(self, folder: Path, params: AnalysisParams) -> list[Path]:
        """The files written under ``folder``, the JSON one last."""
        return [folder / f"{self.stem(params)}{suffix}" for suffix in self.suffixes]

    def check(self, inputs: AnalysisInputs) -> None:  # noqa: B027 - an optional hook: no check by default
        """Raise ``AnalysisError`` when the run lacks what this kind needs (before any lookup or computation)."""

    @abstractmethod
    def compute(
        self, inputs: AnalysisInputs, params: Any, record: dict[str, Any], json_path: Path, progress: Progress
    ) -> None:
        """Compute and write the files of ``files``; ``record`` goes into the JSON file (see ``stored_record``)."""

    def stored_record(self, json_path: Path) -> dict[str, Any] | None:
        """The reuse record (params, inputs) a stored JSON file was computed with, or None."""
        try:
            data = json.loads(json_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        holder = data if self.record_holder is None else data.get(self.record_holder)
        return (holder or {}).get("analysis") if isinstance(holder or {}, dict) else None

    def load(self, json_path: Path) -> Any:
        """The stored result."""
        return json.loads(json_path.read_text())

    def headline(self, json_path: Path) -> dict[str, Any]:
        """The scalars of a stored result that a table row or the CLI shows."""
        return {}


_REGISTRY: dict[str, type[Analysis]] = {}


def register_analysis(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make ``cls`` available to ``compute_analysis``, Ray jobs and ``analyze --kind``."""
    if not issubclass(cls.params_cls, AnalysisParams):
        raise TypeError(f"analysis {cls.kind!r}: params_cls must subclass AnalysisParams")
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"analysis kind {cls.kind!r} is registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def analysis_kinds() -> list[str]:
    return sorted(_REGISTRY, key=lambda kind: (_REGISTRY[kind].order, kind))


def get_analysis(kind: str) -> Analysis:
    if kind not in _REGISTRY:
        raise AnalysisError(f"kind {kind!r} is not an analysis: choose from {', '.join(analysis_kinds())}")
    return _REGISTRY[kind]()


# --- command-line flags generated from the params classes ------------------------------------------

RESERVED_FLAGS = {"kind", "run_id", "json", "force", "params", "help"}


@dataclass
class ParamFlag:
    """One ``analyze`` option: ``--<field>`` (``--<kind>-<field>`` when the name is taken) for ``kinds``."""

    flag: str
    dest: str
    field: str
    kinds: list[str]
    options: dict[str, Any]


def _flag_options(kind: str, name: str, info: Any) -> dict[str, Any]:
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is not typing.Literal and len(args) == 1 and type(None) in typing.get_args(ann):
        ann = args[0]  # X | None
    default = info.get_default(call_default_factory=True)
    help_ = f"{kind}: {info.description or name}" + (f" (default {default})" if default is not None else "")
    options: dict[str, Any] = {"default": None, "help": help_.replace("%", "%%"), "metavar": name.upper()}
    if typing.get_origin(ann) is typing.Literal:
        choices = list(typing.get_args(ann))
        options |= {"choices": choices, "type": type(choices[0]), "metavar": None}
    elif ann is bool:
        options |= {"action": "store_true_false", "metavar": None}  # the caller maps it to BooleanOptionalAction
    elif ann in (int, float, str):
        options["type"] = ann
    else:
        options["type"] = str
    return options


def param_flags() -> list[ParamFlag]:
    """The ``analyze`` options of every registered kind, one per field of its params class."""
    flags: dict[str, ParamFlag] = {}
    for kind in analysis_kinds():
        for name, info in _REGISTRY[kind].params_cls.model_fields.items():
            base = f"{kind}_{name}" if name in RESERVED_FLAGS else name
            flag = "--" + base.replace("_", "-")
            if flag in flags:
                flags[flag].kinds.append(kind)
            else:
                flags[flag] = ParamFlag(flag, "param_" + base, name, [kind], _flag_options(kind, name, info))
    return list(flags.values())
