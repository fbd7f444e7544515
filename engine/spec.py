"""RunSpec: the one description of an experiment run.

The same object is the Launch form in the UI, the YAML a user saves, the CLI's
input and the ``spec_json`` column of a run in the database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import UserError


class SpecError(UserError):
    """A RunSpec that cannot be used; the message names the field and the fix."""


# The sizes of the runs table's columns (db.schema) that hold a spec's names: a RunSpec must fit them.
NAME_MAX_CHARS = 200  # name, experiment
SOURCE_MAX_CHARS = 300  # model, dataset.name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    name: str = Field("tweets-sentiment", description="bundled name (tweets-sentiment, digits) or a .csv/.jsonl path")
    max_train: int | None = Field(2000, ge=1, description="cap on training examples (None: all)")
    max_eval: int | None = Field(500, ge=1, description="cap on evaluation examples (None: all)")
    max_length: int = Field(64, ge=4, le=4096, description="token length for text models")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.9, description="share of the data held out for evaluation")
    split_seed: int = Field(0, description="seed of the train/eval split (kept fixed across training seeds)")
    text_column: str = "text"
    label_column: str = "label"


class MethodSpec(BaseModel):
    """``name`` plus the method's own parameters, validated by the method's config class."""

    model_config = ConfigDict(extra="allow")
    name: str = "lora"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainSpec(_Strict):
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(5e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW's decoupled weight decay (0 to 1)")
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    schedule: str = Field("linear", pattern="^(linear|cosine|constant)$")
    grad_clip: float | None = Field(1.0, gt=0.0, le=1e4, description="clip the gradient norm (None: no clipping)")
    seed: int = 0
    log_every: int = Field(10, ge=1, description="report the training loss every N steps")
    evals_per_epoch: int = Field(1, ge=1, le=100)
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: leave torch's default)")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint every N optimizer steps (None: by time and at epoch ends only)"
    )
    checkpoint_every_s: float = Field(
        60.0, ge=1.0, le=86400.0, description="checkpoint at least every this many seconds, and at epoch ends"
    )


class ResourcesSpec(_Strict):
    num_cpus: float = Field(1.0, ge=0.0, le=1024.0)
    num_gpus: float = Field(0.0, ge=0.0, le=64.0)
    max_retries: int = Field(
        1, ge=0, le=10, description="resubmit a run whose worker or node died this many times (own errors: never)"
    )


class RunSpec(_Strict):
    name: str | None = None
    experiment: str = "default"
    tags: list[str] = Field(default_factory=list)
    model: str = Field("minilm-l6", description="bundled alias, hub id, local directory or timm/<name>")
    model_options: dict[str, Any] = Field(default_factory=dict, description="extra model options, e.g. pretrained")
    trust_remote_code: bool = False
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must name a bundled alias, a hub id, a local directory or timm/<name>")
        return v.strip()

    @model_validator(mode="after")
    def _fits_the_database(self) -> RunSpec:
        """Refuse values the runs table cannot hold (db.schema's column sizes), here with the field's name, rather
        than as a database error when the run is recorded: PostgreSQL refuses a longer string or a seed past 32 bits
        (SQLite would have kept them)."""
        for field, value, limit in (
            ("name", self.name or "", NAME_MAX_CHARS),
            ("experiment", self.experiment, NAME_MAX_CHARS),
            ("model", self.model, SOURCE_MAX_CHARS),
            ("dataset.name", self.dataset.name, SOURCE_MAX_CHARS),
        ):
            if len(value) > limit:
                raise ValueError(f"{field} has {len(value)} characters, at most {limit} fit: shorten it")
        if not -(2**31) <= self.train.seed < 2**31:
            raise ValueError(f"train.seed {self.train.seed} does not fit 32 bits: use one from 0 to {2**31 - 1}")
        return self

    @model_validator(mode="after")
    def _method_params_valid(self) -> RunSpec:
        from engine.methods import method_config  # late import: the registry imports torch

        method_config(self.method.name, self.method.params)
        return self

    def method_config(self):
        from engine.methods import method_config

        return method_config(self.method.name, self.method.params)

    def with_seed(self, seed: int) -> RunSpec:
        data = self.model_dump()
        data["train"]["seed"] = seed
        return RunSpec.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid run spec: " + "; ".join(lines)


def parse_spec(data: dict[str, Any] | RunSpec) -> RunSpec:
    """Validate a dict (from YAML, JSON or the form) into a RunSpec, raising SpecError with field names."""
    if isinstance(data, RunSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError(f"invalid run spec: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err)) from None


def load_spec(path: str | Path) -> RunSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist: pass the path of a RunSpec YAML (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"spec file {path} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        raise SpecError(f"spec file {path} is empty: write a RunSpec mapping (model, dataset, method; see recipes/)")
    if not isinstance(data, dict):
        raise SpecError(
            f"spec file {path} holds a YAML {type(data).__name__} at the top level: write a RunSpec mapping "
            "(model: ..., dataset: ..., method: ...; see recipes/)"
        )
    return parse_spec(data)
