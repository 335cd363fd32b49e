"""The README.md model card of a saved model folder: what was removed and grown, how, and what it cost.

A card opens with the YAML front matter the Hugging Face Hub reads (``library_name``,
``base_model`` when the base is a Hub model, ``tags`` including ``pruned``), written by
``huggingface_hub.ModelCardData``. The head table, parameter counts and KV-cache size come from
the model being saved; what only the caller knows (the base model, scorer, recipe, perplexities,
task scores) comes from a ``facts`` dict, which :func:`facts_from_summary` builds from a run's
``summary.json``. :func:`sentinel_core.model_io.save_model` writes the card inside the same
atomic directory as the weights, so a folder never has weights without its card or the reverse.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch import nn

CARD_FILE = "README.md"
TAGS = ["pruned", "attention-head-pruning", "sentinel"]
# A Hub model id: "name" or "org/name" of letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub model id and is not a local path; otherwise None."""
    if not name or name == "demo" or Path(name).expanduser().exists() or not _HUB_ID.match(name):
        return None
    return name


def facts_from_summary(summary: dict[str, Any], *, demo: bool = False) -> dict[str, Any]:
    """The model-card facts of a finished run, from what its ``summary.json`` holds.

    :param demo: the run pruned Sentinel's embedded demo model (its source is then a cache folder).
    """
    config = summary.get("effective_config") or summary.get("config") or {}
    requested = summary.get("config") or {}
    base = requested.get("model_name")
    growth = None
    if config.get("growth_strategy") and config.get("growth_percent"):
        growth = {"strategy": config["growth_strategy"], "percent": config["growth_percent"],
                  "steps": (summary.get("fine_tune_growth") or {}).get("steps")}
    return {
        "base_model": summary.get("model") if base is None else base,
        "demo": demo,
        "data": summary.get("data"),
        "calibration_data": summary.get("data"),
        "scorer": config.get("scorer"),
        "prune_strategy": config.get("prune_strategy"),
        "pruning_percent": config.get("pruning_percent"),
        "prune_mode": (summary.get("heads") or {}).get("prune_mode") or config.get("prune_mode"),
        "fine_tune": {"strategy": config.get("fine_tune"), "steps": (summary.get("fine_tune") or {}).get("steps"),
                      "learning_rate": config.get("learning_rate"), "max_steps": config.get("max_steps"),
                      "num_epochs": config.get("num_epochs")},
        "growth": growth,
        "parameters_before": (summary.get("parameters") or {}).get("before"),
        "kv_bytes_per_token_before": (summary.get("kv_cache") or {}).get("bytes_per_token_before"),
        "perplexity": summary.get("perplexity"),
        "tasks": summary.get("tasks"),
        "speed": summary.get("speed"),
    }


