"""How many bytes the key/value cache holds per token of context, from a model's head layout.

Generation caches, for every layer, one key and one value vector of ``head_dim`` numbers per
key/value head and token. Removing heads shrinks that (a whole key/value group must go for
grouped-query attention: see docs/surgery.md); masking does not, since masked heads are still
computed and cached.
"""

from __future__ import annotations

from torch import nn


def kv_cache_bytes_per_token(model: nn.Module) -> int | None:
    """Bytes of KV cache per token: the sum over layers of 2 x key/value slots x head_dim x element size.

    A layer whose every head was removed still caches a one-element placeholder for its key and
    value (see :mod:`sentinel_core.surgery.headless`), and that is counted too. The element size is
    that of the model's floating-point weights, which is what the cache is computed in.

    :return: the byte count, or None for an architecture that head surgery does not know.
    """
    from .errors import SentinelError
    from .surgery import get_adapter, get_head_map, is_headless

    try:
        adapter = get_adapter(model)
    except SentinelError:
        return None
    head_map = get_head_map(model)
    element = _element_size(model)
    total = 0
    for layer, attn in enumerate(adapter.attention_modules()):
        if is_headless(attn) or head_map.num_kv_slots(layer) == 0:
            total += 2 * element
            continue
        total += 2 * head_map.num_kv_slots(layer) * adapter.head_dim(attn) * element
    return total


def _element_size(model: nn.Module) -> int:
    for p in model.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4
