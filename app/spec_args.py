"""The flags of ``python -m app.cli run`` and ``submit``, generated from RunSpec (LitGPT style, with jsonargparse).

    python -m app.cli run --config recipes/minilm-tweets-lora.yaml --train.lr 3e-4 --dataset.max_train 64
    python -m app.cli run SPEC.yaml --method.name lora --method.rank 8 --seeds 0 1 2

Every leaf field of RunSpec (``engine.spec.spec_fields``) is a dotted flag with the field's type, so a new field is a
new flag without editing this file. A method's own parameters differ per method, so ``--method.KEY VALUE`` is taken
for any KEY (the value read as YAML: ``8``, ``0.1``, ``[q, v]``, ``true``) and checked by the method's config class,
which also takes PEFT's names (``r``, ``lora_alpha``, ``lora_dropout``). Flags are laid over the spec file
(``--config FILE`` or the positional ``SPEC``) whatever their order, then the whole is validated as one RunSpec; a bad
value is one line that names the flag.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from engine.errors import UserError
from engine.spec import RunSpec, SpecError, SpecField, field_default, parse_spec, read_spec_file, spec_fields

SPEC_COMMANDS = {
    "run": "train a RunSpec in this process (no Ray)",
    "submit": "submit a RunSpec to Ray (one run per seed)",
}
METHOD_FLAG = "--method."


class SpecArgsError(UserError):
    """A flag of ``run`` or ``submit`` that cannot be used; the message names the flag."""


def build_spec_parser(command: str) -> ArgumentParser:
    """The parser of ``run`` or ``submit``: the spec file, the seeds and one flag per RunSpec leaf field."""
    parser = ArgumentParser(
        prog=f"python -m app.cli {command}", description=SPEC_COMMANDS[command], exit_on_error=False,
        epilog="--method.KEY VALUE: any parameter of the chosen method (python -m app.cli methods), e.g. "
        "--method.rank 8 --method.alpha 16; PEFT's names r, lora_alpha, lora_dropout are accepted too",
    )  # fmt: skip
    parser.add_argument("spec", nargs="?", help="a RunSpec YAML or JSON file (the same as --config)")
    parser.add_argument("--config", help="a RunSpec YAML or JSON file (see recipes/); flags override its fields")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed (default: train.seed)")
    if command == "run":
        parser.add_argument("--json", action="store_true", help="print one JSON object per run on the last line")
    for field in spec_fields():
        parser.add_argument(f"--{field.path}", type=field.annotation, help=f"{field.description} ({_shown(field)})")
    return parser


def _shown(field: SpecField) -> str:
    return f"default: {'null' if field.default is None else field.default}; {expected(field)}"


def expected(field: SpecField) -> str:
    """What a flag takes, in words, read from the field's type."""
    annotation = field.annotation
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(annotation)))
    elif annotation is bool:
        text = "true or false"
    elif annotation is int:
        text = "an integer"
    elif annotation is float:
        text = "a number"
    elif origin is list:
        text = "a list, e.g. [a, b]"
    elif origin is dict:
        text = "a mapping, e.g. {pretrained: false}"
    else:
        text = "text"
    return text + (" or null" if optional else "")


def _method_params(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--method.KEY VALUE`` (and ``--method.KEY=VALUE``) off argv, ``--method.name`` excepted."""
    params: dict[str, Any] = {}
    rest: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith(METHOD_FLAG) or token.split("=", 1)[0] == "--method.name":
            rest.append(token)
            continue
        key, has_value, value = token[len(METHOD_FLAG) :].partition("=")
        if not has_value:
            value = next(tokens, None)  # type: ignore[arg-type]
            if value is None or value.startswith("--"):
                raise SpecArgsError(f"{token} needs a value, e.g. {token} 8")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SpecArgsError(f"{token.split('=', 1)[0]}: write a method parameter as --method.KEY VALUE")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            params[key] = value  # plain text; the method's config says whether it fits
    return params, rest


def _drop_other_names(method: dict[str, Any], flags: dict[str, Any]) -> None:
    """A flag given by PEFT's name (``--method.r``) replaces the file's setting under ours (``rank``), and the other
    way round, instead of the two clashing."""
    from engine.methods.base import PEFT_ALIASES

    for alias, name in PEFT_ALIASES.items():
        if alias in flags and name not in flags:
            method.pop(name, None)
        if name in flags and alias not in flags:
            method.pop(alias, None)


def _given(argv: list[str], fields: list[SpecField]) -> list[SpecField]:
    """The fields whose flag is on the command line (a flag set to null counts, so the value must be read)."""
    flags = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return [f for f in fields if f"--{f.path}" in flags]


def _flag_value(argv: list[str], flag: str) -> str:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return ""


def _one_line(err: Exception, command: str, argv: list[str]) -> str:
    """jsonargparse's error as one line that names the flag, what it got and what it takes."""
    text = str(err)
    found = re.search(r'Parser key "([^"]+)"', text)
    fields = {f.path: f for f in spec_fields()}
    if found and found.group(1) in fields:
        field = fields[found.group(1)]
        got = _flag_value(argv, f"--{field.path}")
        return f"--{field.path} {got!r}: expected {expected(field)}"
    if found:
        return f"--{found.group(1)}: {' '.join(text.split(':', 1)[1].split())}"
    return f"{' '.join(text.split())}: see python -m app.cli {command} --help"


def _name_flags(message: str, paths: list[str]) -> str:
    """A RunSpec error with each field that came from a flag written as that flag (``train.lr:`` -> ``--train.lr:``)."""
    for path in paths:
        message = re.sub(rf"(?<![\w.-]){re.escape(path)}(?=[:\s])", f"--{path}", message)
    return message


def spec_from_args(command: str, argv: list[str]) -> tuple[RunSpec, argparse.Namespace]:
    """Parse ``run``/``submit`` arguments into the RunSpec they describe and the other options (seeds, json)."""
    method_params, rest = _method_params(argv)
    try:
        ns = build_spec_parser(command).parse_args(rest)
    except argparse.ArgumentError as err:
        raise SpecArgsError(_one_line(err, command, rest)) from None
    if ns.spec and ns.config:
        raise SpecArgsError(f"spec file given twice ({ns.spec} and --config {ns.config}): give one")
    path = ns.config or ns.spec
    data = read_spec_file(path) if path else {}
    overrides = {f.path: ns[f.path] for f in _given(rest, spec_fields())}
    overrides |= {f"method.{key}": value for key, value in method_params.items()}
    if overrides:
        from engine.study import apply  # late import: a spec file alone needs no study machinery

        data.setdefault("method", {"name": field_default("method.name")})  # a new name must differ from something
        data = apply(data, overrides)
        _drop_other_names(data["method"], method_params)
    try:
        spec = parse_spec(data)
    except SpecError as err:
        raise SpecArgsError(_name_flags(str(err), list(overrides))) from None
    options = argparse.Namespace(seeds=ns.seeds, json=bool(ns.get("json")))
    return spec, options
