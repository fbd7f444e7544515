"""Causal language models: equality with Hugging Face PEFT, response-only loss, multiple-choice scoring, HEAT on
grouped-query attention, and instruction data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import LilyConfig, LoraConfig, PeanutConfig, get_peft_model
from torch import nn

from engine.backends.hf_causal import build_tiny
from engine.lm_data import IGNORE, InstructionData, encode_split, join_truncated
from engine.lm_eval import causal_lm_loss, choice_accuracy, choice_scores, evaluate_lm
from engine.methods import build_method
from engine.methods.heat import group_mask
from engine.models import load_model
from engine.spec import DatasetSpec, parse_spec
from tests.conftest import tiny_lm_batch

LLAMA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj", "down": "down_proj"}


def _twins(name: str = "tiny-llama"):
    """Our TaskModel and the same transformers net, built from the same seed, for PEFT to wrap."""
    ours = load_model(name, 0).eval()
    theirs, _ = build_tiny(name, 0)
    return ours, theirs.eval()


def _peft_layer(peft_net, our_name: str):
    return peft_net.base_model.model.get_submodule(our_name.removeprefix("net."))


def _logits_both(ours, peft_net, batch):
    with torch.no_grad():
        mine = ours(batch)
        theirs = peft_net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return mine, theirs


def _randomise(model, method, seed: int = 3, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if method.is_adapter_key(name):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _copy(layer, peft_layer, pairs: dict[str, str]) -> None:
    with torch.no_grad():
        for mine, theirs in pairs.items():
            src = getattr(layer, mine)
            src = src.weight if isinstance(src, nn.Module) else src
            getattr(peft_layer, theirs)["default"].weight.copy_(src)


# (method params, PEFT config, our attribute -> PEFT attribute)
LORA_FAMILY = {
    "lora": ({"rank": 4, "alpha": 8, "target_roles": ["q", "k", "v", "o", "up", "down"]},
             LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS.values())),
             {"lora_A": "lora_A", "lora_B": "lora_B"}),
    "dora": ({"rank": 4, "alpha": 8, "target_roles": ["q", "v", "down"]},
             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
             {"dora_A": "lora_A", "dora_B": "lora_B", "dora_magnitude_vector": "lora_magnitude_vector"}),
    "pissa": ({"rank": 3, "alpha": 6, "target_roles": ["q", "k", "v"]},
              LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights="pissa"),
              {"pissa_A": "lora_A", "pissa_B": "lora_B"}),
}  # fmt: skip


@pytest.mark.parametrize("method_name", sorted(LORA_FAMILY))
def test_lora_family_equals_peft_on_tiny_llama(method_name):
    params, cfg, pairs = LORA_FAMILY[method_name]
    ours, theirs = _twins()
    method = build_method(method_name, params)
    method.apply(ours)
    peft_net = get_peft_model(theirs, cfg).eval()
    _randomise(ours, method)
    for name, layer in method.adapted_layers(ours).items():
        peft_layer = _peft_layer(peft_net, name)
        _copy(layer, peft_layer, pairs)
        with torch.no_grad():  # PiSSA: the frozen residual W0 − s B0 A0 is part of the weights
            peft_layer.base_layer.weight.copy_(layer.base.weight)
    batch = tiny_lm_batch()
    a, b = _logits_both(ours, peft_net, batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), peft_net.disable_adapter():
        base = peft_net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - base).abs().max() > 1e-3  # the adapters matter


def test_neat_equals_peft_peanut_on_tiny_llama():
    ours, theirs = _twins()
    method = build_method("neat", {"rank": 4, "depth": 1, "scaling": 0.3, "target_roles": ["q", "v", "down"]})
    method.apply(ours)
    cfg = PeanutConfig(r=4, depth=1, scaling=0.3, act_fn="relu", target_modules=["q_proj", "v_proj", "down_proj"])
    peft_net = get_peft_model(theirs, cfg).eval()
    _randomise(ours, method)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            p = _peft_layer(peft_net, name)
            p.peanut_A["default"].weight.copy_(layer.neat_A.weight)
            p.peanut_B["default"].weight.copy_(layer.neat_B.weight)
            for mine, their in zip(layer.neat_encoders, p.peanut_encoders["default"], strict=True):
                their.weight.copy_(mine.weight)
            for mine, their in zip(layer.neat_decoders, p.peanut_decoders["default"], strict=True):
                their.weight.copy_(mine.weight)
    a, b = _logits_both(ours, peft_net, tiny_lm_batch())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lily_equals_peft_lily_on_tiny_llama():
    ours, theirs = _twins()
    params = {"rank": 4, "num_experts": 3, "lp_stride": 1, "scaling": 0.5, "target_roles": ["q", "v"]}
    method = build_method("lily", {**params, "mlp_activation": "identity"})
    method.apply(ours)
    cfg = LilyConfig(r=4, num_B=3, stride_A=1, scaling=0.5, target_modules=["q_proj", "v_proj"])
    peft_net = get_peft_model(theirs, cfg).eval()
    _randomise(ours, method)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            p = _peft_layer(peft_net, name)
            p.lily_A["default"].weight.copy_(layer.lily_lp.weight)
            p.lily_B["default"].weight.copy_(layer.lily_hp.weight.reshape(-1, layer.out_features))
            p.lily_router["default"].weight.copy_(layer.lily_router.weight)
    a, b = _logits_both(ours, peft_net, tiny_lm_batch())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_equals_peft_lora_on_gpt2_conv1d():
    """Ours adapts split q, k, v linears (Conv1D turned into nn.Linear); PEFT adapts the fused Conv1D ``c_attn``
    (fan_in_fan_out). Our three rank-r LoRAs are one rank-3r LoRA of ``c_attn`` with A = [A_q; A_k; A_v] and a
    block-diagonal B, scaled α_f / 3r = α / r."""
    ours, theirs = _twins("tiny-gpt2")
    r, alpha = 2, 4.0
    method = build_method("lora", {"rank": r, "alpha": alpha, "target_roles": ["q", "k", "v", "o", "up", "down"]})
    method.apply(ours)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     rank_pattern={"c_attn": 3 * r}, alpha_pattern={"c_attn": 3 * alpha})  # fmt: skip
    peft_net = get_peft_model(theirs, cfg).eval()
    _randomise(ours, method)
    layers = method.adapted_layers(ours)
    with torch.no_grad():
        for name, layer in layers.items():
            if name.endswith(("c_attn.k", "c_attn.v")):
                continue
            if name.endswith("c_attn.q"):
                fused = name.removesuffix(".q")
                parts = [layers[f"{fused}.{p}"] for p in "qkv"]
                p = _peft_layer(peft_net, fused)
                p.lora_A["default"].weight.copy_(torch.cat([x.lora_A.weight for x in parts]))
                p.lora_B["default"].weight.copy_(torch.block_diag(*[x.lora_B.weight for x in parts]))
                assert math.isclose(p.scaling["default"], parts[0].scaling)
            else:
                _copy(layer, _peft_layer(peft_net, name), {"lora_A": "lora_A", "lora_B": "lora_B"})
    batch = tiny_lm_batch()
    a, b = _logits_both(ours, peft_net, batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), peft_net.disable_adapter():
        base = peft_net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - base).abs().max() > 1e-3


# --- loss and scoring by hand ----------------------------------------------------------------------


def test_response_only_loss_equals_a_hand_computation():
    """Two sequences, vocabulary 5: the loss is the mean of −log softmax(logits_t)[y_{t+1}] over response tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    # example 0: prompt [1, 2], response [3, 4]; example 1: prompt [2], response [0], then padding
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4], [IGNORE, 0, IGNORE, IGNORE]])
    terms = []
    for i, t, y in [(0, 1, 3), (0, 2, 4), (1, 0, 0)]:  # position t predicts the token at t + 1
        terms.append(-(logits[i, t, y] - torch.logsumexp(logits[i, t], 0)))
    expected = sum(terms) / 3
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    # a prompt token in the loss would change it
    assert not torch.isclose(causal_lm_loss(logits, torch.tensor([[IGNORE, 2, 3, 4], [IGNORE, 0, IGNORE, IGNORE]])),
                             expected)  # fmt: skip


