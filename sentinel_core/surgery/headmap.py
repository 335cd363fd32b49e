"""HeadMap: which head lives in which attention slot, per layer, in original numbering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sentinel_core.errors import SentinelError

HEAD_MAP_VERSION = 1


@dataclass
class HeadMap:
    """The head layout of a model, readable at any time and stored in config.json.

    Head ids: the original heads of every layer are ``0 .. original_num_heads - 1``; a grown
    head gets the next unused id of its layer; ids are never reused or renumbered.

    Attributes:
        family: the surgery adapter that produced the map (``"gpt2"``, ``"llama"``, ...).
        original_num_heads: query heads per layer of the unmodified model (H).
        original_num_kv_heads: key/value heads per layer of the unmodified model.
        layers: per layer, slot by slot, the head id living in each attention slot, or
            ``None`` for a dead slot kept only so that grouped-query attention stays aligned.
        group_sizes: per layer, query slots per key/value slot (1 for multi-head attention,
            0 for a layer with no heads left).
        masked_ids: per layer, the present heads whose gate is 0.
        next_ids: per layer, the id the next grown head will get.
    """

    family: str
    original_num_heads: int
    original_num_kv_heads: int
    layers: list[list[int | None]]
    group_sizes: list[int]
    masked_ids: list[list[int]] = field(default_factory=list)
    next_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.masked_ids:
            self.masked_ids = [[] for _ in self.layers]
        if not self.next_ids:
            self.next_ids = [
                max([self.original_num_heads] + [i + 1 for i in slots if i is not None]) for slots in self.layers
            ]

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.layers)

    @property
    def width(self) -> int:
        """Width of per-layer score tensors: every id ever issued fits (at least H)."""
        return max([self.original_num_heads] + list(self.next_ids))

    def present(self, layer: int) -> list[int]:
        """Ids physically present in ``layer`` (masked ones included), sorted."""
        return sorted(i for i in self.layers[layer] if i is not None)

    def active(self, layer: int) -> list[int]:
        """Ids present in ``layer`` and not masked, sorted: the heads that contribute."""
        masked = set(self.masked_ids[layer])
        return [i for i in self.present(layer) if i not in masked]

    def grown(self, layer: int) -> list[int]:
        """Present ids of ``layer`` (masked ones included) that were added by growth (id >= original_num_heads)."""
        return [i for i in self.present(layer) if i >= self.original_num_heads]

    def masked(self, layer: int) -> list[int]:
        """Present ids of ``layer`` whose gate is 0, sorted."""
        return sorted(self.masked_ids[layer])

    def removed(self, layer: int) -> list[int]:
        """Ids issued for ``layer`` (original or grown) that are no longer present."""
        present = set(self.present(layer))
        return [i for i in range(self.next_ids[layer]) if i not in present]

    def num_slots(self, layer: int) -> int:
        """Query slots of ``layer`` (dead alignment slots included)."""
        return len(self.layers[layer])

    def num_kv_slots(self, layer: int) -> int:
        """Key/value slots of ``layer``."""
        g = self.group_sizes[layer]
        return len(self.layers[layer]) // g if g else 0

    def kv_groups(self, layer: int) -> list[list[int | None]]:
        """The query slots of each key/value slot of ``layer``, in slot order."""
        g = self.group_sizes[layer]
        slots = self.layers[layer]
        return [slots[k * g : (k + 1) * g] for k in range(self.num_kv_slots(layer))]

    def is_original(self) -> bool:
        """True when nothing was removed, grown or masked and slots are in original order."""
        h, kv = self.original_num_heads, self.original_num_kv_heads
        return all(
            slots == list(range(h)) and g == h // kv and not m
            for slots, g, m in zip(self.layers, self.group_sizes, self.masked_ids, strict=False)
        ) and all(n == h for n in self.next_ids)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (stored in config.json under ``sentinel_head_map``)."""
        return {
            "version": HEAD_MAP_VERSION,
            "family": self.family,
            "original_num_heads": self.original_num_heads,
            "original_num_kv_heads": self.original_num_kv_heads,
            "layers": [list(s) for s in self.layers],
            "group_sizes": list(self.group_sizes),
            "masked": [sorted(m) for m in self.masked_ids],
            "next_ids": list(self.next_ids),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadMap:
        """Rebuild a HeadMap written by :meth:`to_dict`, checking that it is consistent."""
        if not isinstance(data, dict) or data.get("version") != HEAD_MAP_VERSION:
            raise SentinelError(
                f"sentinel_head_map has version {data.get('version') if isinstance(data, dict) else data!r}; "
                f"this Sentinel reads version {HEAD_MAP_VERSION}"
            )
        try:
            hm = cls(
                family=str(data["family"]),
                original_num_heads=int(data["original_num_heads"]),
                original_num_kv_heads=int(data["original_num_kv_heads"]),
                layers=[[None if i is None else int(i) for i in s] for s in data["layers"]],
                group_sizes=[int(g) for g in data["group_sizes"]],
                masked_ids=[[int(i) for i in m] for m in data["masked"]],
                next_ids=[int(n) for n in data["next_ids"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SentinelError(
                f"sentinel_head_map is malformed ({exc!r}); it must be written by HeadMap.to_dict"
            ) from None
        hm.validate()
        return hm

    def validate(self) -> None:
        """Raise SentinelError if the map cannot describe a real model."""
        n = self.num_layers
        if len(self.group_sizes) != n or len(self.masked_ids) != n or len(self.next_ids) != n:
            raise SentinelError(f"sentinel_head_map lists {n} layers but its other fields disagree; it is corrupt")
        for layer, slots in enumerate(self.layers):
            g = self.group_sizes[layer]
            ids = [i for i in slots if i is not None]
            if len(set(ids)) != len(ids) or any(i < 0 or i >= self.next_ids[layer] for i in ids):
                raise SentinelError(f"sentinel_head_map layer {layer} has bad head ids {slots}; it is corrupt")
            if (g == 0) != (len(slots) == 0) or (g and len(slots) % g):
                raise SentinelError(
                    f"sentinel_head_map layer {layer} has {len(slots)} slots with group size {g}; it is corrupt"
                )
            if not set(self.masked_ids[layer]) <= set(ids):
                raise SentinelError(f"sentinel_head_map layer {layer} masks heads that are not present; it is corrupt")