def render_model_card(model: nn.Module, facts: dict[str, Any] | None = None, *, stored: nn.Module | None = None,
                      dense: bool = False, stock: bool = False, path: str | Path | None = None) -> str:
    """The README.md text for a saved model.

    :param model: the model whose heads were changed (its head map gives the per-layer table).
    :param facts: what the caller knows (see :func:`facts_from_summary` for the keys); any may be absent.
    :param stored: the model actually written, when it differs from ``model`` (a dense export in the
        original shapes); its parameters and KV cache are the "after" figures.
    :param dense: whether the folder is a plain transformers checkpoint in the original shapes
        (dense export).
    :param stock: whether it is a plain transformers checkpoint with the pruned head counts
        (``sentinel export --format transformers`` of a LLaMA-family model).
    :param path: the folder, for the loading snippet.
    """
    from huggingface_hub import ModelCardData

    from . import __version__
    from .evaluation import count_parameters
    from .kv_cache import kv_cache_bytes_per_token
    from .surgery import get_head_map

    facts = dict(facts or {})
    stored = stored if stored is not None else model
    head_map = get_head_map(model)
    rows = _head_rows(head_map)
    base = facts.get("base_model")
    hub_id = hub_model_id(base)
    demo = base == "demo" or bool(facts.get("demo"))
    base_text = "Sentinel's embedded demo model (a small GPT-2 trained on Shakespeare)" if demo else (
        f"`{base}`" if base else "an unnamed base model")
    original = head_map.num_layers * head_map.original_num_heads
    removed = sum(len(r["removed"]) for r in rows)
    masked = sum(len(r["masked"]) for r in rows)
    grown = sum(len(r["grown"]) for r in rows)
    working = sum(r["working"] for r in rows)

    front = ModelCardData(library_name="transformers", base_model=hub_id, tags=list(TAGS),
                          pipeline_tag="text-generation").to_yaml()
    changes = [f"{removed} of {original} attention heads removed"]
    if masked:
        changes.append(f"{masked} masked (gated off, still stored)")
    if grown:
        changes.append(f"{grown} grown back")
    lines = [
        "---", front, "---", "",
        f"# {'Sentinel demo model' if demo else Path(str(base or 'Model')).name}, attention heads pruned with Sentinel",
        "",
        f"This model is {base_text} after attention-head pruning with Sentinel (sentinel-core "
        f"{__version__}): {', '.join(changes)}; {working} of {original} heads work.",
    ]
    if stock:
        lines += ["", "This folder is a **stock transformers checkpoint** with the pruned head counts in its "
                      "config (`num_attention_heads`, `num_key_value_heads`): smaller and faster than the base "
                      "model, and it opens without Sentinel."]
    if dense:
        lines += ["", "This folder is a **dense export**: a plain transformers checkpoint in the base model's "
                      "shapes, with the removed heads' weights zeroed. It loads anywhere, but it is no smaller "
                      "or faster than the base model."]
    lines += ["", "## How it was made", "", "| step | setting |", "| --- | --- |"]
    lines += [f"| {step} | {setting} |" for step, setting in _recipe(facts)]
    lines += ["", "## Heads per layer", "",
              "| layer | original | removed | masked | grown | working | removed ids | masked ids | grown ids |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['original']} | {len(r['removed'])} | {len(r['masked'])} | "
                     f"{len(r['grown'])} | {r['working']} | {_ids(r['removed'])} | {_ids(r['masked'])} | "
                     f"{_ids(r['grown'])} |")
    after_params = count_parameters(stored)
    kv_after = kv_cache_bytes_per_token(stored)
    before_params = facts.get("parameters_before") or {}
    lines += ["", "## Size, speed and quality", "", "| | before | after |", "| --- | ---: | ---: |",
              f"| parameters | {_int(before_params.get('total'))} | {_int(after_params['total'])} |",
              f"| attention parameters | {_int(before_params.get('attention'))} | {_int(after_params['attention'])} |",
              f"| KV cache per token | {_bytes(facts.get('kv_bytes_per_token_before'))} | {_bytes(kv_after)} |"]
    lines += _quality_rows(facts)
    lines += ["", *_notes(facts)]
    lines += ["## How to load", "", *_loading(dense or stock, path)]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(directory: str | Path, model: nn.Module, facts: dict[str, Any] | None, **kwargs: Any) -> Path:
    """Render the card and write it as ``directory/README.md`` (inside a folder being assembled)."""
    out = Path(directory) / CARD_FILE
    out.write_text(render_model_card(model, facts, **kwargs), encoding="utf-8")
    return out


# -- pieces ----------------------------------------------------------------------------------------


def _head_rows(head_map: Any) -> list[dict[str, Any]]:
    h = head_map.original_num_heads
    rows = []
    for layer in range(head_map.num_layers):
        present = set(head_map.present(layer))
        rows.append({"layer": layer, "original": h,
                     "removed": [i for i in range(h) if i not in present],
                     "masked": head_map.masked(layer),
                     "grown": head_map.grown(layer),
                     "working": len(head_map.active(layer))})
    return rows


def _recipe(facts: dict[str, Any]) -> list[tuple[str, str]]:
    percent = facts.get("pruning_percent")
    selection = facts.get("prune_strategy") or "?"
    if _finite(percent):
        selection += f" selection of {100 * float(percent):g}% of the original heads"
    if facts.get("prune_mode"):
        selection += f", {'masked' if facts['prune_mode'] == 'mask' else 'removed physically'}"
    rows = [("base model", f"`{facts['base_model']}`" if facts.get("base_model") else "not recorded"),
            ("head scorer", (f"`{facts['scorer']}`" if facts.get("scorer") else "not recorded")
             + (f" on calibration text from `{facts['calibration_data']}`" if facts.get("calibration_data") else "")),
            ("selection", selection)]
    tune = facts.get("fine_tune")
    if tune and tune.get("strategy"):
        parts = [f"`{tune['strategy']}` fine-tuning"]
        if tune.get("steps") is not None:
            parts.append(f"{tune['steps']} steps")
        if tune.get("learning_rate") is not None:
            parts.append(f"learning rate {tune['learning_rate']:g}")
        if facts.get("data"):
            parts.append(f"on `{facts['data']}`")
        rows.append(("recovery", ", ".join(parts)))
    else:
        rows.append(("recovery", "none (pruned only, not fine-tuned)"))
    growth = facts.get("growth")
    if growth:
        text = f"`{growth['strategy']}`, {100 * float(growth['percent']):g}% of the original heads"
        if growth.get("steps") is not None:
            text += f", then {growth['steps']} more fine-tuning steps"
        rows.append(("head growth", text))
    return rows