class _TableModel(nn.Module):
    """Logits that depend on the current token only: ``table[token]`` (a bigram model), so log-likelihoods are
    easy to write down by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, batch):
        return self.table[batch["input_ids"]]


class _WordTokenizer:
    """Whitespace words a, b, c, d as ids 1 to 4 (other words, e.g. the template's, are dropped); pad 0, end 5."""

    vocab = {"a": 1, "b": 2, "c": 3, "d": 4}
    pad_token_id, eos_token_id, bos_token_id, sep_token_id = 0, 5, None, None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [self.vocab[w] for w in text.split() if w in self.vocab]}


def test_multiple_choice_scores_are_summed_log_likelihoods():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    lp = torch.log_softmax(table, -1)
    raw = InstructionData(["a b", "c"], ["c", "d a"], [["c", "d a"], ["c", "d a"]], np.array([0, 1]))
    mc = encode_split(raw, np.arange(2), _WordTokenizer(), 16).choices
    assert mc is not None and mc.num_choices == [2, 2]
    scores = choice_scores(_TableModel(table), mc, 3, torch.device("cpu"))
    # prompt "a b" = [1, 2]: choice "c" scores log p(3 | 2); choice "d a" scores log p(4 | 2) + log p(1 | 4)
    expected = torch.stack([lp[2, 3], lp[2, 4] + lp[4, 1], lp[3, 3], lp[3, 4] + lp[4, 1]])
    torch.testing.assert_close(scores, expected)
    right = [int(expected[0] >= expected[1]) == 1, int(expected[3] > expected[2]) == 1]
    assert choice_accuracy(scores, mc) == sum(right) / 2


