"""Causal language models with transformers (``AutoModelForCausalLM``): Llama, Mistral, Qwen, GPT-2, ...

The forward gives next-token logits ``(batch, length, vocab)``; the loss over response tokens and the
multiple-choice scoring live in ``engine.lm_data`` (docs/METHODS.md#causal-language-models).

Roles: ``q, k, v, o`` of the attention and ``gate, up, down`` of the (gated) MLP; a method asking for ``fc1`` or
``fc2`` gets ``up`` or ``down`` (``engine.models.ROLE_ALIASES``). GPT-2's projections are ``Conv1D`` (``y = x W +
b``, the weight stored transposed): ``prepare`` turns each into the equal ``nn.Linear`` and splits the fused
``c_attn`` into q, k, v (``SplitQKV``, as for timm's fused qkv), so every method sees plain linears; the merged
export turns them back. There is no task head: the LM head is pretrained and frozen (the linear probe trains it).

Bundled random-init models (no download): ``tiny-llama`` (grouped-query attention: 4 query heads, 2 key/value
heads) and ``tiny-gpt2``, both deterministic from ``model_options.init_seed`` and tokenised with the bundled
MiniLM WordPiece tokenizer (no chat template: ``engine.lm_data`` falls back to its plain template).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.backends.base import register_backend
from engine.backends.hf_common import HFBackend

if TYPE_CHECKING:
    from engine.models import TaskModel

CAUSAL_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    # Llama, Mistral, Qwen2/3, Gemma, ...: model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
    (r"layers\.(\d+)\.self_attn\.q_proj$", "q"),
    (r"layers\.(\d+)\.self_attn\.k_proj$", "k"),
    (r"layers\.(\d+)\.self_attn\.v_proj$", "v"),
    (r"layers\.(\d+)\.self_attn\.o_proj$", "o"),
    (r"layers\.(\d+)\.mlp\.gate_proj$", "gate"),
    (r"layers\.(\d+)\.mlp\.up_proj$", "up"),
    (r"layers\.(\d+)\.mlp\.down_proj$", "down"),
    # GPT-2 after ``prepare``: transformer.h.N.attn.c_attn.{q,k,v}, attn.c_proj, mlp.c_fc, mlp.c_proj
    (r"\bh\.(\d+)\.attn\.c_attn\.q$", "q"),
    (r"\bh\.(\d+)\.attn\.c_attn\.k$", "k"),
    (r"\bh\.(\d+)\.attn\.c_attn\.v$", "v"),
    (r"\bh\.(\d+)\.attn\.c_proj$", "o"),
    (r"\bh\.(\d+)\.mlp\.c_fc$", "up"),
    (r"\bh\.(\d+)\.mlp\.c_proj$", "down"),
)

TINY = ("tiny-llama", "tiny-gpt2")
BASE_DIR = "base_model"  # where a PEFT export of a bundled random-init model carries its base


def is_causal_config(config: Any) -> bool:
    """A transformers config whose architecture is a causal LM (``*ForCausalLM``, GPT-2's ``*LMHeadModel``)."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _model_type(net: nn.Module) -> str:
    return str(getattr(getattr(net, "config", None), "model_type", ""))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def conv1d_to_linear(conv: Any) -> nn.Linear:
    """GPT-2's ``Conv1D(nf, nx)`` (``y = x W + b``, W of shape (nx, nf)) as the equal ``nn.Linear(nx, nf)``."""
    weight = conv.weight
    lin = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.T)
        lin.bias.copy_(conv.bias)
    return lin


def tiny_config(name: str, vocab_size: int, pad_id: int, eos_id: int) -> Any:
    """The transformers config of a bundled tiny causal LM."""
    from transformers import GPT2Config, LlamaConfig

    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=False,
        )  # fmt: skip
    return GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
        pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from engine.models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def build_tiny(name: str, seed: int) -> tuple[nn.Module, Any]:
    """(net, tokenizer) of a bundled tiny causal LM, its weights drawn from ``seed`` alone."""
    from transformers import AutoModelForCausalLM

    tok = minilm_tokenizer()
    cfg = tiny_config(name, len(tok), int(tok.pad_token_id), int(tok.sep_token_id))
    cfg.architectures = ["LlamaForCausalLM" if name == "tiny-llama" else "GPT2LMHeadModel"]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg), tok


