"""Tiny models and helpers shared by the surgery and checkpoint tests (imported, not a conftest)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*past_key_values.*")

ATTN = ("eager", "sdpa")
VOCAB = 100


def tiny_gpt2(attn: str = "sdpa", seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation=attn))
    _perturb_biases(model)
    return model.eval()


# LLaMA, Qwen2 and Mistral share one layout: 2 layers of 4 query heads of width 8.
_LLAMA_FAMILY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
)


def _llama_family(config_cls: type, model_cls: type, attn: str, seed: int, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**_LLAMA_FAMILY, **overrides}, attn_implementation=attn))
    _perturb_biases(model)
    return model.eval()


def tiny_llama(attn: str = "sdpa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    return _llama_family(LlamaConfig, LlamaForCausalLM, attn, seed, **overrides)


def tiny_qwen2(attn: str = "sdpa", seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """Qwen2: LLaMA's layout with biases on q/k/v."""
    return _llama_family(Qwen2Config, Qwen2ForCausalLM, attn, seed, **overrides)


def tiny_qwen3(attn: str = "sdpa", seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """Qwen3: LLaMA's layout with per-head RMSNorm on queries and keys (q_norm, k_norm)."""
    model = _llama_family(Qwen3Config, Qwen3ForCausalLM, attn, seed, **overrides)
    with torch.no_grad():  # q_norm/k_norm start at ones; other values make a mix-up visible
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1.0, 0.2)
            layer.self_attn.k_norm.weight.normal_(1.0, 0.2)
    return model


def tiny_mistral(attn: str = "sdpa", seed: int = 0, **overrides) -> MistralForCausalLM:
    """Mistral with a single key/value head shared by all four query heads (unless overridden)."""
    return _llama_family(MistralConfig, MistralForCausalLM, attn, seed, **{"num_key_value_heads": 1, **overrides})


def _perturb_biases(model: nn.Module) -> None:
    # HF initialises biases to zero; nonzero biases make bias-handling bugs visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)


def inputs(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def greedy(model: nn.Module, ids: torch.Tensor, use_cache: bool, n: int = 10) -> torch.Tensor:
    return model.generate(
        ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None
    )


def zero_heads_reference(model: nn.Module, heads: dict[int, list[int]]) -> nn.Module:
    """Independent reference for masking: a copy whose heads' output-projection inputs are zeroed
    in the weights (no Sentinel code involved; valid for an unmodified model, inference only)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, ids in heads.items():
            if isinstance(ref, GPT2LMHeadModel):
                attn = ref.transformer.h[layer].attn
                hd = attn.head_dim
                for h in ids:
                    attn.c_proj.weight[h * hd : (h + 1) * hd, :] = 0
            else:
                attn = ref.model.layers[layer].self_attn
                hd = attn.head_dim
                for h in ids:
                    attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
    return ref


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss
