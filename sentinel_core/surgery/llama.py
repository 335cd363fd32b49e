"""Surgery adapter for the LLaMA family: separate q/k/v/o projections, grouped-query attention.

Covers every model type in ``LlamaAdapter.model_types`` whose attention modules have exactly
the LLaMA layout (checked on the model, not assumed from the name): Linear ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, optional per-head-dim ``q_norm``/``k_norm`` (Qwen3), and no
per-head parameters of their own (attention sinks would need their own adapter).
"""

from __future__ import annotations

from torch import nn

from sentinel_core.surgery.base import HeadAdapter, HeadParam, register_adapter

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _attention_has_llama_layout(attn: nn.Module) -> bool:
    if not all(isinstance(getattr(attn, name, None), nn.Linear) for name in _PROJECTIONS):
        return False
    if not hasattr(attn, "head_dim") or not hasattr(attn, "num_key_value_groups"):
        return False
    if any(True for _ in attn.named_parameters(recurse=False)):
        return False
    for name, child in attn.named_children():
        if name in _PROJECTIONS:
            continue
        weight = getattr(child, "weight", None)
        # q_norm / k_norm normalise each head over head_dim with shared weights: head-count agnostic.
        if name in ("q_norm", "k_norm") and weight is not None and tuple(weight.shape) == (attn.head_dim,):
            continue
        if not any(True for _ in child.parameters()):
            continue
        return False
    return True


@register_adapter
class LlamaAdapter(HeadAdapter):
    """LLaMA-style attention: query slot i reads key/value slot ``i // num_key_value_groups``."""

    family = "llama"
    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
    description = "LLaMA family (separate q/k/v/o projections, grouped-query attention): " + ", ".join(model_types)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in cls.model_types:
            return False
        layers = getattr(getattr(model, "base_model", None), "layers", None)
        if layers is None or len(layers) == 0:
            return False
        return all(_attention_has_llama_layout(getattr(layer, "self_attn", None) or nn.Module()) for layer in layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.base_model.layers]

    def original_num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    def original_num_kv_heads(self) -> int:
        kv = getattr(self.config, "num_key_value_heads", None)
        return int(kv) if kv else self.original_num_heads()

    def head_dim(self, attn: nn.Module) -> int:
        return int(attn.head_dim)

    @classmethod
    def output_projection(cls, attn: nn.Module) -> nn.Module:
        return attn.o_proj

    def head_params(self, attn: nn.Module) -> list[HeadParam]:
        return [
            HeadParam("q_proj.weight", 0, ("q",)),
            HeadParam("q_proj.bias", 0, ("q",)),
            HeadParam("k_proj.weight", 0, ("k",)),
            HeadParam("k_proj.bias", 0, ("k",)),
            HeadParam("v_proj.weight", 0, ("v",)),
            HeadParam("v_proj.bias", 0, ("v",)),
            HeadParam("o_proj.weight", 1, ("o",)),
        ]

    def set_head_counts(self, attn: nn.Module, num_slots: int, num_kv_slots: int, group_size: int) -> None:
        hd = attn.head_dim
        attn.q_proj.out_features = num_slots * hd
        attn.k_proj.out_features = num_kv_slots * hd
        attn.v_proj.out_features = num_kv_slots * hd
        attn.o_proj.in_features = num_slots * hd
        if group_size:
            # eager repeat_kv and every sdpa GQA path read this per module, not from the config.
            attn.num_key_value_groups = group_size
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, num_slots)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = num_kv_slots
