"""Causal-LM exports load with the libraries alone: PEFT (``task_type: CAUSAL_LM``, the bundled base carried along)
gives the lab's greedy tokens; the merged model loads with ``AutoModelForCausalLM`` and gives the lab's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine.export import export_run
from engine.lm_eval import greedy_tokens
from engine.spec import parse_spec
from engine.train import prepare, save_adapter
from tests.conftest import tiny_lm_batch

CASES = {
    "tiny-llama": {"rank": 4, "alpha": 8, "target_roles": ["q", "k", "v", "o", "gate", "up", "down"]},
    "tiny-gpt2": {"rank": 2, "alpha": 4, "target_roles": ["q", "v", "o", "up", "down"]},  # c_attn without k
}


def _run(tmp_path, model_name: str):
    spec = parse_spec({"model": model_name, "dataset": {"name": "tweets-instruct", "max_train": 4, "max_eval": 2,
                       "max_length": 32}, "method": {"name": "lora", **CASES[model_name]}})  # fmt: skip
    prep = prepare(spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in prep.model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    prep.model.eval()
    run_dir = tmp_path / "run"
    save_adapter(prep, run_dir)
    return prep, run_dir


@pytest.mark.parametrize("model_name", sorted(CASES))
def test_peft_export_gives_the_same_greedy_tokens(tmp_path, model_name):
    prep, run_dir = _run(tmp_path, model_name)
    result = export_run(run_dir, "peft", "peft", root=tmp_path / "exports", summary={"final_metrics": {}})
    cfg = json.loads((result.path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] in (None, [])
    base = AutoModelForCausalLM.from_pretrained(str(result.path / "base_model"))  # carried: random-init base
    peft_model = PeftModel.from_pretrained(base, str(result.path)).eval()
    batch = tiny_lm_batch()
    with torch.no_grad():
        ours = prep.model(batch)
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (plain - ours).abs().max() > 1e-3  # the adapter matters
    tok = prep.model.tokenizer
    prompt = prep.data.eval.prompts[0]
    expected = greedy_tokens(prep.model, tok, prompt, 6, torch.device("cpu"))
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
    assert out[0, ids.shape[1] :].tolist()[: len(expected)] == expected


@pytest.mark.parametrize("model_name", sorted(CASES))
def test_merged_export_loads_with_auto_model_for_causal_lm(tmp_path, model_name):
    prep, run_dir = _run(tmp_path, model_name)
    batch = tiny_lm_batch()
    with torch.no_grad():
        expected = prep.model(batch)
    result = export_run(run_dir, "merged", "merged", root=tmp_path / "exports", summary={"final_metrics": {}})
    net = AutoModelForCausalLM.from_pretrained(str(result.path)).eval()
    with torch.no_grad():
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
