"""Stock transformers checkpoints from Sentinel models (``sentinel export``).

A Sentinel checkpoint keeps a pruned model compact, but only Sentinel opens it (its layers can
have different head counts, dead slots and gates). An export is an ordinary ``save_pretrained``
folder (config.json, model.safetensors, tokenizer, generation config) that
``AutoModelForCausalLM.from_pretrained`` opens without Sentinel and without remote code, and
that computes the same function.

Formats:

- ``transformers``: the smallest stock form.
  - LLaMA family (llama, mistral, qwen2, qwen3): ``num_attention_heads`` and
    ``num_key_value_heads`` are set to the result and ``head_dim`` is written explicitly.
    Stock code gives every layer the same head counts (transformers 5.24 has no way to build
    LLaMA layers with different ones, see docs/surgery.md), so layers that differ are padded
    up to the largest with inert slots: zero query weights and zero output-projection columns
    for a missing query head, zero key/value weights for a missing group. The padding and its
    cost are reported. ``LlamaConfig`` also insists that ``hidden_size`` be divisible by
    ``num_attention_heads`` (even with an explicit ``head_dim``); when the result is not, the
    export is written as ``MistralForCausalLM`` with ``sliding_window = None``, which is the
    same network (RMSNorm, SwiGLU, RoPE, no biases), and says so.
  - GPT-2: stock GPT-2 ties the head size to ``n_embd / n_head``, so its only stock form is
    the dense one; that is what is written, and said.
- ``dense``: the original shapes, removed and masked heads zeroed (``save_model(dense=True)``).

Before anything is written the stock model is built, loaded strictly and run once beside the
source model on a short input; an export whose logits differ is refused. The folder is
assembled in a temporary directory and renamed into place.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import EXPORT_FORMATS as FORMATS
from .errors import SentinelError
from .folders import check_no_overlap
from .log import get_logger

log = get_logger()

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
EXPORT_DIR = "export"  # inside a run folder, for `sentinel run --export`
# LlamaConfig keys that MistralConfig does not have: biases (which must be off to switch) and
# pretraining_tp, which the transformers 5 forward does not read.
_LLAMA_BIASES = ("attention_bias", "mlp_bias")
_LLAMA_ONLY = (*_LLAMA_BIASES, "pretraining_tp")


@dataclass
class ExportReport:
    """What an export wrote and what it cost."""

    path: str
    format: str
    architecture: str
    parameters: int
    kv_cache_bytes_per_token: int
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    padded_query_slots: int = 0
    padded_kv_slots: int = 0
    padding_parameters: int = 0
    padding_kv_cache_bytes_per_token: int = 0
    max_logit_difference: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        heads = ""
        if self.num_attention_heads is not None:
            heads = f", {self.num_attention_heads} query heads in {self.num_key_value_heads} KV groups per layer"
        return (f"exported {self.format} checkpoint to {self.path}: {self.architecture}{heads}, "
                f"{self.parameters:,} parameters, {self.kv_cache_bytes_per_token:,} KV-cache bytes per token")


# ---------------------------------------------------------------- entry points


def resolve_source(src: str | os.PathLike) -> str:
    """The model folder that ``src`` names: a model folder itself, or a run folder's ``model/``."""
    path = Path(src).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "state.json").is_file() or (path / "experiment.json").is_file():
            if (path / "model" / "config.json").is_file():
                return str(path / "model")
            raise SentinelError(
                f"run folder {str(src)!r} has no model/ yet (the run has not finished); finish it with "
                f"`sentinel run --resume {src}` or export one of its checkpoints/<stage> folders"
            )
        raise SentinelError(f"{str(src)!r} is neither a model folder (config.json) nor a Sentinel run folder (model/)")
    return os.fspath(src)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, format: str = "transformers",
                      quiet: bool = False, card: dict[str, Any] | None = None) -> ExportReport:
    """Open the model in ``src`` (a Sentinel checkpoint, a plain model folder or a run folder) and
    export it to ``out`` in ``format``; returns what was written."""
    from .model_io import load_model

    check_format(format)
    source = resolve_source(src)
    if Path(source).is_dir() and Path(out).expanduser().absolute() == Path(source).expanduser().absolute():
        raise SentinelError(f"OUT {str(out)!r} is the source model folder; export to another folder")
    check_no_overlap(out, {"model": source}, what="OUT")
    if card is None:
        card = _card_facts(Path(src))
    model, tokenizer = load_model(source)
    return export_model(model, tokenizer, out, format=format, quiet=quiet, card=card)