def test_truncation_cuts_the_prompt_from_its_start():
    ids, labels = join_truncated([1, 2, 3, 4, 5], [6, 7], 5)
    assert ids == [3, 4, 5, 6, 7] and labels == [IGNORE, IGNORE, IGNORE, 6, 7]
    ids, labels = join_truncated([1, 2], [6, 7, 8, 9], 3)  # a response too long keeps its start
    assert ids == [2, 6, 7] and labels == [IGNORE, 6, 7]


# --- HEAT on grouped-query attention ---------------------------------------------------------------


def test_heat_scores_query_heads_and_masks_kv_heads_by_group():
    torch.manual_seed(0)
    model = load_model("tiny-llama", 0)
    assert (model.info.num_heads, model.info.num_kv_heads) == (4, 2)
    method = build_method("heat", {"rank": 2, "target_roles": ["q", "k", "v", "o"], "calibration_batches": 1})
    method.apply(model)
    batch = tiny_lm_batch()
    scores = method.head_importance(model, [batch], lambda b: causal_lm_loss(model(b), b["labels"]))
    assert scores.shape == (2, 4) and bool((scores > 0).all())
    _randomise(model, method)
    # mask query heads 0 and 1 (kv group 0, whole) in block 0 and query head 2 (half of group 1) in block 1
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    method.set_head_mask(model, mask)
    layers = method.adapted_layers(model)
    assert torch.equal(group_mask(mask[0], 2), torch.tensor([0.0, 1.0]))
    hd = 8
    for name, layer in layers.items():
        dw = layer.delta_weight()
        block = 0 if ".layers.0." in name else 1
        if name.endswith(("q_proj", "o_proj")):
            for h in range(4):
                sl = dw[h * hd : (h + 1) * hd] if name.endswith("q_proj") else dw[:, h * hd : (h + 1) * hd]
                assert bool((sl == 0).all()) == (mask[block, h] == 0), (name, h)
        else:  # k, v: 2 kv heads
            kv = group_mask(mask[block], 2)
            for g in range(2):
                assert bool((dw[g * hd : (g + 1) * hd] == 0).all()) == (kv[g] == 0), (name, g)
    # masked heads contribute nothing: their adapter slices get zero gradient, and removing them changes nothing
    loss = causal_lm_loss(model(batch), batch["labels"])
    loss.backward()
    q0 = layers["net.model.layers.0.self_attn.q_proj"]
    assert bool((q0.lora_B.weight.grad[: 2 * hd] == 0).all()) and q0.lora_B.weight.grad[2 * hd :].abs().sum() > 0


# --- instruction data ------------------------------------------------------------------------------


