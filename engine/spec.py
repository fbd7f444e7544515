"""RunSpec: the one description of an experiment run.

The same object is the Launch form in the UI, the YAML a user saves, the CLI's input and the ``spec_json`` column of
a run in the database. Each field carries its title (the form's label), a description (the form's help and the CLI's
``--help``), its section of the form and whether it is advanced; ``spec_fields()`` lists them, so the CLI flags
(app/spec_args.py) and the Launch form (app/spec_form.py) are generated from this file and cannot drift from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import UserError

SECTIONS = ("model", "data", "method", "training", "resources")
Schedule = Literal["linear", "cosine", "constant"]
Device = Literal["auto", "cpu", "cuda"]
DataTask = Literal["auto", "classification", "regression", "multiple_choice"]


class SpecError(UserError):
    """A RunSpec that cannot be used; the message names the field and the fix."""


# The sizes of the runs table's columns (db.schema) that hold a spec's names: a RunSpec must fit them.
NAME_MAX_CHARS = 200  # name, experiment
SOURCE_MAX_CHARS = 300  # model, dataset.name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _meta(section: str | None = None, advanced: bool = False) -> dict[str, Any]:
    """The form's layout of a field, kept in its JSON schema: its section (None: the section of its sub-spec) and
    whether it sits in the section's "more options" expander."""
    return {"section": section, "advanced": advanced}


class DatasetSpec(_Strict):
    """The data: which dataset, how much of it, and how it is split (the form's "data" section)."""

    name: str = Field("tweets-sentiment", title="Dataset",
                      description="bundled name (tweets-sentiment, digits, tweets-instruct), a .csv/.jsonl/.parquet/"
                      ".arrow file, a save_to_disk or image-folder directory, or a hub dataset id")  # fmt: skip
    config: str | None = Field(None, title="hub config", json_schema_extra=_meta(advanced=True),
                               description="the dataset's configuration (a GLUE task: cola, sst2, ...)")  # fmt: skip
    split: str = Field("train", title="train split", json_schema_extra=_meta(advanced=True),
                       description="split to train on (slices as in datasets: train[:800])")  # fmt: skip
    eval_split: str | None = Field(None, title="eval split", json_schema_extra=_meta(advanced=True),
                                   description="split to evaluate on (None: hold out eval_fraction of the train "
                                   "split)")  # fmt: skip
    max_train: int | None = Field(2000, ge=1, title="max train examples",
                                  description="cap on training examples (None, or 0 in the form: all)")  # fmt: skip
    max_eval: int | None = Field(500, ge=1, title="max eval examples",
                                 description="cap on evaluation examples (None, or 0 in the form: all)")  # fmt: skip
    max_length: int = Field(64, ge=4, le=4096, title="max sequence length", description="token length for text models")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.9, title="eval fraction", json_schema_extra=_meta(advanced=True),
                                 description="share of the data held out for evaluation")  # fmt: skip
    split_seed: int = Field(0, title="split seed", json_schema_extra=_meta(advanced=True),
                            description="seed of the train/eval split (kept fixed across training seeds)")  # fmt: skip
    text_column: str = Field("text", title="text column", json_schema_extra=_meta(advanced=True),
                             description="column that holds the text (the question of multiple-choice "
                             "data)")  # fmt: skip
    label_column: str = Field("label", title="label column", json_schema_extra=_meta(advanced=True),
                              description="column that holds the label: class ids or names, a number for "
                              "regression, the answer of multiple-choice data")  # fmt: skip
    text_pair_column: str | None = Field(None, title="text pair column", json_schema_extra=_meta(advanced=True),
                                         description="second text of sentence-pair tasks (encoded as the tokenizer's "
                                         "pair)")  # fmt: skip
    image_column: str = Field("image", title="image column", json_schema_extra=_meta(advanced=True),
                              description="column of a table dataset that holds the images")  # fmt: skip
    choices_column: str = Field("choices", title="choices column", json_schema_extra=_meta(advanced=True),
                                description="column of multiple-choice data that holds the choices (or several: "
                                "a,b)")  # fmt: skip
    task: DataTask = Field("auto", title="task", json_schema_extra=_meta(advanced=True),
                           description="auto: regression for decimal labels of a typed source, else classification; "
                           "multiple_choice: question, choices, answer")  # fmt: skip
    metric: str | None = Field(None, title="headline metric", json_schema_extra=_meta(advanced=True),
                               description="the metric a run is judged by (None: eval_accuracy for classification, "
                               "eval_pearson for regression)")  # fmt: skip

    prompt_column: str = Field("prompt", title="prompt column", json_schema_extra=_meta(advanced=True),
                               description="instruction data (causal LMs): the prompt's column")  # fmt: skip
    response_column: str = Field("response", title="response column", json_schema_extra=_meta(advanced=True),
                                 description="instruction data (causal LMs): the response's column")  # fmt: skip

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str | None) -> str | None:
        from engine.metrics import METRICS

        if v is not None and v not in METRICS:
            raise ValueError(f"{v!r} is not a recorded metric: pick one of {', '.join(METRICS)}")
        return v


