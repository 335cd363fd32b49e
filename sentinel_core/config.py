"""``ExperimentConfig``: every setting of a run, each declared once, validated when it is built.

Each field carries its help text and its valid values in its metadata (:func:`setting`). The
``sentinel run`` flags (``sentinel_core.cli.run``), TOML loading, validation and the reference
page docs/config.md (:func:`reference_markdown`) are all derived from these declarations.
Strategy options (``options``) are declared by the strategies that own them
(:class:`sentinel_core.options.Option`) and checked by the plugin layer.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from .errors import SentinelError
from .options import Rule

DEFAULT_HUB_MODEL = "distilgpt2"
DEFAULT_HUB_DATA = "wikitext:wikitext-2-raw-v1"
PRUNE_MODES = ("remove", "mask")
EXPORT_FORMATS = ("transformers", "dense")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")

SECTIONS = ("model and data", "pruning", "fine-tuning", "growth", "evaluation", "run")


def setting(default: Any, help: str, *, section: str, flag: str | None = None, choices: tuple | None = None,
            minimum: float | None = None, maximum: float | None = None, min_exclusive: bool = False,
            max_exclusive: bool = False, what: str | None = None, display_only: bool = False,
            default_text: str | None = None) -> Any:
    """A dataclass field with its documentation and valid values in its metadata.

    :param help: one line for ``--help`` and docs/config.md.
    :param section: where docs/config.md lists it (one of :data:`SECTIONS`).
    :param flag: the command-line flag when it is not ``--`` + the name with ``-`` for ``_``.
    :param display_only: changes only what is shown, not results (such flags are accepted with
        ``sentinel run --resume``).
    :param default_text: how help shows the default when the value alone would mislead.
    The remaining parameters are those of :class:`sentinel_core.options.Rule`.
    """
    if section not in SECTIONS:
        raise ValueError(f"section {section!r} is not one of {SECTIONS}")
    metadata = {"help": help, "section": section, "flag": flag, "choices": choices, "minimum": minimum,
                "maximum": maximum, "min_exclusive": min_exclusive, "max_exclusive": max_exclusive, "what": what,
                "display_only": display_only, "default_text": default_text}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ExperimentConfig:
    """Settings of one prune / fine-tune / grow experiment (docs/config.md lists them all).

    ``model_name`` and ``data`` left as None mean the documented defaults (distilgpt2 on
    WikiText-2), or the embedded demo model and corpus when the Hugging Face Hub is unreachable.
    """

    # -- model and data
    model_name: str | None = setting(
        None, "Hub name or local folder of a causal LM, or 'demo'.", section="model and data", flag="--model",
        default_text=f"{DEFAULT_HUB_MODEL}, or demo when the Hub is unreachable")
    data: str | None = setting(
        None, "Hub dataset NAME[:CONFIG], a local .txt/.json/.jsonl/.parquet file or folder, or 'demo'.",
        section="model and data", default_text=f"{DEFAULT_HUB_DATA}, or demo when the Hub is unreachable")
    block_size: int = setting(128, "Tokens per training, calibration and evaluation block.", section="model and data",
                              minimum=2)
    attn_implementation: str | None = setting(
        None, "Attention kernel to load the model with.", section="model and data", choices=ATTN_IMPLEMENTATIONS,
        default_text="the model's own")
    trust_remote_code: bool = setting(False, "Allow a Hub model's own Python code to run.", section="model and data")
    dtype: str = setting("auto", "The dtype to load the model in (auto: as the checkpoint stores it).",
                         section="model and data", choices=DTYPES)
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.", section="model and data")

    # -- pruning
    scorer: str = setting("entropy", "Head-importance strategy (see `sentinel plugins`).", section="pruning")
    pruning_percent: float = setting(0.3, "Fraction of the original heads to remove.", section="pruning",
                                     minimum=0.0, maximum=1.0, max_exclusive=True, what="a fraction in [0, 1), e.g. 0.3")
    prune_strategy: str = setting("global", "Selection policy (see `sentinel plugins`).", section="pruning")
    prune_mode: str = setting("remove", "Remove heads physically, or gate them off.", section="pruning",
                              choices=PRUNE_MODES)
    min_heads_per_layer: int = setting(1, "Never leave a layer with fewer active heads.", section="pruning", minimum=0)
    calibration_batches: int = setting(8, "Batches of training text the scorer sees.", section="pruning", minimum=1)
    prune_rounds: int = setting(1, "Reach the target in N equal pruning steps, each scored afresh and followed by "
                                   "1/N of the fine-tuning steps.", section="pruning", minimum=1)

    # -- fine-tuning
    fine_tune: str = setting("plain", "Fine-tuning strategy (see `sentinel plugins`).", section="fine-tuning")
    num_epochs: int = setting(1, "Fine-tuning epochs (max_steps caps them).", section="fine-tuning", minimum=1)
    max_steps: int | None = setting(None, "Cap on optimizer steps per fine-tuning stage.", section="fine-tuning",
                                    minimum=1, default_text="no cap")
    batch_size: int = setting(8, "Blocks per micro-batch and process.", section="fine-tuning", minimum=1)
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.", section="fine-tuning",
                                               minimum=1)
    learning_rate: float = setting(5e-5, "Peak learning rate.", section="fine-tuning", minimum=0.0,
                                   min_exclusive=True)
    warmup_fraction: float = setting(0.1, "Share of the steps spent warming the learning rate up.",
                                     section="fine-tuning", minimum=0.0, maximum=1.0, max_exclusive=True)
    max_grad_norm: float = setting(1.0, "Gradient-norm clipping threshold.", section="fine-tuning", minimum=0.0,
                                   min_exclusive=True)
    eval_every: int = setting(100, "Evaluate on validation blocks every N steps.", section="fine-tuning", minimum=1)
    patience: int = setting(3, "Stop after N evaluations without improvement (0: never).", section="fine-tuning",
                            minimum=0)
    checkpoint_every: int = setting(200, "Write a resumable step checkpoint every N steps.", section="fine-tuning",
                                    minimum=1)
    mixed_precision: str = setting("auto", "auto: bf16 (or fp16) on GPUs, none on the CPU.", section="fine-tuning",
                                   choices=MIXED_PRECISION)
    master_weights: str = setting("float32", "Weights of a bf16/fp16 model train as a float32 copy with autocast "
                                             "(under LoRA only the adapters do), and are saved in the loaded dtype "
                                             "('model': train in that dtype).",
                                  section="fine-tuning", choices=("float32", "model"))
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: less memory, "
                                                  "about a third more compute.", section="fine-tuning")
    lora_rank: int = setting(0, "Train LoRA adapters of this rank (merged at the end of each stage); 0 trains "
                                "every weight.", section="fine-tuning", minimum=0)
    lora_alpha: float | None = setting(None, "LoRA scaling numerator (the update is alpha / rank x B A).",
                                       section="fine-tuning", minimum=0.0, min_exclusive=True,
                                       default_text="2 x lora_rank")
    lora_target_modules: str = setting("attention,mlp", "What LoRA adapts: attention, mlp, or module names "
                                                        "(q_proj,v_proj).", section="fine-tuning")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA branch's input.", section="fine-tuning", minimum=0.0,
                                  maximum=1.0, max_exclusive=True)

    # -- growth
    growth_strategy: str | None = setting(None, "Where to grow heads back (see `sentinel plugins`).",
                                          section="growth", default_text="no growth")
    growth_percent: float = setting(0.0, "Heads to grow back, as a fraction of the original count.",
                                    section="growth", minimum=0.0, maximum=1.0, max_exclusive=True,
                                    what="a fraction in [0, 1), e.g. 0.1")

    # -- evaluation
    eval_stride: int | None = setting(None, "Sliding-window stride for perplexity.", section="evaluation",
                                      minimum=1, default_text="block_size")
    max_eval_blocks: int | None = setting(None, "Evaluate on the first N validation blocks only.",
                                          section="evaluation", minimum=1, default_text="all")
    sample_prompt: str = setting("The", "Prompt of the text samples generated before and after.",
                                 section="evaluation")
    tasks: str | None = setting(None, "lm-eval tasks to score the baseline and final model on, e.g. hellaswag,piqa.",
                                section="evaluation", default_text="none")
    tasks_include_path: str | None = setting(None, "Folder of local lm-eval task YAMLs.", section="evaluation",
                                             default_text="none")
    tasks_num_fewshot: int | None = setting(None, "Few-shot examples per task.", section="evaluation", minimum=0,
                                            default_text="the task's own")
    tasks_limit: int | None = setting(None, "Score only the first N documents of each task.", section="evaluation",
                                      minimum=1, default_text="all")
    speed_repeats: int = setting(5, "Interleaved timing repeats of the unpruned against the final model (0: skip).",
                                 section="evaluation", minimum=0)

    # -- run
    output_dir: str = setting("sentinel_output", "A new or empty folder for the run (docs/output-folders.md).",
                              section="run")
    seed: int = setting(42, "Random seed (also picks the validation part of single-file data).", section="run",
                        minimum=0)
    test_mode: bool = setting(False, "A few steps on a little data: a smoke test of every stage.", section="run")
    quiet: bool = setting(False, "No progress bars or progress lines (metrics are still logged).", section="run",
                          display_only=True)
    log_every: int = setting(20, "Off a terminal, print a progress line every N training steps.", section="run",
                             minimum=1, display_only=True)
    export: str | None = setting(None, "After the final stage, also write a stock checkpoint to DIR/export "
                                       "(transformers: the smallest one stock transformers opens; dense: original "
                                       "shapes).", section="run", choices=EXPORT_FORMATS, default_text="no export")
    report_to: str = setting("none", "Experiment trackers: a comma list of tensorboard, mlflow, wandb, or none.",
                             section="run", display_only=True)
    options: dict[str, Any] = setting({}, "Strategy options, KEY=VALUE (see `sentinel run --help-strategy NAME`).",
                                      section="run", flag="--option")

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "options":
                if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
                    raise SentinelError(f"options must be a table of KEY = VALUE, got {self.options!r}")
                continue
            setattr(self, f.name, field_rule(f.name).check(f.name, getattr(self, f.name)))
        from .report_to import parse_report_to

        parse_report_to(self.report_to)
        if self.tasks is not None and not [t for t in self.tasks.split(",") if t.strip()]:
            raise SentinelError(f"tasks must be a comma list of lm-eval task names, e.g. hellaswag,piqa; got {self.tasks!r}")
        if self.growth_percent > 0 and not self.growth_strategy:
            raise SentinelError("growth_percent is set but growth_strategy is not; pick one, e.g. gradient")
        if self.growth_percent > self.pruning_percent:
            raise SentinelError(
                f"growth_percent {self.growth_percent} exceeds pruning_percent {self.pruning_percent}; "
                "growth can only give back heads that pruning removed"
            )
        resolve_device(self.device)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> ExperimentConfig:
        """Load a config from a TOML file (top-level keys, or an ``[experiment]`` table);
        ``overrides`` (e.g. CLI flags) win over the file, and ``options`` tables are merged."""
        path = Path(path)
        if not path.is_file():
            raise SentinelError(f"config file {str(path)!r} does not exist; pass an existing .toml file")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SentinelError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        raw = raw.get("experiment", raw)
        merged = {**raw, **overrides}
        if isinstance(raw.get("options"), dict) and "options" in overrides:
            merged["options"] = {**raw["options"], **overrides["options"]}
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SentinelError(
                f"unknown config key {unknown[0]!r}; valid keys are: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)


# -- the declarations, read back -----------------------------------------------------------------


@cache
def _annotations() -> dict[str, Any]:
    return typing.get_type_hints(ExperimentConfig)


def field_kind(name: str) -> tuple[type, bool]:
    """``(kind, optional)`` of a field from its annotation: ``int | None`` -> ``(int, True)``."""
    annotation = _annotations()[name]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    kind = args[0] if optional else annotation
    return typing.get_origin(kind) or kind, optional


@cache
def field_rule(name: str) -> Rule:
    """The :class:`Rule` a field's value must follow, from its annotation and metadata."""
    meta = field_info(name).metadata
    kind, optional = field_kind(name)
    return Rule(kind, optional, meta["choices"], meta["minimum"], meta["maximum"], meta["min_exclusive"],
                meta["max_exclusive"], meta["what"])


@cache
def field_info(name: str) -> dataclasses.Field:
    return next(f for f in fields(ExperimentConfig) if f.name == name)


def flag_name(name: str) -> str:
    """The command-line flag of field ``name``."""
    return field_info(name).metadata["flag"] or "--" + name.replace("_", "-")


def default_text(name: str) -> str:
    """The default of field ``name`` as help and docs show it."""
    info = field_info(name)
    if info.metadata["default_text"]:
        return info.metadata["default_text"]
    default = info.default_factory() if info.default is dataclasses.MISSING else info.default
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default == {} else str(default)


def display_only_fields() -> set[str]:
    """Fields that change only what is shown, not what a run computes."""
    return {f.name for f in fields(ExperimentConfig) if f.metadata["display_only"]}


def reference_markdown() -> str:
    """docs/config.md: every setting with its flag, TOML key, default and valid values."""
    lines = ["# Configuration reference", "",
             "Every setting of `sentinel run` and `ExperimentConfig`. Each one is a flag, a key of a TOML file",
             "(`sentinel run --config experiment.toml`, top level or an `[experiment]` table; flags win over the",
             "file) and a keyword of `ExperimentConfig(...)`. Strategy options go under `[options]` in TOML and",
             "`-o KEY=VALUE` on the command line; `sentinel plugins` and `sentinel run --help-strategy NAME` list",
             "them. This page is generated from the declarations in `sentinel_core/config.py`",
             "(`python -m sentinel_core.config > docs/config.md`), and a test keeps it current.", "",
             "With the embedded demo model, five settings left at these defaults take the demo's own instead",
             "(`learning_rate`, `max_steps`, `eval_every`, `checkpoint_every`, `max_eval_blocks`; see",
             "[demo.md](demo.md)); `summary.json` records both the settings asked for and those that ran.", ""]
    for section in SECTIONS:
        lines += [f"## {section.capitalize()}", "", "| flag | key | default | valid values | what it does |",
                  "|---|---|---|---|---|"]
        for f in fields(ExperimentConfig):
            if f.metadata["section"] != section:
                continue
            flag = flag_name(f.name) + (" (`-o`)" if f.name == "options" else "")
            valid = "" if f.name == "options" else field_rule(f.name).describe()
            kind, optional = field_kind(f.name)
            kind_name = "table" if kind is dict else kind.__name__
            valid = f"{kind_name}{' or none' if optional else ''}{'; ' + valid if valid else ''}"
            shown_only = " Changes only what is shown: accepted with `--resume`." if f.metadata["display_only"] else ""
            lines.append(f"| `{flag}` | `{f.name}` | {default_text(f.name)} | {valid} | "
                         f"{f.metadata['help']}{shown_only} |")
        lines.append("")
    return "\n".join(lines)


def resolve_device(device: str) -> str:
    """Map ``auto`` to the best available device and check that a named one exists."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise SentinelError(f"device {device!r} is not valid; use cuda or cuda:N")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SentinelError(f"device {device!r} is not available: no CUDA GPU found; use cpu or auto")
        if index and int(index) >= count:
            raise SentinelError(f"device {device!r} does not exist: {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        return device
    if device == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise SentinelError("device 'mps' is not available on this machine; use cpu or auto")
        return device
    raise SentinelError(f"device {device!r} is not valid; use auto, cpu, cuda, cuda:N or mps")


if __name__ == "__main__":  # python -m sentinel_core.config > docs/config.md
    print(reference_markdown())