def _quality_rows(facts: dict[str, Any]) -> list[str]:
    ppl = facts.get("perplexity") or {}
    rows = []
    if _finite(ppl.get("baseline")) or _finite(ppl.get("final")):
        after = _float(ppl.get("final"))
        if _finite(ppl.get("pruned")):
            after += f" (right after pruning: {_float(ppl['pruned'])})"
        rows.append(f"| validation perplexity | {_float(ppl.get('baseline'))} | {after} |")
    else:
        rows.append("| validation perplexity | not measured | not measured |")
    tasks = facts.get("tasks") or {}
    before, after = tasks.get("baseline") or {}, tasks.get("final") or {}
    for task in sorted(set(before) | set(after)):
        for metric in sorted(set((before.get(task) or {}).get("metrics", {})) |
                             set((after.get(task) or {}).get("metrics", {}))):
            b = (before.get(task) or {}).get("metrics", {}).get(metric)
            a = (after.get(task) or {}).get("metrics", {}).get(metric)
            rows.append(f"| {task} {metric} | {_float(b, '.4f')} | {_float(a, '.4f')} |")
    return rows


def _notes(facts: dict[str, Any]) -> list[str]:
    notes = []
    speed = facts.get("speed") or {}
    if _finite(speed.get("ratio")):
        spread = speed.get("ratio_range")
        if speed.get("method") == "interleaved" and isinstance(spread, list) and len(spread) == 2:
            notes.append(f"Speed: {speed['ratio']:.2f}x the base model's tokens/s (median of {speed.get('repeats')} "
                         f"interleaved repeats on {speed.get('device') or 'the run device'}, range "
                         f"{spread[0]:.2f}-{spread[1]:.2f}x).")
        else:
            notes.append(f"Speed: {speed['ratio']:.2f}x the base model's tokens/s, indicative only (one "
                         "evaluation pass each, not interleaved).")
    if facts.get("data"):
        notes.append(f"Perplexity is measured on the validation split of `{facts['data']}`.")
    if facts.get("tasks"):
        notes.append("Task scores come from lm-evaluation-harness.")
    notes.append("The KV cache is counted per token of context: a key and a value vector for every key/value "
                 "head of every layer, in the weights' dtype.")
    return [" ".join(notes), ""]


def _loading(dense: bool, path: str | Path | None) -> list[str]:
    where = str(path) if path is not None else "path/to/this/folder"
    if dense:
        return ["A plain transformers checkpoint:", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model = AutoModelForCausalLM.from_pretrained({where!r})",
                f"tokenizer = AutoTokenizer.from_pretrained({where!r})", "```", "",
                "`sentinel_core.load_model` opens it too, and gates the zeroed (or padded) slots so that they "
                "stay silent if you fine-tune it further."]
    return ["This is a Sentinel checkpoint. Its layers have fewer heads than its config describes, which stock "
            "transformers cannot build, so the weights are stored as `sentinel.safetensors` and plain "
            "`from_pretrained` refuses the folder instead of loading re-initialised weights. Open it with "
            "Sentinel (the `sentinel-core` package):", "", "```python", "from sentinel_core import load_model", "",
            f"model, tokenizer = load_model({where!r})", "```", "",
            "`sentinel export DIR OUT --format transformers` writes a plain transformers checkpoint instead."]


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids) if ids else "–"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "not recorded"


def _float(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if _finite(value) else "not measured"


def _bytes(value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return "not recorded"
    return f"{value:,} B ({value / 1024:.1f} KiB)" if value >= 1024 else f"{value:,} B"