def _card_facts(src: Path) -> dict[str, Any]:
    """What the model card of an export can say: a run folder's summary, when SRC is one."""
    from .model_card import facts_from_summary
    from .run_files import RUN_SUMMARY_FILE

    summary = src / RUN_SUMMARY_FILE
    if summary.is_file():
        import json

        return facts_from_summary(json.loads(summary.read_text(encoding="utf-8")))
    return {}


def check_format(format: Any) -> str:
    """``format`` if it is an export format, else a one-line error naming the formats."""
    if format not in FORMATS:
        raise SentinelError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    return format


def export_model(model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, format: str = "transformers",
                 quiet: bool = False, card: dict[str, Any] | None = None) -> ExportReport:
    """Write ``model`` (and ``tokenizer``, which may be None) to ``out`` as a stock checkpoint.

    :param format: ``"transformers"`` (the smallest stock form) or ``"dense"`` (original shapes).
    :param quiet: do not print the notes (padding, architecture switch, GPT-2's dense form) to stderr.
    :param card: facts for the folder's README.md model card (:mod:`sentinel_core.model_card`).
    :raises SentinelError: what the format cannot express (active grown heads in a dense form,
        an architecture outside GPT-2 and the LLaMA family, a model with no heads left);
        nothing is written then.
    """
    from .surgery import get_adapter

    check_format(format)
    adapter = get_adapter(model)
    model_type = getattr(model.config, "model_type", None)
    if format == "dense":
        report = _export_dense(model, tokenizer, Path(out), notes=[], card=card)
    elif adapter.family == "gpt2":
        note = (f"stock GPT-2 ties the head size to n_embd / n_head, so a GPT-2 checkpoint keeps all "
                f"{adapter.original_num_heads()} head slots of every layer: writing the dense form (removed heads as "
                f"zeros), which saves no parameters or KV cache over the unpruned model")
        report = _export_dense(model, tokenizer, Path(out), notes=[note], card=card)
        report.format = "transformers"
    elif adapter.family == "llama" and model_type in LLAMA_MODEL_TYPES:
        report = _export_llama(model, tokenizer, Path(out), card=card)
    else:
        raise SentinelError(
            f"export --format transformers knows GPT-2 and the LLaMA family ({', '.join(LLAMA_MODEL_TYPES)}); "
            f"this model is {adapter.family} (model_type {model_type!r}): use --format dense"
        )
    if not quiet:
        for note in report.notes:
            log.info(f"export: {note}")
    return report


# ---------------------------------------------------------------- dense (GPT-2's stock form)


def _export_dense(model: nn.Module, tokenizer: Any, out: Path, *, notes: list[str],
                  card: dict[str, Any] | None = None) -> ExportReport:
    from .model_io import save_model
    from .surgery import dense_state_dict, get_head_map

    head_map = get_head_map(model)
    grown = {layer: [i for i in head_map.grown(layer) if i not in head_map.masked(layer)]
             for layer in range(head_map.num_layers)}
    grown = {layer: ids for layer, ids in grown.items() if ids}
    if grown:
        raise SentinelError(
            f"the dense form keeps each layer's {head_map.original_num_heads} original head slots, so the active "
            f"grown heads {grown} (layer: ids) have no place in it; prune or mask them first, or keep the Sentinel "
            f"checkpoint"
        )
    state = dense_state_dict(model)
    save_model(model, tokenizer, out, dense=True, card=card if card is not None else {})
    element = _element_size(model)
    kv = head_map.num_layers * head_map.original_num_kv_heads * 2 * _head_dim(model) * element
    return ExportReport(path=str(out), format="dense", architecture=type(model).__name__,
                        parameters=_unique_elements(state), kv_cache_bytes_per_token=kv, notes=notes)


# ---------------------------------------------------------------- LLaMA family


@dataclass
class StockLayout:
    """How a compact LLaMA-family model maps onto stock layers of one shape.

    ``layouts[l] = (q_src, kv_src)``: for each stock query slot and key/value slot of layer ``l``,
    the compact slot it copies, or ``None`` for an inert zero slot.
    """

    num_kv_heads: int
    group_size: int
    layouts: list[tuple[list[int | None], list[int | None]]]
    padded_query_slots: list[list[int]]  # per layer, stock query slots that are padding
    padded_kv_slots: int

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size


