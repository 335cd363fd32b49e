"""Saving and loading models whose attention heads were masked, removed or grown.

A Sentinel checkpoint is a directory holding:

- ``config.json``: the unchanged HF config (original head counts, so it still validates)
  plus ``sentinel_head_map`` (the HeadMap) and ``sentinel_checkpoint`` (format, dtype and
  attention implementation, so a reload reproduces the logits bit for bit);
- ``sentinel.safetensors``: every tensor, in the compact shapes. The name is deliberately not
  one that transformers looks for, so plain ``from_pretrained`` raises instead of loading a
  model with re-initialised or silently ungated weights;
- the tokenizer files and ``generation_config.json`` when present.

``save_model(..., dense=True)`` instead writes an ordinary transformers checkpoint in the
original shapes, with removed and masked heads zeroed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from sentinel_core.errors import SentinelError
from sentinel_core.folders import atomic_directory

WEIGHTS_NAME = "sentinel.safetensors"
FORMAT_KEY = "sentinel_checkpoint"
DENSE_KEY = "sentinel_dense_export"
MODEL_FORMAT_VERSION = 1
_HUB_PREFIXES = ("/", ".", "~", "\\")


# ---------------------------------------------------------------- helpers


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


DEVICE_MAPS = ("auto", "balanced", "sequential")


def _parse_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from ``dtype`` (``"auto"`` and None: as the checkpoint stores it)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise SentinelError(f"dtype {dtype!r} is not a torch floating dtype; use e.g. 'float32', 'bfloat16', 'float16'")


def _attn_implementation(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def _transient_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Dtypes of floating buffers that are not saved (e.g. rotary ``inv_freq``).

    A model cast with ``.to(bfloat16)`` has bf16 rotary buffers, while one built in bf16 keeps
    them in float32; recording them lets a reload reproduce the logits bit for bit.
    """
    from sentinel_core.surgery.gates import GATE_BUFFER

    saved = set(model.state_dict())
    return {
        name: str(buf.dtype).removeprefix("torch.")
        for name, buf in model.named_buffers()
        if buf.is_floating_point() and name not in saved and not name.endswith(GATE_BUFFER)
    }


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    buffers = dict(model.named_buffers())
    for name, dtype in dtypes.items():
        value = getattr(torch, str(dtype), None)
        if name in buffers and isinstance(value, torch.dtype) and buffers[name].dtype != value:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = buffers[name].to(value)


def _clean_config(model: nn.Module) -> Any:
    from sentinel_core.surgery import CONFIG_KEY

    config = copy.deepcopy(model.config)
    for key in (CONFIG_KEY, FORMAT_KEY, DENSE_KEY):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(model).__name__]
    return config


