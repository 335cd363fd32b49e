"""The ``gradient`` strategy's measure: how fast a fresh head would lower the loss in each layer.

A grown head starts with zero output-projection weights, so the gradient with respect to its
gate is zero and says nothing. The gradient with respect to those zero output weights is not:
for a candidate head i of layer l with output block W_i (``head_dim x hidden``; rows of
GPT-2's ``c_proj.weight``, columns of LLaMA's ``o_proj.weight``),

    G_i = d Lbar / d W_i,    Lbar = (1/B) sum_b L_b,

where L_b is the mean token cross-entropy of calibration batch b. One step of gradient descent
of size eta on W_i changes the loss by ``-eta * ||G_i||_F^2 + O(eta^2)``, so

    gain_i = ||G_i||_F^2

is the first-order loss decrease per unit learning rate that the head would buy. G_i is the
correlation of the head's attention output with the gradient arriving at the layer's output,
so it is large where a new head's values carry information the loss still wants.

``candidate_gains`` grows ``candidates`` heads per layer (random query/key/value weights, as
the real growth step draws them) in a deep copy of the model, accumulates G_i over the
batches with ``torch.autograd.grad`` (only output-projection weights require grad), and returns
gain_i per candidate and their mean per layer. Candidates do not disturb each other: with zero
output weights none of them changes the forward pass, so measuring them together gives the same
numbers as measuring each alone. The caller's model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sentinel_core.data import loss_inputs
from sentinel_core.errors import SentinelError
from sentinel_core.surgery import get_head_map, grow_heads, head_slices
from sentinel_core.training import causal_lm_loss


@dataclass
class CandidateGains:
    """``per_candidate[l, i]`` = gain of candidate i in layer l; ``per_layer[l]`` = their mean."""

    per_candidate: torch.Tensor
    per_layer: torch.Tensor
    batches: int
    tokens: int


def output_weight_blocks(model: nn.Module, layer: int, head_ids: Sequence[int]) -> list[tuple[nn.Parameter, int, int, int]]:
    """For each head id of ``layer``: (output-projection weight, dim, start, width) of its block,
    from ``sentinel_core.surgery.head_slices``, so it works for every architecture the surgery supports."""
    out = []
    for head in head_ids:
        blocks = [s for s in head_slices(model, layer, head, parts=("o",)) if not s.is_bias]
        if len(blocks) != 1:
            raise RuntimeError(f"layer {layer} head {head} has {len(blocks)} output-projection weight blocks; expected 1")
        out.append((blocks[0].parameter, blocks[0].dim, blocks[0].start, blocks[0].length))
    return out


def candidate_gains(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    candidates: int = 4,
    init_std: float = 0.02,
    seed: int = 0,
) -> CandidateGains:
    """Measure ``gain_i = ||d Lbar / d W_i||^2`` for ``candidates`` fresh heads in every layer (see module doc)."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise SentinelError(f"options.growth_candidates must be an integer >= 1, got {candidates!r}")
    if not batches:
        raise SentinelError("the gradient growth strategy got no calibration batches; give calibration_batches >= 1")
    probe = copy.deepcopy(model)
    probe.eval()
    for param in probe.parameters():
        param.requires_grad_(False)
    num_layers = get_head_map(probe).num_layers
    generator = torch.Generator().manual_seed(int(seed))
    new_ids = grow_heads(probe, dict.fromkeys(range(num_layers), candidates), init_std=init_std, generator=generator)
    blocks = {layer: output_weight_blocks(probe, layer, new_ids[layer]) for layer in range(num_layers)}
    weights: list[nn.Parameter] = []
    for layer_blocks in blocks.values():
        for weight, *_ in layer_blocks:
            if not any(weight is w for w in weights):
                weights.append(weight)
    for weight in weights:
        weight.requires_grad_(True)
    sums = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in weights]
    device = weights[0].device
    used = tokens = 0
    with torch.enable_grad():
        for batch in batches:
            prepared = loss_inputs(batch, device)
            if prepared is None:
                continue  # nothing to predict: the loss is undefined
            input_ids, mask, labels = prepared
            nll, count = causal_lm_loss(probe(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, labels)
            loss = nll / count  # the mean token loss, as the training loop's objective
            for total, grad in zip(sums, torch.autograd.grad(loss, weights), strict=True):
                total += grad.double()
            used += 1
            tokens += int(mask.sum())
    if used == 0:
        raise SentinelError("the calibration batches have no label tokens; give text of 2 or more tokens per block")
    per_candidate = torch.zeros(num_layers, candidates, dtype=torch.float64)
    for layer, layer_blocks in blocks.items():
        for i, (weight, dim, start, width) in enumerate(layer_blocks):
            mean_grad = sums[next(j for j, w in enumerate(weights) if w is weight)] / used
            per_candidate[layer, i] = float(mean_grad.narrow(dim, start, width).pow(2).sum())
    del probe
    return CandidateGains(per_candidate=per_candidate, per_layer=per_candidate.mean(dim=1), batches=used, tokens=tokens)
