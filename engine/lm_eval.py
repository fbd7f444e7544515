"""Loss, evaluation and generation of causal language models (docs/METHODS.md#causal-language-models).

* ``causal_lm_loss``: next-token cross-entropy, ``L = −(1/N) Σ_{i,t: y_{i,t+1} ≠ −100} log p(y_{i,t+1} | y_{i,≤t})``,
  the mean over the response tokens of the whole batch (``N`` of them), as transformers' ``ForCausalLMLoss``.
* ``evaluate_lm``: ``eval_loss`` (that mean over every response token of the split), ``perplexity`` =
  ``exp(eval_loss)``, and with choices ``eval_accuracy``: an example is right when its answer has the highest
  summed log-likelihood ``Σ_t log p(c_t | prompt, c_<t)`` among its choices (``choice_scores``; unnormalised by
  length, as the commonsense-reasoning tables of the LLaMA-family PEFT papers report "acc").
* ``greedy_generations``: the base and the adapted model's greedy continuations of a few evaluation prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.lm_data import IGNORE, ChoiceSet, LMSplit

GENERATION_PROMPTS = 4
GENERATION_TOKENS = 16


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token, mask of the scored ones), both (B, T−1): position t predicts token t+1."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100 (the response tokens)."""
    return nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


@torch.no_grad()
def choice_scores(model: nn.Module, choices: ChoiceSet, batch_size: int, device: torch.device) -> torch.Tensor:
    """The summed log-likelihood of every choice's tokens given its prompt, one value per row of ``choices``."""
    out = []
    for start in range(0, len(choices.labels), batch_size):
        sl = slice(start, start + batch_size)
        mask = choices.attention_mask[sl]
        length = int(mask.sum(1).max())
        batch = {"input_ids": choices.input_ids[sl, :length].to(device), "attention_mask": mask[:, :length].to(device)}
        logp, scored = token_log_likelihoods(model(batch), choices.labels[sl, :length].to(device))
        out.append(logp.sum(1).cpu())
    return torch.cat(out)


def choice_accuracy(scores: torch.Tensor, choices: ChoiceSet) -> float:
    """Share of examples whose answer scores highest among its own choices (ties: the first choice)."""
    right, start = 0, 0
    for count, answer in zip(choices.num_choices, choices.answers.tolist()):
        right += int(int(scores[start : start + count].argmax()) == answer)
        start += count
    return right / max(len(choices.num_choices), 1)


@torch.no_grad()
def evaluate_lm(model: nn.Module, split: LMSplit, batch_size: int, device: torch.device) -> dict[str, float]:
    """``eval_loss`` and ``perplexity`` over the response tokens, and ``eval_accuracy`` by choice likelihood."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    t = split.tensors
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        length = int(t["attention_mask"][sl].sum(1).max())
        batch = {k: v[sl, :length].to(device) for k, v in t.items()}
        logp, scored = token_log_likelihoods(model(batch), batch["labels"])
        nll -= float(logp.sum())
        tokens += int(scored.sum())
    loss = nll / max(tokens, 1)
    metrics = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if split.choices is not None:
        metrics["eval_accuracy"] = choice_accuracy(choice_scores(model, split.choices, batch_size, device),
                                                   split.choices)  # fmt: skip
    model.train(was_training)
    return metrics


@torch.no_grad()
def greedy_tokens(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, device: torch.device
) -> list[int]:
    """Greedy decoding with the lab's forward (the full sequence each step: exact, and short prompts only).
    Stops at the end-of-sequence token."""
    from engine.lm_data import _eos_id

    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not getattr(tokenizer, "chat_template", None) and bos is not None:
        ids = [int(bos)] + ids
    eos, new = _eos_id(tokenizer), list[int]()
    for _ in range(max_new_tokens):
        x = torch.tensor([ids + new], device=device)
        nxt = int(model({"input_ids": x, "attention_mask": torch.ones_like(x)})[0, -1].argmax())
        new.append(nxt)
        if nxt == eos:
            break
    return new


def greedy_generations(
    model: nn.Module, base: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
    max_new_tokens: int = GENERATION_TOKENS,
) -> dict[str, Any]:  # fmt: skip
    """``{"rows": [{prompt, base, adapted}]}``: the greedy continuations of the base and the adapted model."""
    rows = []
    for m in (model, base):
        m.eval()
    for prompt in prompts:
        texts = {
            key: tokenizer.decode(greedy_tokens(m, tokenizer, prompt, max_new_tokens, device), skip_special_tokens=True)
            for key, m in (("base", base), ("adapted", model))
        }
        rows.append({"prompt": prompt, **texts})
    return {"rows": rows, "max_new_tokens": max_new_tokens}


def write_generations(prep: Any, out_dir: Path) -> Path:
    """``generations.json`` of a finished run: the base model (rebuilt as the run built it) and the adapted one."""
    from engine.models import load_model

    spec, model = prep.spec, prep.model
    base = load_model(spec.model, 0, options=spec.model_options, trust_remote_code=spec.trust_remote_code)
    base.to(prep.device)
    prompts = prep.data.eval.prompts[:GENERATION_PROMPTS]
    data = greedy_generations(model, base, model.tokenizer, prompts, prep.device)
    path = out_dir / "generations.json"
    path.write_text(json.dumps(data))
    return path
