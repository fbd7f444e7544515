"""StudySpec: a search over RunSpec fields, whose trials are runs.

A study names a base RunSpec (a file, or inline under ``spec:``), a space of RunSpec fields by their dotted path
(``train.lr``, ``method.rank``, ``method.name``, ...), the seeds every configuration is trained with, a search
algorithm and a scheduler::

    name: lr-rank
    base: recipes/minilm-tweets-lora.yaml
    space:
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      method.rank: {choice: [4, 8, 16]}
      method.name: {grid: [lora, neat, lily]}
    seeds: [0, 1]
    search: random
    num_samples: 12
    scheduler: {asha: {metric: eval_accuracy, mode: max, grace_evals: 2, reduction_factor: 3}}
    max_concurrent: 4

Grid axes multiply; sampled axes are drawn ``num_samples`` times; each configuration is trained once per seed (so
the seeds of one configuration can be compared pairwise). Grid and random studies are expanded here, up front and
deterministically (``sample_seed``), so every trial is a run before the first one starts; ``optuna`` studies are
proposed one trial at a time by Optuna's TPE sampler (through Ray Tune), with the seed one more choice.

Nothing here imports Ray: ``jobs.studies`` turns a StudySpec into a Ray Tune search.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import UserError
from engine.spec import RunSpec, SpecError, load_spec, parse_spec

SAMPLED = ("uniform", "loguniform", "randint")  # drawn from a range
LISTED = ("choice", "grid")  # taken from a list: ``grid`` multiplies, ``choice`` is drawn (or enumerated by grid)
DOMAINS = SAMPLED + LISTED


class StudyError(UserError):
    """A study that cannot run; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(_Strict):
    """One axis of the space: exactly one of ``uniform``/``loguniform``/``randint`` ([low, high], both inclusive)
    or ``choice``/``grid`` (a list of values)."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        given = [k for k in DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAINS)} (got {', '.join(given) or 'none'})")
        low_high = getattr(self, given[0]) if given[0] in SAMPLED else None
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: low {low_high[0]} must be below high {low_high[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: both bounds must be positive")
        values = getattr(self, given[0]) if given[0] in LISTED else None
        if values is not None and not values:
            raise ValueError(f"{given[0]}: give at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAINS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def sample(self, rng: random.Random) -> Any:
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if self.loguniform is not None:
            low, high = self.loguniform
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.randint is not None:
            return rng.randint(*self.randint)
        return rng.choice(self.choice or self.grid or [])

    def probes(self) -> list[Any]:
        """The values that stand for this axis when checking the space: every listed value, or both bounds."""
        return list(self.args)


class AshaSpec(_Strict):
    metric: str | None = Field(None, description="the evaluation metric ranked at each rung (default: the study's)")
    mode: Literal["max", "min"] | None = None
    grace_evals: int = Field(1, ge=1, description="evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="keep the best 1/reduction_factor at each rung")


class SchedulerSpec(_Strict):
    asha: AshaSpec | None = None
    fifo: dict[str, Any] | None = None


class StudySpec(_Strict):
    name: str = Field("study", min_length=1, max_length=200)
    base: str | None = Field(None, description="path of the base RunSpec YAML (or give it inline under spec:)")
    spec: dict[str, Any] | None = Field(None, description="the base RunSpec, inline")
    space: dict[str, Domain] = Field(default_factory=dict, description="RunSpec fields by dotted path -> domain")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="every configuration's seeds")
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, le=10_000, description="random/optuna: configurations drawn")
    metric: str = Field("eval_accuracy", description="what 'best' means (an evaluation metric)")
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec | Literal["fifo", "asha"] = "fifo"
    max_concurrent: int = Field(4, ge=1, le=1024, description="trials running at once")
    sample_seed: int = Field(0, description="seed of the random search's draws")

    @property
    def asha(self) -> AshaSpec | None:
        if self.scheduler == "asha":
            return AshaSpec()
        return self.scheduler.asha if isinstance(self.scheduler, SchedulerSpec) else None

    def base_spec(self) -> RunSpec:
        if self.spec is not None:
            return parse_spec(self.spec)
        assert self.base is not None  # checked by parse_study
        return load_spec(self.base)


# --- the space applied to a RunSpec ------------------------------------------------------------------


def apply(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the RunSpec dict ``base`` with each dotted path set to its value."""
    out = yaml.safe_load(yaml.safe_dump(base))  # a deep copy of plain data
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if "method.name" in params and out["method"].get("name") != base["method"].get("name"):
        # Another method: the base method's fields carry over where the new method has them (a shared rank,
        # target roles), the searched ones always; the rest belonged to the old method.
        from engine.methods import get_method  # late import: the registry imports torch

        try:
            fields = set(get_method(out["method"]["name"]).config_cls.model_fields)
        except ValueError:
            fields = set()  # an unknown name: parse_spec names it
        searched = {p.split(".", 1)[1] for p in params if p.startswith("method.")}
        out["method"] = {k: v for k, v in out["method"].items() if k in fields | searched | {"name"}}
    return out


def _check_path(path: str) -> None:
    """Refuse a dotted path that names no RunSpec field (``method.*`` is checked by the method's config)."""
    parts = path.split(".")
    if parts[0] == "method":
        if len(parts) != 2:
            raise StudyError(f"space: {path!r} is not a field: method fields are method.<name> (e.g. method.rank)")
        return
    model: type[BaseModel] = RunSpec
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            known = ", ".join(model.model_fields)
            where = ".".join(parts[:i]) or "a run spec"
            raise StudyError(f"space: {path!r} is not a field: {where} has {known}")
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise StudyError(f"space: {path!r} is not a field: {'.'.join(parts[: i + 1])} has no sub-fields")
            model = annotation


