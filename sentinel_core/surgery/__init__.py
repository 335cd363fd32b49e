"""Head surgery for Hugging Face causal LMs: masks, physical removal, growth, head maps.

One adapter per architecture family (see :mod:`sentinel_core.surgery.base`); the built-in
adapters cover GPT-2 and the LLaMA family. Head ids always refer to the original numbering.
"""

from sentinel_core.surgery import gpt2 as _gpt2  # noqa: F401  (registers the adapter)
from sentinel_core.surgery import llama as _llama  # noqa: F401  (registers the adapter)
from sentinel_core.surgery.base import (
    HeadAdapter,
    HeadParam,
    get_adapter,
    register_adapter,
    registered_adapters,
    supported_architectures,
)
from sentinel_core.surgery.headless import is_headless
from sentinel_core.surgery.headmap import HeadMap
from sentinel_core.surgery.ops import (
    CONFIG_KEY,
    apply_head_map,
    dense_state_dict,
    gate_tensors,
    get_head_map,
    grow_heads,
    mask_heads,
    prune_heads,
    relaid_state_dict,
    unmask_heads,
)
from sentinel_core.surgery.slices import HeadSlice, head_slices, head_weights

__all__ = [
    "CONFIG_KEY",
    "HeadAdapter",
    "HeadMap",
    "HeadParam",
    "HeadSlice",
    "apply_head_map",
    "dense_state_dict",
    "gate_tensors",
    "get_adapter",
    "get_head_map",
    "grow_heads",
    "head_slices",
    "head_weights",
    "is_headless",
    "mask_heads",
    "prune_heads",
    "register_adapter",
    "relaid_state_dict",
    "registered_adapters",
    "supported_architectures",
    "unmask_heads",
]
