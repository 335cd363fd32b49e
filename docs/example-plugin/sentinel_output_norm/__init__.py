"""An example third-party Sentinel plugin: the ``output-norm`` scorer.

A head's importance is the mean L2 norm of what it adds to the residual stream,
``|| z_h W_o,h ||`` per token, where ``z_h`` is the head's attention output and ``W_o,h`` its
slice of the output projection. Heads that write almost nothing are the first to go.
"""

from __future__ import annotations

import time

import torch

from sentinel_core import HeadScores, SentinelError, Strategy, hookimpl
from sentinel_core.surgery import get_adapter, get_head_map

NAME = "output-norm"


@hookimpl
def register_strategies():
    return [Strategy("score_heads", NAME, "mean norm of each head's write to the residual stream",
                     function=output_norm_scores)]


def output_norm_scores(model, batches):
    """Mean L2 norm of what each active head writes to the residual stream, per token."""
    start = time.perf_counter()
    if not batches:
        raise SentinelError("the output-norm scorer needs calibration text; pass --data")
    adapter = get_adapter(model)
    head_map = get_head_map(model)
    device = next(model.parameters()).device
    sums = torch.zeros(head_map.num_layers, head_map.width, dtype=torch.float64)
    state = {"mask": None}  # the current batch's attention mask, read by the hooks

    def make_hook(layer, attn):
        # The adapter says which tensor holds the output projection's per-head blocks and along
        # which dimension, so this works for GPT-2's Conv1D and LLaMA's Linear alike.
        spec = next(p for p in adapter.head_params(attn) if p.segments == ("o",))
        weight = attn.get_parameter(spec.path).movedim(spec.dim, 0)  # [slots * head_dim, hidden]
        slots = head_map.layers[layer]

        def hook(_module, args):
            x = args[0]  # [batch, tokens, slots * head_dim]: the concatenated head outputs
            if not slots:
                return None
            per_head = x.reshape(*x.shape[:-1], len(slots), -1)
            w = weight.reshape(len(slots), -1, weight.shape[-1]).to(x.dtype)
            norms = torch.einsum("btnd,nde->btne", per_head, w).norm(dim=-1)  # [batch, tokens, slots]
            norms = norms * state["mask"][..., None]  # padded tokens do not count
            totals = norms.sum(dim=(0, 1)).double().cpu()
            for slot, head in enumerate(slots):
                if head is not None:
                    sums[layer, head] += totals[slot]
            return None

        return hook

    handles = [
        adapter.output_projection(attn).register_forward_pre_hook(make_hook(layer, attn))
        for layer, attn in enumerate(adapter.attention_modules())
    ]
    tokens = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                mask = batch["attention_mask"].to(device)
                state["mask"] = mask.to(torch.float32)
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()

    scores = (sums / max(tokens, 1)).float()
    for layer in range(head_map.num_layers):
        active = set(head_map.active(layer))
        for head in range(head_map.width):
            if head not in active:
                scores[layer, head] = float("nan")
    return HeadScores(scores=scores, strategy=NAME, tokens_seen=tokens, seconds=time.perf_counter() - start)
