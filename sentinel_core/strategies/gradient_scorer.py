"""The ``gradient`` scorer: head importance from the gradient of the loss with respect to head gates.

Michel, Levy and Neubig (2019), "Are Sixteen Heads Really Better than One?", define
I_h = E_x |dL(x)/d xi_h|, where xi_h is a gate multiplying head h's output (1 = on) and L(x)
the language-model loss on input x. Their reference code takes x to be one batch: for every
batch it back-propagates the batch's mean token loss and adds the absolute gate gradient. We
do the same and divide by the number of batches:

    I_h = (1 / N) * sum_b | d L_b / d xi_h |,   L_b = mean cross-entropy over batch b's labels.

The absolute value is taken per batch, after summing over that batch's tokens, so the sign
of a head's effect may differ between batches without cancelling. Scores are not comparable
across layers (gradients scale with depth), hence ``normalize_scores=auto`` normalises them
per layer before a global ranking, as Michel et al. do.

Cost: one forward and one backward pass per batch (no parameter gradients are formed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ..data import loss_inputs
from ..errors import SentinelError
from ..hookspecs import hookimpl
from ..results import HeadScores, Strategy
from ..surgery import gate_tensors, get_head_map
from ..training import causal_lm_loss

NAME = "gradient"


@hookimpl
def register_strategies():
    return [Strategy("score_heads", NAME, "mean |d loss / d head gate| over batches (Michel et al., 2019)",
                     function=gradient_scores)]


def gradient_scores(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> HeadScores:
    """Mean absolute gate gradient per active head (NaN for heads not active).

    The model comes back unchanged: eval/train mode and every parameter's ``requires_grad``
    are restored, and no ``.grad`` is written (gradients are taken with ``torch.autograd.grad``).
    """
    start = time.perf_counter()
    if not batches:
        raise SentinelError("the gradient scorer needs calibration text and got no batches; pass --data (or a data source)")
    head_map = get_head_map(model)
    device = next(model.parameters()).device
    was_training = model.training
    requires = [(p, p.requires_grad) for p in model.parameters()]
    sums: dict[int, torch.Tensor] = {}
    used = 0
    tokens = 0
    try:
        model.eval()
        for param, _ in requires:
            param.requires_grad_(False)
        with torch.enable_grad(), gate_tensors(model) as gates:
            layers = [layer for layer, gate in gates.items() if gate.numel() > 0]
            sums = {layer: torch.zeros(gates[layer].numel(), dtype=torch.float64) for layer in layers}
            for batch in batches:
                prepared = loss_inputs(batch, device)
                if prepared is None:
                    continue  # nothing to predict: the loss is undefined
                input_ids, mask, labels = prepared
                # Sentinel's own loss (the training loop's), not the model's labels= path:
                # the same numbers, and GPT-2 does not warn about an unknown loss_type.
                nll, count = causal_lm_loss(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits,
                                            labels)
                loss = nll / count
                grads = torch.autograd.grad(loss, [gates[layer] for layer in layers], allow_unused=True)
                for layer, grad in zip(layers, grads, strict=True):
                    if grad is not None:
                        sums[layer] += grad.detach().abs().double().cpu()
                used += 1
                tokens += int(mask.sum())
    finally:
        for param, flag in requires:
            param.requires_grad_(flag)
        model.train(was_training)
    if used == 0:
        raise SentinelError("the gradient scorer's calibration batches have no label tokens; give text of 2+ tokens")

    scores = torch.full((head_map.num_layers, head_map.width), float("nan"), dtype=torch.float32)
    for layer, slots in enumerate(head_map.layers):
        active = set(head_map.active(layer))
        for slot, head in enumerate(slots):
            if head in active:
                scores[layer, head] = float(sums[layer][slot] / used)
    return HeadScores(scores=scores, strategy=NAME, tokens_seen=tokens, seconds=time.perf_counter() - start,
                      extra={"batches": used})