class MethodSpec(BaseModel):
    """``name`` plus the method's own parameters, validated by the method's config class."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        "lora", title="PEFT methods",
        description="a registered method (python -m app.cli methods); its parameters are method.<key>",
    )  # fmt: skip

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainSpec(_Strict):
    """The optimisation: length, batch, learning rate and its schedule, evaluation and checkpoints."""

    epochs: int = Field(1, ge=1, le=1000, title="epochs", description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, title="max steps (0: by epochs)",
                                  description="stop after this many optimizer steps (overrides epochs)")  # fmt: skip
    batch_size: int = Field(16, ge=1, le=4096, title="batch size", description="examples per optimizer step")
    lr: float = Field(5e-4, gt=0.0, le=1.0, title="learning rate", description="AdamW's peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, title="weight decay", json_schema_extra=_meta(advanced=True),
                                description="AdamW's decoupled weight decay (0 to 1)")  # fmt: skip
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, title="warm-up ratio", json_schema_extra=_meta(advanced=True),
                                description="share of the steps with a rising learning rate")  # fmt: skip
    schedule: Schedule = Field(
        "linear", title="schedule", json_schema_extra=_meta(advanced=True),
        description="the learning rate after warm-up: linear or cosine decay, or constant",
    )  # fmt: skip
    grad_clip: float | None = Field(1.0, gt=0.0, le=1e4, title="gradient clipping (0: off)",
                                    json_schema_extra=_meta(advanced=True),
                                    description="clip the gradient norm at this value (None: no clipping)")  # fmt: skip
    seed: int = Field(0, title="seeds", description="seed of the initialisation and the batches (the form and "
                      "--seeds take several: one run per seed)")  # fmt: skip
    log_every: int = Field(10, ge=1, title="log every (steps)", json_schema_extra=_meta(advanced=True),
                           description="report the training loss every N steps")  # fmt: skip
    evals_per_epoch: int = Field(4, ge=1, le=100, title="evaluations per epoch", json_schema_extra=_meta(advanced=True),
                                 description="evaluate on the held-out split this many times per epoch (or per run, "
                                 "when max steps ends it within its first epoch)")  # fmt: skip
    device: Device = Field("auto", title="device", json_schema_extra=_meta(advanced=True),
                           description="auto: a GPU when the run has one, else the CPU")  # fmt: skip
    num_threads: int | None = Field(None, ge=1, title="CPU threads (0: torch's default)",
                                    json_schema_extra=_meta(advanced=True),
                                    description="torch CPU threads (None: leave torch's default)")  # fmt: skip
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        title="checkpoint every N steps (0: off)",
        json_schema_extra=_meta(advanced=True),
        description="also checkpoint every N optimizer steps (None: by time and at epoch ends only)",
    )
    bf16_weights: bool = Field(False, title="bf16 base weights (GPU)", json_schema_extra=_meta(advanced=True),
                               description="store the frozen base in bfloat16 (needs CUDA)")  # fmt: skip
    gradient_checkpointing: bool = Field(False, title="gradient checkpointing (GPU)",
                                         json_schema_extra=_meta(advanced=True),
                                         description="recompute activations in the backward (needs CUDA)")  # fmt: skip
    checkpoint_every_s: float = Field(
        60.0,
        ge=1.0,
        le=86400.0,
        title="checkpoint every N seconds",
        json_schema_extra=_meta(advanced=True),
        description="checkpoint at least every this many seconds, and at epoch ends",
    )
    # Kept checkpoints (engine/trajectory.py): adapter snapshots along training for checkpoint merging (MWA), apart
    # from the resume checkpoint above.
    keep_checkpoints: int | None = Field(
        None, ge=1, le=1000, title="keep N checkpoints for merging (0: off)", json_schema_extra=_meta(advanced=True),
        description="keep this many adapter checkpoints spread evenly along training, each evaluated, for "
        "checkpoint merging (python -m app.cli merge)",
    )  # fmt: skip
    checkpoint_every: int | None = Field(
        None, ge=1, title="keep a checkpoint every N steps (0: off)", json_schema_extra=_meta(advanced=True),
        description="keep an evaluated adapter checkpoint every N optimizer steps (and at the last step), for "
        "checkpoint merging",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_way_to_keep_checkpoints(self) -> TrainSpec:
        if self.keep_checkpoints and self.checkpoint_every:
            raise ValueError(
                "keep_checkpoints and checkpoint_every both set: keep K spread checkpoints or one every N steps, "
                "not both (set the other to null)"
            )
        return self


class ResourcesSpec(_Strict):
    """What one run asks of the cluster (Ray), and how often it is retried when its worker dies."""

    num_cpus: float = Field(1.0, ge=0.0, le=1024.0, title="CPUs per run", description="CPUs Ray reserves for a run")
    num_gpus: float = Field(0.0, ge=0.0, le=64.0, title="GPUs per run", description="GPUs Ray reserves for a run")
    max_retries: int = Field(
        1,
        ge=0,
        le=10,
        title="retries",
        json_schema_extra=_meta(advanced=True),
        description="resubmit a run whose worker or node died this many times (own errors: never)",
    )


class RunSpec(_Strict):
    name: str | None = Field(None, title="run name", json_schema_extra=_meta("training", advanced=True),
                             description="the run's name in tables (empty: the method's name)")  # fmt: skip
    experiment: str = Field("default", title="experiment", json_schema_extra=_meta("training"),
                            description="a group of runs compared together")  # fmt: skip
    tags: list[str] = Field(default_factory=list, title="tags (comma separated)",
                            json_schema_extra=_meta("training", advanced=True),
                            description="free labels to filter runs by")  # fmt: skip
    model: str = Field("minilm-l6", title="Model", json_schema_extra=_meta("model"),
                       description="bundled alias, hub id, local directory or timm/<name>")  # fmt: skip
    model_options: dict[str, Any] = Field(default_factory=dict, title="model options (YAML mapping)",
                                          json_schema_extra=_meta("model", advanced=True),
                                          description="extra model options, e.g. {pretrained: false}")  # fmt: skip
    trust_remote_code: bool = Field(False, title="trust_remote_code", json_schema_extra=_meta("model", advanced=True),
                                    description="run code shipped with a hub model (off by default)")  # fmt: skip
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, json_schema_extra=_meta("data"))
    method: MethodSpec = Field(default_factory=MethodSpec, json_schema_extra=_meta("method"))
    train: TrainSpec = Field(default_factory=TrainSpec, json_schema_extra=_meta("training"))
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, json_schema_extra=_meta("resources"))

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


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The mapping a RunSpec file (YAML, or JSON for ``.json``) holds, not yet validated, so that the command line
    can lay its flags over it first. Every error is one line that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist: pass the path of a RunSpec YAML (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"spec file {path} is not UTF-8 text: save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as err:
            raise SpecError(f"{path} is not valid JSON: {err}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SpecError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        raise SpecError(f"spec file {path} is empty: write a RunSpec mapping (model, dataset, method; see recipes/)")
    if not isinstance(data, dict):
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise SpecError(
            f"spec file {path} holds a {kind} {type(data).__name__} at the top level: write a RunSpec mapping "
            "(model: ..., dataset: ..., method: ...; see recipes/)"
        )
    return data


def load_spec(path: str | Path) -> RunSpec:
    """A RunSpec file, validated."""
    return parse_spec(read_spec_file(path))


# --- the fields, for the generated command line and form ---------------------------------------------


@dataclass(frozen=True)
class SpecField:
    """One leaf field of a RunSpec: ``path`` is dotted (``train.lr``); ``annotation`` its type as declared."""

    path: str
    annotation: Any
    default: Any
    title: str
    description: str
    section: str
    advanced: bool


def _leaves(model: type[BaseModel], prefix: str, section: str | None) -> list[SpecField]:
    fields: list[SpecField] = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        own_section = str(extra.get("section") or section)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields += _leaves(annotation, f"{prefix}{name}.", own_section)
            continue
        fields.append(
            SpecField(
                path=prefix + name,
                annotation=annotation,
                default=info.get_default(call_default_factory=True),
                title=info.title or name.replace("_", " "),
                description=info.description or "",
                section=own_section,
                advanced=bool(extra.get("advanced")),
            )  # fmt: skip
        )
    return fields


def spec_fields() -> list[SpecField]:
    """Every leaf field of a RunSpec in declaration order (``method.name`` is the method's one declared field; its
    parameters belong to the method's config class)."""
    return _leaves(RunSpec, "", None)


def field_default(path: str) -> Any:
    """RunSpec's default of the field at a dotted path (``train.lr`` -> 5e-4)."""
    for field in spec_fields():
        if field.path == path:
            return field.default
    raise KeyError(f"{path} is not a RunSpec field")