def trial_spec(base: dict[str, Any], params: dict[str, Any]) -> RunSpec:
    """The RunSpec of one trial, validated; a bad value names the searched fields."""
    try:
        return parse_spec(apply(base, params))
    except SpecError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise StudyError(f"space: the trial {shown} is not a valid run: {err}") from None


def _probe(study: StudySpec, base: dict[str, Any]) -> None:
    """Check the space without expanding it: every value of each axis (both bounds of a range), alone and with
    each searched method name, makes a valid RunSpec."""
    names = study.space["method.name"].probes() if "method.name" in study.space else [None]
    for path, domain in study.space.items():
        for name in names:
            for value in domain.probes():
                params = {path: value} if name is None or path == "method.name" else {"method.name": name, path: value}
                trial_spec(base, params | {"train.seed": study.seeds[0]})


# --- trials ------------------------------------------------------------------------------------------


def expand(study: StudySpec) -> list[dict[str, Any]]:
    """Every trial of a grid or random study, as the searched fields' values (``train.seed`` included), in order:
    for each drawn configuration, for each grid point, each seed. Deterministic for a given ``sample_seed``."""
    if study.search == "optuna":
        raise StudyError("search: optuna proposes its trials as it goes: they cannot be listed up front")
    grid_kinds = ("grid", "choice") if study.search == "grid" else ("grid",)
    grid_axes = {p: d.args for p, d in study.space.items() if d.kind in grid_kinds}
    sampled = {p: d for p, d in study.space.items() if p not in grid_axes}
    rng = random.Random(study.sample_seed)
    draws = 1 if study.search == "grid" else study.num_samples
    trials: list[dict[str, Any]] = []
    for _ in range(draws):
        for point in itertools.product(*grid_axes.values()):
            config = dict(zip(grid_axes, point)) | {p: d.sample(rng) for p, d in sampled.items()}
            trials.extend(config | {"train.seed": seed} for seed in study.seeds)
    return trials


def count_trials(study: StudySpec) -> int:
    """How many trials the study runs (without listing them)."""
    if study.search == "optuna":
        return study.num_samples
    grid_kinds = ("grid", "choice") if study.search == "grid" else ("grid",)
    points = math.prod(len(d.args) for d in study.space.values() if d.kind in grid_kinds)
    return points * len(study.seeds) * (1 if study.search == "grid" else study.num_samples)


MAX_TRIALS = 10_000


def parse_study(data: dict[str, Any] | StudySpec, *, root: Path | None = None) -> StudySpec:
    """Validate a study (from YAML or the form): the fields, the base RunSpec, every path of the space and the
    trials it makes. The base is inlined (``spec``) so the stored study does not depend on a file. ``root`` is
    where a relative ``base`` path is looked up (the study file's folder, then the working directory)."""
    if isinstance(data, StudySpec):
        study = data
    else:
        if not isinstance(data, dict):
            raise StudyError(f"invalid study: expected a mapping at the top level, got {type(data).__name__}")
        try:
            study = StudySpec.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise StudyError(f"invalid study: {loc}: {first['msg'].removeprefix('Value error, ')}") from None
    if (study.base is None) == (study.spec is None):
        raise StudyError("invalid study: give the base run as base: <RunSpec file> or inline under spec:, not both")
    if study.base is not None and root is not None and not Path(study.base).is_absolute():
        near = root / study.base
        if near.is_file():
            study = study.model_copy(update={"base": str(near)})
    base = study.base_spec().model_dump(mode="json")
    for path in study.space:
        _check_path(path)
    if "train.seed" in study.space:
        raise StudyError("space: train.seed is set by seeds: list the seeds there (seeds: [0, 1, 2])")
    if study.search == "grid":
        sampled = [p for p, d in study.space.items() if d.kind in SAMPLED]
        if sampled:
            raise StudyError(f"space: {sampled[0]} is a range, which a grid cannot enumerate: use search: random "
                             "or optuna, or list its values with grid: [...]")  # fmt: skip
    _check_metric("metric", study.metric, study.mode)
    if study.asha is not None and study.asha.metric is not None:
        _check_metric("scheduler.asha.metric", study.asha.metric, study.asha.mode or study.mode)
    if study.search == "optuna" and not study.space:
        raise StudyError("search: optuna needs a space to search: add fields under space:, or use search: grid")
    n = count_trials(study)
    if n > MAX_TRIALS:
        raise StudyError(f"the study has {n} trials, more than {MAX_TRIALS}: narrow the space or num_samples")
    if study.search == "optuna":
        _probe(study, base)
    else:
        for params in expand(study):
            trial_spec(base, params)
    return study.model_copy(update={"spec": base, "base": study.base})


def _check_metric(field: str, metric: str, mode: str) -> None:
    """A study ranks its trials by a recorded evaluation metric (``engine.metrics``), in the metric's direction."""
    from engine.metrics import DIRECTION

    if metric not in DIRECTION:
        raise StudyError(f"{field}: {metric!r} is not a recorded metric: pick one of {', '.join(DIRECTION)}")
    if DIRECTION[metric] != mode:
        better = "lower" if DIRECTION[metric] == "min" else "higher"
        raise StudyError(f"{field}: {metric} is better {better}, but mode is {mode}: set mode: {DIRECTION[metric]}")


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist: pass the path of a study YAML (see recipes/studies/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise StudyError(f"{path} is not valid YAML text: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(data, dict):
        raise StudyError(f"study file {path} must hold a mapping (name, base, space, ...; see recipes/studies/)")
    return parse_study(data, root=path.parent)
