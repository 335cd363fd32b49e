"""LoRA fine-tuning through peft, as a training callback (``--lora-rank R``).

For every stage that :func:`sentinel_core.training.train` runs with ``config.lora_rank > 0``,
the callback injects low-rank adapters (``W + (alpha / r) B A``, with ``B`` zero at the start,
so the model is unchanged at birth) into the chosen projections, trains only the adapters, and
merges them into the weights when the stage ends: the saved model is an ordinary Sentinel
model, with no peft inside.

Masked heads stay silent. Sentinel's head gate multiplies the output projection's input; peft
replaces that projection by a wrapper that adds ``B A x`` to the base layer's output, so a gate
left on the base layer would let the adapter's branch read the ungated input. The callback
therefore moves the gate onto the wrapper while it trains, and back when it merges.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import SentinelError
from ..surgery import get_adapter
from ..surgery.gates import attach_gate, detach_gate
from .callbacks import TrainerCallback

# What --lora-targets names: projection modules by role, per architecture family.
TARGET_SETS = {
    "gpt2": {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "llama": {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
              "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}
MISSING_PEFT = "LoRA needs peft: pip install 'sentinel-core[lora]' (or pip install peft)"


def target_module_names(model: nn.Module, targets: str) -> list[str]:
    """Full names of the modules ``targets`` (``"attention,mlp"``, ``"attention"``, ``"mlp"``, or
    comma-separated module name endings such as ``"q_proj,v_proj"``) picks in ``model``.

    Layers whose projection has no weights left (every head removed) are skipped.
    """
    family = get_adapter(model).family
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    endings: list[str] = []
    for item in wanted:
        endings += list(TARGET_SETS.get(family, {}).get(item, (item,)))
    names = [name for name, module in model.named_modules()
             if any(name.endswith("." + e) or name == e for e in endings) and _has_weights(module)]
    if not names:
        raise SentinelError(f"lora_target_modules {targets!r} matches no module of this {family} model; use "
                            f"attention, mlp, or module names such as {', '.join(TARGET_SETS.get(family, {}).get('attention', ('q_proj',)))}")
    return names


def _has_weights(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dim() == 2 and weight.numel() > 0


class LoraCallback(TrainerCallback):
    """Adapters in, train them only, merge them out (see the module docstring)."""

    name = "sentinel-lora"

    def __init__(self, rank: int, alpha: float, targets: str, dropout: float = 0.0) -> None:
        self.rank, self.alpha, self.targets, self.dropout = rank, alpha, targets, dropout
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._adapter: Any = None

    def settings(self) -> Any:
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "dropout": self.dropout}

    def wrap_model(self, model: nn.Module, state, context) -> nn.Module:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise SentinelError(MISSING_PEFT) from None

        names = target_module_names(model, self.targets)
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        # Kept for unwrap: with peft's layers in place of nn.Linear, a LLaMA no longer matches
        # its surgery adapter (the GPT-2 one does not look at the projections' types).
        adapter = self._adapter = get_adapter(model)
        projections = [adapter.output_projection(attn) for attn in adapter.attention_modules()]
        gates = [detach_gate(proj) for proj in projections]
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names,
                            fan_in_fan_out=adapter.family == "gpt2", bias="none")
        inject_adapter_in_model(config, model)
        for param in model.parameters():
            param.requires_grad_(False)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
        for attn, gate in zip(adapter.attention_modules(), gates, strict=True):
            attach_gate(adapter.output_projection(attn), gate)
        return model

    def unwrap_model(self, model: nn.Module, state, context) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        adapter = self._adapter if self._adapter is not None else get_adapter(model)
        gates = [detach_gate(adapter.output_projection(attn)) for attn in adapter.attention_modules()]
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
        for attn, gate in zip(adapter.attention_modules(), gates, strict=True):
            attach_gate(adapter.output_projection(attn), gate)
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        return model


def lora_callback(config: Any) -> list[LoraCallback]:
    """The LoRA callback ``config`` asks for (``lora_rank > 0``), or none."""
    rank = getattr(config, "lora_rank", 0)
    if not rank:
        return []
    alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * rank
    return [LoraCallback(rank, alpha, config.lora_target_modules, config.lora_dropout)]