@register_backend
class HFCausalBackend(HFBackend):
    name = "hf-causal-lm"
    modality = "causal-lm"
    role_patterns = CAUSAL_ROLE_PATTERNS
    peft_task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"

    def claims(self, name: str) -> bool:
        return name in TINY

    def accepts_config(self, config: Any) -> bool:
        return is_causal_config(config)

    def load(self, name: str, num_labels: int, options: dict[str, Any], trust_remote_code: bool) -> TaskModel:
        from engine.gpu import load_options

        if name in TINY:
            net, tok = build_tiny(name, int(options.get("init_seed", 0)))
            return self.wrap_causal(net, name, "random init", tok)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # weights_only: a pickled checkpoint is read without running code, as safetensors are.
        net = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, weights_only=True, **load_options(options)
        )
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        return self.wrap_causal(net, name, name, tok)

    def wrap_causal(self, net: nn.Module, name: str, source: str, tokenizer: Any) -> TaskModel:
        """The transformers net as a ``TaskModel`` (``tokenizer`` None: structure only, for pre-flight)."""
        from engine.models import ModelInfo, TaskModel

        if tokenizer is not None and tokenizer.pad_token_id is None:  # Llama/GPT-2 have none: pad with the end token
            tokenizer.pad_token = tokenizer.eos_token
        net = self.prepare(net)
        cfg: Any = net.config
        output_layer: Any = net.get_output_embeddings()  # type: ignore[operator]  # a transformers model
        output = {id(p) for p in output_layer.parameters()}  # GPT-2's is tied to the input one
        probe = ["net." + n for n, p in net.named_parameters() if id(p) in output]
        heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0)) or 0)
        info = ModelInfo(
            name=name,
            modality=self.modality,
            num_labels=0,
            num_heads=heads,
            num_layers=int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)) or 0),
            head_names=[],  # the LM head is pretrained: methods leave it frozen, as PEFT's CAUSAL_LM does
            source=str(source),
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            extra={"probe": probe},  # the output projection's parameters: what the linear probe trains
        )
        return TaskModel(net, info, self.name, tokenizer)

    def prepare(self, net: nn.Module) -> nn.Module:
        """GPT-2: every ``Conv1D`` of the blocks becomes the equal ``nn.Linear``, the fused ``c_attn`` a ``SplitQKV``.
        Other architectures already have plain linears."""
        from engine.models import SplitQKV

        for module in list(net.modules()):
            for child_name, child in list(module.named_children()):
                if _is_conv1d(child):
                    lin = conv1d_to_linear(child)
                    setattr(module, child_name, SplitQKV(lin) if child_name == "c_attn" else lin)
        return net

    def forward(self, model: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    # -- export ----------------------------------------------------------------------------------
    def plain_state_dict(self, model: TaskModel) -> dict[str, torch.Tensor]:
        """The net's tensors in the library's own layout: GPT-2's linears back to ``Conv1D`` (transposed) and
        q, k, v fused back into ``c_attn``."""
        from engine.models import SplitQKV

        state = {k: v.detach() for k, v in model.net.state_dict().items()}
        if _model_type(model.net) != "gpt2":
            return state
        for name, module in model.net.named_modules():
            if isinstance(module, SplitQKV):
                for suffix in ("weight", "bias"):
                    parts = [state.pop(f"{name}.{p}.{suffix}") for p in "qkv"]
                    state[f"{name}.{suffix}"] = torch.cat(parts, 0)
        for name, module in model.net.named_modules():
            if isinstance(module, (nn.Linear, SplitQKV)) and name.split(".")[-1] in ("c_attn", "c_proj", "c_fc"):
                state[f"{name}.weight"] = state[f"{name}.weight"].T.contiguous()
        return state

    def plain_net(self, model: TaskModel) -> nn.Module:
        """A fresh transformers model holding this model's weights in the library's layout."""
        from transformers import AutoModelForCausalLM

        net = model.net
        if _model_type(net) != "gpt2":
            return net
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(getattr(net, "config"))  # noqa: B009  (an nn.Module attribute)
        plain.load_state_dict(self.plain_state_dict(model), assign=True)
        return plain

    def save_merged(
        self, model: TaskModel, directory: Path, *, labels: list[str], lab_model: str, options: dict[str, Any]
    ) -> list[str]:
        plain: Any = self.plain_net(model)  # a transformers PreTrainedModel
        plain.save_pretrained(str(directory))
        model.tokenizer.save_pretrained(str(directory))
        return []

    def save_peft_base(self, base: TaskModel, directory: Path) -> str | None:
        """A bundled random-init base travels with its PEFT export (``base_model/``), so PEFT alone loads it."""
        if base.info.source != "random init":
            return None
        self.save_merged(base, directory / BASE_DIR, labels=[], lab_model=base.info.name, options={})
        return BASE_DIR

    def merged_card(self) -> list[str]:
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "model = AutoModelForCausalLM.from_pretrained('<this directory>')",
                "tokenizer = AutoTokenizer.from_pretrained('<this directory>')", "```"]  # fmt: skip

    def peft_layout(self, factors: list[Any]) -> tuple[list[Any], dict[str, Any]]:
        """GPT-2: the split q, k, v of one ``c_attn`` become one LoRA of the fused ``Conv1D`` (``fan_in_fan_out``):
        ``A = [A_q; A_k; A_v]`` and a block-diagonal ``B`` (zero rows for a part not adapted) of rank ``Σ r``,
        ``ΔW_fused = s [B_q A_q; B_k A_k; B_v A_v]``, exactly the three updates stacked."""
        if not any(f.name.endswith(("c_attn.q", "c_attn.k", "c_attn.v")) for f in factors):
            return factors, {}
        from dataclasses import replace

        from engine.artifacts import ExportError

        fused: dict[str, dict[str, Any]] = {}
        out: list[Any] = []
        for f in factors:
            parent, _, part = f.name.rpartition(".")
            if not parent.endswith("c_attn"):
                out.append(f)
                continue
            if f.magnitude is not None:
                raise ExportError(f"layer {f.name}: PEFT's DoRA on GPT-2's fused c_attn is not written: export merged")
            fused.setdefault(parent, {})[part] = f
        for parent, parts in fused.items():
            first = next(iter(parts.values()))
            scaling = first.alpha / first.rank
            d = first.lora_B.shape[0]
            rank = sum(p.rank for p in parts.values())
            b = torch.zeros(3 * d, rank, dtype=first.lora_B.dtype)
            bias = None
            col = 0
            for i, key in enumerate("qkv"):
                p = parts.get(key)
                if p is None:
                    continue
                ratio = (p.alpha / p.rank) / scaling  # each part's own scaling, relative to the fused one
                b[i * d : (i + 1) * d, col : col + p.rank] = p.lora_B * ratio
                if p.bias is not None:
                    bias = torch.zeros(3 * d, dtype=p.bias.dtype) if bias is None else bias
                    bias[i * d : (i + 1) * d] = p.bias * ratio
                col += p.rank
            a = torch.cat([parts[k].lora_A for k in "qkv" if k in parts])
            agg = {k: sum(getattr(p, k) ** 2 for p in parts.values()) ** 0.5
                   for k in ("update_norm", "weight_norm", "error_norm")}  # fmt: skip
            out.append(replace(first, name=parent, lora_A=a, lora_B=b, alpha=scaling * rank, bias=bias,
                               residual_rank=sum(p.residual_rank for p in parts.values()), **agg))  # fmt: skip
        return out, {"fan_in_fan_out": True}
