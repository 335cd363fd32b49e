"""Surgery adapter for the GPT-2 family (gpt2, distilgpt2): fused Conv1D ``c_attn`` / ``c_proj``."""

from __future__ import annotations

import torch
from torch import nn

from sentinel_core.surgery.base import HeadAdapter, HeadParam, register_adapter


@register_adapter
class GPT2Adapter(HeadAdapter):
    """GPT-2: ``c_attn.weight`` is [hidden, 3*H*hd] (q | k | v column blocks), ``c_proj.weight`` [H*hd, hidden]."""

    family = "gpt2"
    description = "GPT-2 family without cross-attention: gpt2, distilgpt2"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "gpt2" or getattr(config, "add_cross_attention", False):
            return False
        return hasattr(getattr(model, "base_model", None), "h")

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.base_model.h]

    def original_num_heads(self) -> int:
        return int(self.config.n_head)

    def head_dim(self, attn: nn.Module) -> int:
        return int(attn.head_dim)

    @classmethod
    def output_projection(cls, attn: nn.Module) -> nn.Module:
        return attn.c_proj

    def head_params(self, attn: nn.Module) -> list[HeadParam]:
        return [
            HeadParam("c_attn.weight", 1, ("q", "k", "v")),
            HeadParam("c_attn.bias", 0, ("q", "k", "v")),
            HeadParam("c_proj.weight", 0, ("o",)),
        ]

    def set_head_counts(self, attn: nn.Module, num_slots: int, num_kv_slots: int, group_size: int) -> None:
        width = num_slots * attn.head_dim
        # Conv1D shapes its output from nf; GPT2Attention.forward splits q/k/v by split_size.
        attn.c_attn.nf = 3 * width
        attn.c_proj.nx = width
        attn.split_size = width
        attn.num_heads = num_slots

    @classmethod
    def zero_output(cls, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        bias = attn.c_proj.bias.to(hidden_states.dtype)
        out = bias.expand(*hidden_states.shape[:-1], bias.shape[0]).clone()
        return attn.resid_dropout(out)