def _save_extras(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------- saving


def save_model(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, dense: bool = False,
               card: dict[str, Any] | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Save ``model`` (and ``tokenizer``, which may be None) to the directory ``path``, atomically.

    ``dense=False`` writes a Sentinel checkpoint (compact shapes, head map, gates), opened with
    :func:`load_model`; plain ``from_pretrained`` refuses it. ``dense=True`` writes an ordinary
    transformers checkpoint in the original shapes with removed and masked heads zeroed; it
    raises SentinelError if grown heads are active. ``card``, when given, holds the facts for a
    README.md model card (see :mod:`sentinel_core.model_card`), written into the same folder.
    Weights larger than ``max_shard_size`` (``"5GB"``, or bytes) are split into shards with an
    index, as ``save_pretrained`` does. Returns the directory.
    """
    from sentinel_core.surgery import CONFIG_KEY, dense_state_dict, get_head_map

    target = Path(path)
    head_map = get_head_map(model)
    if dense:
        state = dense_state_dict(model)
        config = _clean_config(model)
        h = head_map.original_num_heads
        zeroed = {
            str(layer): sorted(i for i in set(head_map.removed(layer)) | set(head_map.masked(layer)) if i < h)
            for layer in range(head_map.num_layers)
        }
        # Informational for plain transformers; load_model uses it to re-gate the zeroed heads
        # and to restore the attention implementation.
        setattr(
            config,
            DENSE_KEY,
            {
                "zeroed_heads": {k: v for k, v in zeroed.items() if v},
                "attn_implementation": _attn_implementation(model),
            },
        )
        from transformers import AutoModelForCausalLM

        dense_model = AutoModelForCausalLM.from_config(
            config, dtype=_dtype_of(model), attn_implementation=_attn_implementation(model)
        )
        dense_model.load_state_dict(state, strict=True)
        dense_model.generation_config = copy.deepcopy(
            getattr(model, "generation_config", dense_model.generation_config)
        )
        with atomic_directory(target) as tmp:
            dense_model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if card is not None:
                from sentinel_core.model_card import write_model_card

                write_model_card(tmp, model, card, stored=dense_model, dense=True, path=target)
        return target

    config = _clean_config(model)
    setattr(config, CONFIG_KEY, head_map.to_dict())
    setattr(
        config,
        FORMAT_KEY,
        {
            "format_version": MODEL_FORMAT_VERSION,
            "weights": WEIGHTS_NAME,
            "dtype": str(_dtype_of(model)).removeprefix("torch."),
            "attn_implementation": _attn_implementation(model),
            "buffer_dtypes": _transient_buffer_dtypes(model),
        },
    )
    with atomic_directory(target) as tmp:
        config.save_pretrained(tmp)
        write_weights(tmp, model.state_dict(), max_shard_size=max_shard_size)
        _save_extras(model, tokenizer, tmp)
        if card is not None:
            from sentinel_core.model_card import write_model_card

            write_model_card(tmp, model, card, path=target)
    return target


INDEX_NAME = WEIGHTS_NAME + ".index.json"


def write_weights(directory: Path, state: dict[str, torch.Tensor], *, max_shard_size: int | str = "5GB") -> list[str]:
    """Write a model's tensors as ``sentinel.safetensors``, or as shards
    ``sentinel-00001-of-0000N.safetensors`` plus ``sentinel.safetensors.index.json`` (the layout
    ``save_pretrained`` uses) when they exceed ``max_shard_size``. Tied tensors are stored once and
    recorded as aliases. Returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from sentinel_core.tensor_io import ALIASES_KEY, save_tensors, unique_tensors

    tensors, aliases = unique_tensors(state)
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="sentinel{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    meta = {"format": "pt", "sentinel_format": str(MODEL_FORMAT_VERSION)}
    if not split.is_sharded:
        save_tensors(directory / WEIGHTS_NAME, state, metadata=meta)
        return [WEIGHTS_NAME]
    for filename, names in split.filename_to_tensors.items():
        save_tensors(directory / filename, {name: tensors[name] for name in names}, metadata=meta)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                          ALIASES_KEY: aliases, "sentinel_format": MODEL_FORMAT_VERSION},
             "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*split.filename_to_tensors, INDEX_NAME]


def has_weights(directory: Path) -> bool:
    """Whether ``directory`` holds Sentinel weights (one file or an index of shards)."""
    return (directory / WEIGHTS_NAME).is_file() or (directory / INDEX_NAME).is_file()


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors :func:`write_weights` wrote (aliases restored), on the CPU."""
    from sentinel_core.tensor_io import ALIASES_KEY, load_tensors

    try:
        if (directory / INDEX_NAME).is_file():
            index = json.loads((directory / INDEX_NAME).read_text(encoding="utf-8"))
            state: dict[str, torch.Tensor] = {}
            for filename in sorted(set(index["weight_map"].values())):
                state.update(load_tensors(directory / filename))
            for alias, name in (index.get("metadata", {}).get(ALIASES_KEY) or {}).items():
                state[alias] = state[name]
            return state
        return load_tensors(directory / WEIGHTS_NAME)
    except SafetensorError as exc:
        raise SentinelError(f"the weights in {str(directory)!r} are unreadable ({_first_line(exc)}); a file is "
                            "truncated or not safetensors") from None
    except (OSError, ValueError, KeyError) as exc:
        raise SentinelError(f"the weights in {str(directory)!r} are incomplete ({_first_line(exc)}); "
                            "copy the folder again") from None


# ---------------------------------------------------------------- loading


def _looks_local(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else that is not a directory is a bad path.
    return name.startswith(_HUB_PREFIXES) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    directory = Path(path)
    markers = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
    if directory.is_dir() and not any((directory / m).exists() for m in markers):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        if directory.is_dir():
            raise SentinelError(f"the tokenizer in {path!r} cannot be read ({str(exc).splitlines()[0]})") from None
        return None


def _load_sentinel(
    directory: Path,
    dtype: torch.dtype | None,
    attn_implementation: str | None,
    trust_remote_code: bool,
) -> nn.Module:
    """Build the compact model without random weights, then put the saved tensors in.

    Parameters are created on the meta device (``init_empty_weights``: no memory, no random
    initialisation), reshaped by the head map, and then take the loaded tensors themselves
    (``assign``), so loading costs about the size of the weights once. Buffers (rotary
    frequencies) are built normally; the head gates, which live on the meta-device projections
    until then, are rebuilt from the head map at the end.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from sentinel_core.surgery import CONFIG_KEY, HeadMap, apply_head_map

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    record = getattr(config, FORMAT_KEY, None) or {}
    if record.get("format_version") != MODEL_FORMAT_VERSION:
        raise SentinelError(
            f"{str(directory)!r} has Sentinel checkpoint format {record.get('format_version')!r}; "
            f"this Sentinel reads format {MODEL_FORMAT_VERSION}"
        )
    head_map_data = getattr(config, CONFIG_KEY, None)
    if head_map_data is None:
        raise SentinelError(f"{str(directory)!r} has {WEIGHTS_NAME} but its config.json lacks {CONFIG_KEY}")
    head_map = HeadMap.from_dict(head_map_data)
    stored = _parse_dtype(record.get("dtype", "float32"))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype or stored,
            attn_implementation=attn_implementation or record.get("attn_implementation"),
            trust_remote_code=trust_remote_code,
        )
    if hasattr(model.config, FORMAT_KEY):
        delattr(model.config, FORMAT_KEY)  # describes the files, not the live model
    apply_head_map(model, head_map)
    if dtype is None:
        _restore_buffer_dtypes(model, record.get("buffer_dtypes") or {})
    state = read_weights(directory)
    if dtype is not None and dtype != stored:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if unexpected:
        raise SentinelError(f"{str(directory)!r}: the weights file does not match its config: unexpected "
                            f"{unexpected[:3]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise SentinelError(f"{str(directory)!r}: the weights file does not match its head map ({detail[:200]})") \
            from None
    # Tied weights (GPT-2's lm_head and wte) are one tensor in the file; assign made two
    # parameters of it, and a file without aliases left one missing: tie them again.
    model.tie_weights()
    if missing:
        still = [name for name, t in model.state_dict().items() if t.is_meta]
        if still:
            raise SentinelError(f"{str(directory)!r}: the weights file does not match its config: missing {still[:3]}")
    _rebuild_gates(model, head_map)
    if (directory / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def _rebuild_gates(model: nn.Module, head_map: Any) -> None:
    """Head gates from the head map (0 for masked heads and dead slots), on the weights' devices."""
    from sentinel_core.surgery import gates, get_adapter

    adapter = get_adapter(model)
    for layer, attn in enumerate(adapter.attention_modules()):
        slots = head_map.layers[layer]
        masked = set(head_map.masked_ids[layer])
        values = torch.tensor([0.0 if i is None or i in masked else 1.0 for i in slots])
        proj = adapter.output_projection(attn)
        if gates.has_gate(proj) or bool((values != 1).any()):
            gates.write_gate(proj, values)


def _dense_record(directory: Path) -> dict[str, Any]:
    import json

    try:
        record = json.loads((directory / "config.json").read_text(encoding="utf-8")).get(DENSE_KEY)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _load_plain(
    name: str, dtype: torch.dtype | None, attn_implementation: str | None, trust_remote_code: bool
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is None and Path(name).is_dir():
        attn_implementation = _dense_record(Path(name)).get("attn_implementation")
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if Path(name).is_dir():
        _refuse_pickle_only(Path(name))
    try:
        # Weights only from safetensors: a pickle (pytorch_model.bin) is a program for the
        # unpickler; torch.load's weights_only mode restricts it but has had bypasses (CVE-2025-32434).
        model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs)
    except SafetensorError as exc:
        raise SentinelError(f"the weights of {name!r} are unreadable ({_first_line(exc)}); the file is truncated "
                            "or not safetensors: copy or download it again") from None
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if "Unrecognized configuration class" in message or "AutoModelForCausalLM" in message:
            raise SentinelError(
                f"{name!r} is not a causal language model ({message[:160]}); Sentinel needs a model "
                f"that AutoModelForCausalLM can open, such as gpt2 or a LLaMA-family model"
            ) from None
        raise SentinelError(f"cannot open model {name!r}: {message[:200]}") from None
    except OSError as exc:
        message = _first_line(exc)
        if "model.safetensors" in message and not Path(name).is_dir():
            raise SentinelError(f"hub model {name!r} has no safetensors weights ({message[:120]}); Sentinel loads "
                                "weights only from safetensors, never from pickles") from None
        raise SentinelError(
            f"cannot open model {name!r}: {message[:200]}; give a local model directory or a hub model name"
        ) from None
    except RuntimeError as exc:  # e.g. a size mismatch between config and weights
        raise SentinelError(f"cannot load the weights of {name!r}: {str(exc).splitlines()[0][:200]}") from None
    dense = getattr(model.config, DENSE_KEY, None)
    if isinstance(dense, dict) and dense.get("zeroed_heads"):
        # The zeroed heads would come back under fine-tuning; gate them so they stay silent.
        from sentinel_core.surgery import mask_heads

        mask_heads(model, {int(layer): ids for layer, ids in dense["zeroed_heads"].items()})
    return model


@torch.no_grad()
def check_finite_weights(model: nn.Module, name: str | os.PathLike) -> None:
    """Raise SentinelError naming the first parameter or buffer of ``model`` that holds NaN or inf.

    Such a model gives NaN logits: every perplexity, score and sample from it would be
    meaningless, and sampling from it fails deep inside ``generate``.
    """
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_floating_point() and t.numel()]
    if not tensors:
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
    if not bool(flags.all()):
        bad = tensors[int((~flags).nonzero()[0])][0]
        raise SentinelError(f"model {os.fspath(name)!r} has NaN or infinite weights (first in {bad}); "
                            "its outputs would be meaningless: use a checkpoint from before it diverged")


def check_model_inputs(model: nn.Module, tokenizer: Any, name: str | os.PathLike, block_size: int | None) -> None:
    """What every command that runs a loaded model checks first, each as one line: finite
    weights, a tokenizer, and a block size within the model's positions."""
    from sentinel_core.evaluation import max_positions

    check_finite_weights(model, name)
    if tokenizer is None:
        raise SentinelError(f"model {os.fspath(name)!r} has no tokenizer files; save its tokenizer with the model")
    limit = max_positions(model)
    if block_size is not None and limit is not None and block_size > limit:
        raise SentinelError(f"block_size {block_size} exceeds the {limit} positions of model {os.fspath(name)!r}; "
                            f"use --block-size {limit} or less")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only(directory: Path) -> None:
    """One line instead of a pickle load, when a folder's weights exist only as pickles."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise SentinelError(
            f"{str(directory)!r} holds its weights only as a pickle ({pickles[0]}), which can run code when "
            "loaded; Sentinel reads safetensors only: convert it where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> tuple[nn.Module, Any]:
    """Open a Sentinel checkpoint, or any HF causal-LM directory or hub name; returns ``(model, tokenizer)``.

    A Sentinel checkpoint is rebuilt from its head map and reloaded with the dtype and attention
    implementation it was saved with (unless overridden), giving bit-identical logits. Its
    parameters are never initialised at random first: they are the loaded tensors. ``dtype``
    ``"auto"`` (or None) keeps the stored dtype. ``device_map`` (``"auto"``, ``"balanced"``,
    ``"sequential"``) spreads the layers over the GPUs and the CPU with Accelerate, for models
    larger than one device; it is for scoring, evaluation and generation, not training. The
    tokenizer is None when the directory has none. The model is returned in eval mode.
    """
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise SentinelError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    dtype = _parse_dtype(dtype)
    name = os.fspath(name_or_path)
    directory = Path(name).expanduser()
    if directory.is_file():
        raise SentinelError(f"model path {name!r} is a file; give the folder that holds config.json and the weights")
    if directory.is_dir():
        if not (directory / "config.json").exists():
            raise SentinelError(
                f"{name!r} has no config.json; give a directory written by save_model or save_pretrained"
            )
        if has_weights(directory):
            model = _load_sentinel(directory, dtype, attn_implementation, trust_remote_code)
        elif "sentinel_head_map" in (directory / "config.json").read_text(encoding="utf-8"):
            raise SentinelError(
                f"{name!r} holds a model with head surgery saved by save_pretrained, which drops the head "
                f"layout and gates; save it with sentinel_core.save_model instead"
            )
        else:
            model = _load_plain(str(directory), dtype, attn_implementation, trust_remote_code)
        tokenizer = _load_tokenizer(str(directory), trust_remote_code)
    elif _looks_local(name):
        raise SentinelError(
            f"model path {name!r} does not exist; give a directory written by save_model or save_pretrained"
        )
    else:
        model = _load_plain(name, dtype, attn_implementation, trust_remote_code)
        tokenizer = _load_tokenizer(name, trust_remote_code)
    if device_map is not None:
        model = _dispatch(model, device_map)
    elif device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _dispatch(model: nn.Module, device_map: str) -> nn.Module:
    """Place ``model``'s layers with Accelerate's big-model inference (``infer_auto_device_map``)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split, dtype=_dtype_of(model))
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                      dtype=_dtype_of(model))
    return dispatch_model(model, device_map=placement)