def plan_stock_layout(head_map: Any) -> StockLayout:
    """Fit every layer's active heads into ``K`` groups of ``G`` query heads, the largest any layer needs.

    Masked heads and dead alignment slots are left out (they contribute nothing), key/value
    groups with no active head are dropped, and what is missing is padded.
    """
    per_layer: list[list[list[int]]] = []  # layer -> kept groups -> compact query slots
    for layer in range(head_map.num_layers):
        active = set(head_map.active(layer))
        group = head_map.group_sizes[layer]
        slots = head_map.layers[layer]
        kept = []
        for kv in range(head_map.num_kv_slots(layer)):
            members = [s for s in range(kv * group, (kv + 1) * group) if slots[s] in active]
            if members:
                kept.append((kv, members))
        per_layer.append(kept)
    num_kv = max((len(kept) for kept in per_layer), default=0)
    group_size = max((len(m) for kept in per_layer for _, m in kept), default=0)
    if num_kv == 0:
        raise SentinelError("no attention head is active in any layer; a stock checkpoint needs at least one")
    layouts, padded_q, padded_kv = [], [], 0
    for kept in per_layer:
        q_src: list[int | None] = []
        kv_src: list[int | None] = []
        for kv, members in kept:
            q_src += members + [None] * (group_size - len(members))
            kv_src.append(kv)
        missing = num_kv - len(kept)
        q_src += [None] * (missing * group_size)
        kv_src += [None] * missing
        padded_kv += missing
        layouts.append((q_src, kv_src))
        padded_q.append([slot for slot, src in enumerate(q_src) if src is None])
    return StockLayout(num_kv, group_size, layouts, padded_q, padded_kv)