def test_tweets_instruct_is_a_three_way_choice_with_response_only_labels():
    from engine.data import load_data, read_raw

    spec = DatasetSpec(name="tweets-instruct", max_train=8, max_eval=6, max_length=40)
    model = load_model("tiny-llama", 0)
    data = load_data(spec, model.tokenizer, read_raw(spec))
    t = data.train.tensors
    assert t["labels"].shape == t["input_ids"].shape
    for ids, labels, mask in zip(t["input_ids"], t["labels"], t["attention_mask"]):
        scored = labels != IGNORE
        assert bool((labels[scored] == ids[scored]).all()) and bool(mask[scored].all())
        response = model.tokenizer.decode(ids[scored], skip_special_tokens=True)
        assert response in ("negative", "neutral", "positive")
    mc = data.eval.choices
    assert mc is not None and mc.num_choices == [3] * 6
    metrics = evaluate_lm(model, data.eval, 4, torch.device("cpu"))
    assert math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-9)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_multiple_choice_jsonl_and_bad_lines(tmp_path):
    from engine.data import DataError, read_raw

    good = tmp_path / "mc.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "sky?", "choices": ["blue", "red"], "answer": "blue"},
    ]))  # fmt: skip
    raw = read_raw(DatasetSpec(name=str(good)))
    assert raw.modality == "causal-lm" and list(raw.labels) == [1, 0] and raw.responses == ["4", "blue"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(DataError, match=r"line 1: answer 5 in column 'answer' is not one of its 2 choices"):
        read_raw(DatasetSpec(name=str(bad)))


def test_commonsense_multiple_choice_from_the_data_layer_trains_a_causal_lm(tmp_path):
    """Multiple-choice data in a benchmark's own layout (ARC's ``{text, label}`` choices and letter answers, a
    context column, a separate evaluation file) is read by engine.data and trained and scored by a causal LM."""
    from engine.train import MemoryReporter, train
    from tests.conftest import tiny_spec

    def write(path, n):
        rows = [{"ctx": f"Fact {i}.", "question": f"Is {i} even?", "answer": "A" if i % 2 == 0 else "B",
                 "choices": {"text": ["yes", "no"], "label": ["A", "B"]}} for i in range(n)]  # fmt: skip
        path.write_text("\n".join(json.dumps(r) for r in rows))

    write(tmp_path / "train.jsonl", 24)
    write(tmp_path / "dev.jsonl", 6)
    dataset = {"name": str(tmp_path / "train.jsonl"), "eval_split": str(tmp_path / "dev.jsonl"),
               "task": "multiple_choice", "text_column": "question", "text_pair_column": "ctx",
               "label_column": "answer", "max_length": 32}  # fmt: skip
    spec = parse_spec(tiny_spec(model="tiny-llama", dataset=dataset, train={"max_steps": 2, "batch_size": 8}))
    from engine.data import read_raw

    raw = read_raw(spec.dataset)
    assert raw.task == "multiple_choice" and raw.eval is not None and len(raw.eval) == 6
    assert raw.prompts[1] == "Fact 1.\nIs 1 even?\nOptions: yes / no" and raw.responses[:2] == ["yes", "no"]
    result = train(spec, MemoryReporter(), tmp_path / "run", resume=False)
    assert result.status == "succeeded" and result.task == "multiple_choice"
    assert result.headline_metric == "eval_accuracy" and 0.0 <= result.final_metrics["eval_accuracy"] <= 1.0
    assert math.isclose(result.final_metrics["perplexity"], math.exp(result.final_metrics["eval_loss"]), rel_tol=1e-6)


# --- GPU-only switches -------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are for machines without CUDA")
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train": {"bf16_weights": True}}, "train.bf16_weights needs a CUDA GPU"),
        ({"train": {"gradient_checkpointing": True}}, "train.gradient_checkpointing needs a CUDA GPU"),
        ({"model_options": {"load_in_4bit": True}}, "model_options.load_in_4bit needs a CUDA GPU"),
    ],
)
def test_gpu_switches_are_refused_in_one_line_without_cuda(overrides, field):
    from engine.errors import UserError
    from engine.train import prepare
    from tests.conftest import tiny_spec

    spec = parse_spec(tiny_spec(model="tiny-llama", dataset={"name": "tweets-instruct"}, **overrides))
    with pytest.raises(UserError) as err:
        prepare(spec)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
