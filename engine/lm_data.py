"""Instruction data for causal language models: reading, formatting, response-only labels, multiple choice.

Sources (``dataset.name``):

* ``tweets-instruct`` (bundled): the bundled tweets as instruction pairs, prompt = the tweet and the question,
  response = ``negative``, ``neutral`` or ``positive``; scored as a 3-way choice, so its accuracy compares with
  the classifier runs on ``tweets-sentiment``.
* a ``.csv``/``.jsonl`` file with a prompt and a response column (``dataset.prompt_column``,
  ``dataset.response_column``; default ``prompt`` and ``response``);
* a multiple-choice ``.jsonl`` file: ``question``, ``choices`` (a list of strings) and ``answer`` (the index of
  the right choice, or its text). Training pairs are (question with its options, right choice); evaluation scores
  every choice by its summed log-likelihood (``engine.lm_eval``), the way BoolQ, PIQA, ARC, ... are scored.

Encoding (docs/METHODS.md#causal-language-models): the prompt is formatted with the tokenizer's chat template
when it has one (one user turn, then the assistant's turn opened), else with ``PLAIN_TEMPLATE``; the response is
followed by the end-of-sequence token. ``labels`` are the token ids over the response (and its end token) and
-100 over the prompt and the padding, so the loss covers response tokens only. Sequences longer than
``dataset.max_length`` lose tokens from the prompt's start (the response, nearest the loss, is kept whole unless
it alone is too long, then its end is cut).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data import DataError

BUNDLED = {
    "tweets-instruct": "the tweets of tweets-sentiment as instructions; response negative, neutral or positive "
    "(scored as a 3-way choice)",
}
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
TWEET_QUESTION = "Is the sentiment of this tweet negative, neutral or positive?"
MC_FIELDS = ("question", "choices", "answer")
IGNORE = -100  # the label of a token the loss skips (PyTorch's cross_entropy ignore_index)


class LMDataError(DataError):
    """Instruction data that cannot be read or used; the message names the file (and line) and the fix."""


@dataclass
class InstructionData:
    """Raw instruction pairs; ``choices``/``answers`` when the data is scored as multiple choice."""

    prompts: list[str]
    responses: list[str]
    choices: list[list[str]] | None = None  # the candidate responses of each example
    answers: np.ndarray | None = None  # index of the right choice
    label_names: list[str] = field(default_factory=list)  # a fixed choice set (tweets-instruct), for tables
    modality: str = "causal-lm"
    task: str = "causal_lm"  # "multiple_choice" when read from question/choices/answer data
    eval: InstructionData | None = None  # the benchmark's own evaluation split (dataset.eval_split), if named

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labels(self) -> np.ndarray:
        """One entry per example (the split's length): the answers, or zeros without choices."""
        return self.answers if self.answers is not None else np.zeros(len(self.prompts), dtype=np.int64)


@dataclass
class ChoiceSet:
    """Every (prompt, choice) sequence of a split's multiple-choice examples, ``num_choices[i]`` rows for example i.
    ``labels`` are -100 except over the choice's tokens, whose summed log-likelihood is the choice's score."""

    input_ids: torch.Tensor  # (Σ choices, T)
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_choices: list[int]
    answers: torch.Tensor  # (examples,)


@dataclass
class LMSplit:
    """One split: ``input_ids``, ``attention_mask`` and ``labels`` (B, T), plus its choices when scored as MC."""

    tensors: dict[str, torch.Tensor]
    choices: ChoiceSet | None
    prompts: list[str]  # formatted prompts, for generations

    def __len__(self) -> int:
        return len(self.tensors["labels"])


@dataclass
class LMBundle:
    train: LMSplit
    eval: LMSplit
    label_names: list[str]
    modality: str = "causal-lm"
    task: str = "causal_lm"
    metric: str = "eval_loss"  # the headline metric: multiple-choice accuracy where the data has choices

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_rate(self) -> float:
        """Multiple-choice accuracy of always picking the choice position that is most often right (0 without)."""
        mc = self.eval.choices
        if mc is None or not len(mc.answers):
            return 0.0
        return Counter(mc.answers.tolist()).most_common(1)[0][1] / len(mc.answers)


# --- reading ---------------------------------------------------------------------------------------


def _first_row(spec: Any) -> dict:
    """The first row of ``dataset.name`` when it is a readable .csv/.jsonl file ({} otherwise)."""
    path = Path(spec.name)
    if not path.is_file() or path.suffix not in (".csv", ".jsonl", ".json"):
        return {}
    try:
        return _rows(path, limit=1)[0][1]
    except (LMDataError, IndexError):
        return {}


def is_instruction_source(spec: Any) -> bool:
    """Whether ``dataset.name`` is instruction data (bundled, or a file with prompt and response columns)."""
    if spec.name in BUNDLED:
        return True
    first = _first_row(spec)
    return spec.prompt_column in first and spec.response_column in first


def is_choice_file(spec: Any) -> bool:
    """Whether ``dataset.name`` is a .csv/.jsonl file whose rows are question, choices and answer."""
    first = _first_row(spec)
    return bool(first) and all(f in first for f in MC_FIELDS)


def from_choices(raw: Any) -> InstructionData:
    """Multiple-choice data read by ``engine.data`` (any source: a file, a table, the hub) as instruction pairs:
    the prompt is the context (``text_pair_column``, e.g. BoolQ's passage), the question and the options; the
    response is the right choice."""
    prompts = [
        (f"{raw.pairs[i]}\n" if raw.pairs else "") + f"{q}\nOptions: {' / '.join(raw.choices[i])}"
        for i, q in enumerate(raw.inputs)
    ]
    answers = np.asarray(raw.labels, dtype=np.int64)
    responses = [raw.choices[i][a] for i, a in enumerate(answers)]
    evaluation = from_choices(raw.eval) if getattr(raw, "eval", None) is not None else None
    return InstructionData(prompts, responses, [list(c) for c in raw.choices], answers, task="multiple_choice",
                           eval=evaluation)  # fmt: skip


def _rows(path: Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV or JSONL file; an unreadable file or line is one ``LMDataError`` line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LMDataError(f"dataset.name: {path} cannot be read as UTF-8 text ({err}): fix the file") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            rows.append((reader.line_num, dict(row)))
            if limit and len(rows) >= limit:
                break
        return rows
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LMDataError(
                f"dataset.name: {path} line {number} is not valid JSON ({err.msg}): fix that line"
            ) from None
        if not isinstance(row, dict):
            raise LMDataError(f"dataset.name: {path} line {number} is not a JSON object: write one object per line")
        rows.append((number, row))
        if limit and len(rows) >= limit:
            break
    return rows


def read_instructions(spec: Any) -> InstructionData:
    """The instruction pairs (and choices) of ``dataset.name``."""
    if spec.name == "tweets-instruct":
        return _tweets_instruct()
    path = Path(spec.name)
    rows = _rows(path)
    if not rows:
        raise LMDataError(f"dataset.name: {path} has no rows: write one example per line")
    return _pairs(path, rows, spec.prompt_column, spec.response_column)


def _tweets_instruct() -> InstructionData:
    from engine.data import tweets_csv_path

    with open(tweets_csv_path(), encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    names = ["negative", "neutral", "positive"]
    index = {n: i for i, n in enumerate(names)}
    prompts = [f"Tweet: {r['text']}\n{TWEET_QUESTION}" for r in rows]
    answers = np.array([index[r["sentiment"]] for r in rows], dtype=np.int64)
    return InstructionData(prompts, [names[a] for a in answers], [names] * len(rows), answers, names)


def _pairs(path: Path, rows: list[tuple[int, dict]], prompt_col: str, response_col: str) -> InstructionData:
    prompts, responses = [], []
    for number, row in rows:
        for col, fld in ((prompt_col, "dataset.prompt_column"), (response_col, "dataset.response_column")):
            if row.get(col) in (None, ""):
                raise LMDataError(f"{fld}: {path} line {number} has no {col!r} value: give every example one")
        prompts.append(str(row[prompt_col]))
        responses.append(str(row[response_col]))
    return InstructionData(prompts, responses)


# --- encoding --------------------------------------------------------------------------------------


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it: the chat template's user turn with the assistant turn opened, or the
    plain ``### Instruction / ### Response`` template when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise LMDataError("model: its tokenizer has no end-of-sequence token: pick a causal LM with one")
    return int(eos)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the formatted prompt (a chat template writes its own special tokens; the plain template
    starts with the beginning-of-sequence token when the tokenizer has one)."""
    text = format_prompt(tokenizer, prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not getattr(tokenizer, "chat_template", None) and bos is not None:
        ids = [int(bos)] + ids
    return ids


def join_truncated(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + response within ``max_length``: the prompt loses tokens from its start;
    a response longer than ``max_length - 1`` keeps its first tokens after one prompt token."""
    if len(response) > max_length - 1:
        response = response[: max_length - 1]
    keep = max_length - len(response)
    prompt = prompt[-keep:] if len(prompt) > keep else prompt
    return prompt + response, [IGNORE] * len(prompt) + response


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (seq, lab) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_split(raw: InstructionData, idx: np.ndarray, tokenizer: Any, max_length: int) -> LMSplit:
    """Right-padded (prompt + response) sequences with response-only labels, and the choice sequences."""
    eos, pad = _eos_id(tokenizer), int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    prompts = [prompt_ids(tokenizer, raw.prompts[i]) for i in idx]
    rows = []
    for p, i in zip(prompts, idx):
        response = list(tokenizer(raw.responses[i], add_special_tokens=False)["input_ids"]) + [eos]
        rows.append(join_truncated(p, response, max_length))
    choice_set = None
    if raw.choices is not None and raw.answers is not None:
        choice_rows, counts = [], []
        for p, i in zip(prompts, idx):
            options = raw.choices[i]
            counts.append(len(options))
            for option in options:
                choice_rows.append(join_truncated(p, list(tokenizer(option, add_special_tokens=False)["input_ids"]),
                                                  max_length))  # fmt: skip
        padded = _pad(choice_rows, pad)
        choice_set = ChoiceSet(padded["input_ids"], padded["attention_mask"], padded["labels"], counts,
                               torch.from_numpy(raw.answers[idx]))  # fmt: skip
    formatted = [format_prompt(tokenizer, raw.prompts[i]) for i in idx]
    return LMSplit(_pad(rows, pad), choice_set, formatted)


def load_instructions(spec: Any, tokenizer: Any, raw: InstructionData) -> LMBundle:
    """Split deterministically (``engine.data.split_indices``) and encode both splits."""
    from engine.data import split_indices

    if tokenizer is None:
        raise LMDataError(f"dataset {spec.name!r} is instruction data: pick a causal LM (e.g. tiny-llama)")
    held_out = raw.eval  # the benchmark's own evaluation split, else a held-out share of the training data
    train_idx, eval_idx = split_indices(len(raw.prompts), spec, len(held_out) if held_out is not None else None)
    return LMBundle(
        train=encode_split(raw, train_idx, tokenizer, spec.max_length),
        eval=encode_split(held_out if held_out is not None else raw, eval_idx, tokenizer, spec.max_length),
        label_names=list(raw.label_names),
        task=raw.task,
        metric=spec.metric or ("eval_accuracy" if raw.choices is not None else "eval_loss"),
    )