def stock_llama_config(model: nn.Module, layout: StockLayout, head_dim: int) -> tuple[Any, str | None]:
    """A stock config with the layout's head counts, and a note if the architecture had to change."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import MistralConfig

    from .model_io import _clean_config

    values = _clean_config(model).to_dict()
    values.update(num_attention_heads=layout.num_heads, num_key_value_heads=layout.num_kv_heads, head_dim=head_dim)
    for key in ("_name_or_path", "transformers_version", "model_type", "architectures"):
        values.pop(key, None)
    model_type = model.config.model_type
    try:
        config = type(model.config).from_dict(values)
    except (ValueError, TypeError, StrictDataclassError) as exc:  # config validation
        reason = str(exc).strip().splitlines()[-1].strip().removeprefix("ValueError: ").rstrip(".")
        if model_type != "llama":
            raise SentinelError(f"a stock {model_type} config cannot hold {layout.num_heads} query heads in "
                                f"{layout.num_kv_heads} KV groups: {reason}") from None
        biases = [key for key in _LLAMA_BIASES if values.get(key)]
        if biases:
            raise SentinelError(f"LlamaConfig refuses {layout.num_heads} query heads ({reason}) and this model uses "
                                f"{', '.join(biases)}, which MistralConfig lacks; no stock form fits") from None
        for key in _LLAMA_ONLY:
            values.pop(key, None)
        config = MistralConfig.from_dict({**values, "sliding_window": None})
        config.architectures = ["MistralForCausalLM"]
        note = (f"LlamaConfig in this transformers refuses {layout.num_heads} query heads ({reason}), so the export "
                f"is MistralForCausalLM with sliding_window=None: the same network (RMSNorm, SwiGLU, RoPE, no biases)")
        return config, note
    config.architectures = [type(model).__name__]
    return config, None


def _export_llama(model: nn.Module, tokenizer: Any, out: Path, *, card: dict[str, Any] | None = None) -> ExportReport:
    from transformers import AutoModelForCausalLM

    from .folders import atomic_directory
    from .model_card import write_model_card
    from .model_io import DENSE_KEY, _attn_implementation, _dtype_of
    from .surgery import get_head_map, relaid_state_dict

    head_map = get_head_map(model)
    layout = plan_stock_layout(head_map)
    head_dim = _head_dim(model)
    config, switched = stock_llama_config(model, layout, head_dim)
    state = relaid_state_dict(model, layout.layouts)
    attn = _attn_implementation(model)
    stock = AutoModelForCausalLM.from_config(config, dtype=_dtype_of(model), attn_implementation=attn)
    missing, unexpected = stock.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise SentinelError(f"the stock model does not match the exported weights: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")
    stock.generation_config = copy.deepcopy(getattr(model, "generation_config", stock.generation_config))
    difference = _check_same_function(model, stock)
    padded = {str(layer): slots for layer, slots in enumerate(layout.padded_query_slots) if slots}
    # Informational for plain transformers; sentinel_core.load_model re-gates the padded slots
    # (zero weights are not a mask under training) and restores the attention implementation.
    setattr(stock.config, DENSE_KEY, {"zeroed_heads": padded, "attn_implementation": attn})

    element = _element_size(model)
    hidden = int(model.config.hidden_size)
    q_params, kv_params = _slot_parameters(model, hidden, head_dim)
    padded_q = sum(len(slots) for slots in layout.padded_query_slots)
    padding_parameters = padded_q * q_params + layout.padded_kv_slots * kv_params
    per_token_kv = 2 * head_dim * element
    notes = [switched] if switched else []
    if padded_q or layout.padded_kv_slots:
        compact_kv = sum(head_map.num_kv_slots(layer) for layer in range(head_map.num_layers)) * per_token_kv
        notes.append(
            f"stock {config.model_type} gives every layer the same head counts, so {padded_q} query slots and "
            f"{layout.padded_kv_slots} KV slots were padded with inert zeros to {layout.num_heads} query heads in "
            f"{layout.num_kv_heads} KV groups per layer: +{padding_parameters:,} parameters and "
            f"+{layout.padded_kv_slots * per_token_kv:,} KV-cache bytes per token (the compact model needs "
            f"{compact_kv:,})"
        )
    with atomic_directory(out) as tmp:
        stock.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp, model, card or {}, stored=stock, stock=True, path=out)
    return ExportReport(
        path=str(out), format="transformers", architecture=type(stock).__name__,
        parameters=_unique_elements(stock.state_dict()),
        kv_cache_bytes_per_token=head_map.num_layers * layout.num_kv_heads * per_token_kv,
        num_attention_heads=layout.num_heads, num_key_value_heads=layout.num_kv_heads,
        padded_query_slots=padded_q, padded_kv_slots=layout.padded_kv_slots, padding_parameters=padding_parameters,
        padding_kv_cache_bytes_per_token=layout.padded_kv_slots * per_token_kv, max_logit_difference=difference,
        notes=notes,
    )


def _slot_parameters(model: nn.Module, hidden: int, head_dim: int) -> tuple[int, int]:
    """Parameters of one query slot (q rows and bias, o columns) and one key/value slot (k, v)."""
    attn = model.base_model.layers[0].self_attn
    q_bias = head_dim if attn.q_proj.bias is not None else 0
    kv_bias = 2 * head_dim if attn.k_proj.bias is not None else 0
    return 2 * hidden * head_dim + q_bias, 2 * hidden * head_dim + kv_bias


# ---------------------------------------------------------------- checks and sizes


@torch.no_grad()
def _check_same_function(model: nn.Module, stock: nn.Module) -> float:
    """Run both models on one short input and refuse the export if their logits differ."""
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    ids = (torch.arange(12, device=device) * 7919 % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    stock.to(device).eval()
    try:
        expected = model(ids).logits.float()
        got = stock(ids).logits.float()
    finally:
        stock.to("cpu")
        model.train(was_training)
    difference = float((expected - got).abs().max())
    dtype = _dtype_of_model(model)
    tolerance = (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2) * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise SentinelError(f"the stock model's logits differ from the source model's by {difference:.3g} "
                            f"(allowed {tolerance:.3g}); nothing was written")
    return difference


def _dtype_of_model(model: nn.Module) -> torch.dtype:
    from .model_io import _dtype_of

    return _dtype_of(model)


def _element_size(model: nn.Module) -> int:
    return torch.empty((), dtype=_dtype_of_model(model)).element_size()


def _head_dim(model: nn.Module) -> int:
    from .surgery import get_adapter

    adapter = get_adapter(model)
    return adapter.head_dim(adapter.attention_modules()[0])


def _unique_elements(state: dict[str, torch.Tensor]) -> int:
    """Elements of a state dict, counting tied tensors (same storage) once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in state.values():
        if tensor is None:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel()
    return total
