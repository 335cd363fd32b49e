"""``ExperimentConfig``: every setting of a run, validated when it is built."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SentinelError

DEFAULT_HUB_MODEL = "distilgpt2"
DEFAULT_HUB_DATA = "wikitext:wikitext-2-raw-v1"
PRUNE_MODES = ("remove", "mask")
EXPORT_FORMATS = ("transformers", "dense")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class ExperimentConfig:
    """Settings of one prune / fine-tune / grow experiment.

    ``model_name`` and ``data`` left as None mean the documented defaults (distilgpt2 on
    WikiText-2), or the embedded demo model and corpus when the Hugging Face Hub is unreachable.
    """

    model_name: str | None = None
    pruning_percent: float = 0.3
    num_epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 5e-5
    device: str = "auto"
    output_dir: str = "sentinel_output"
    test_mode: bool = False
    data: str | None = None
    scorer: str = "entropy"
    prune_strategy: str = "global"
    prune_mode: str = "remove"
    min_heads_per_layer: int = 1
    fine_tune: str = "plain"
    growth_strategy: str | None = None
    growth_percent: float = 0.0
    seed: int = 42
    block_size: int = 128
    max_steps: int | None = None
    eval_every: int = 100
    eval_stride: int | None = None
    max_eval_blocks: int | None = None
    patience: int = 3
    warmup_fraction: float = 0.1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200
    calibration_batches: int = 8
    mixed_precision: str = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    quiet: bool = False
    export: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        _check_range("pruning_percent", self.pruning_percent, 0.0, 1.0, "a fraction in [0, 1), e.g. 0.3")
        _check_range("growth_percent", self.growth_percent, 0.0, 1.0, "a fraction in [0, 1), e.g. 0.1")
        for name in ("num_epochs", "batch_size", "block_size", "eval_every", "gradient_accumulation_steps",
                     "checkpoint_every", "calibration_batches"):
            if getattr(self, name) < 1:
                raise SentinelError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.block_size < 2:
            raise SentinelError(f"block_size must be at least 2, got {self.block_size}")
        for name in ("max_steps", "eval_stride", "max_eval_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SentinelError(f"{name} must be a positive integer or unset, got {value}")
        if self.patience < 0 or self.min_heads_per_layer < 0 or self.seed < 0:
            bad = next(n for n in ("patience", "min_heads_per_layer", "seed") if getattr(self, n) < 0)
            raise SentinelError(f"{bad} must be 0 or more, got {getattr(self, bad)}")
        if not self.learning_rate > 0:
            raise SentinelError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise SentinelError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not self.max_grad_norm > 0:
            raise SentinelError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.prune_mode not in PRUNE_MODES:
            raise SentinelError(f"prune_mode must be one of {', '.join(PRUNE_MODES)}, got {self.prune_mode!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise SentinelError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.attn_implementation not in (None, "eager", "sdpa", "flash_attention_2"):
            raise SentinelError(
                f"attn_implementation must be eager, sdpa or flash_attention_2, got {self.attn_implementation!r}"
            )
        if self.export is not None and self.export not in EXPORT_FORMATS:
            raise SentinelError(f"export must be one of {', '.join(EXPORT_FORMATS)} or unset, got {self.export!r}")
        if self.growth_percent > 0 and not self.growth_strategy:
            raise SentinelError("growth_percent is set but growth_strategy is not; pick one, e.g. gradient")
        if self.growth_percent > self.pruning_percent:
            raise SentinelError(
                f"growth_percent {self.growth_percent} exceeds pruning_percent {self.pruning_percent}; "
                "growth can only give back heads that pruning removed"
            )
        resolve_device(self.device)

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if value is None and type(None) in expected:
                continue
            if float in expected and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                names = " or ".join("none" if t is type(None) else t.__name__ for t in expected)
                raise SentinelError(f"{f.name} must be {names}, got {value!r}")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> ExperimentConfig:
        """Load a config from a TOML file (top-level keys, or an ``[experiment]`` table);
        ``overrides`` (e.g. CLI flags) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise SentinelError(f"config file {str(path)!r} does not exist; pass an existing .toml file")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SentinelError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        raw = raw.get("experiment", raw)
        return cls.from_dict({**raw, **overrides})

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


_TYPES: dict[str, tuple[type, ...]] = {
    "model_name": (str, type(None)),
    "pruning_percent": (float,),
    "num_epochs": (int,),
    "batch_size": (int,),
    "learning_rate": (float,),
    "device": (str,),
    "output_dir": (str,),
    "test_mode": (bool,),
    "data": (str, type(None)),
    "scorer": (str,),
    "prune_strategy": (str,),
    "prune_mode": (str,),
    "min_heads_per_layer": (int,),
    "fine_tune": (str,),
    "growth_strategy": (str, type(None)),
    "growth_percent": (float,),
    "seed": (int,),
    "block_size": (int,),
    "max_steps": (int, type(None)),
    "eval_every": (int,),
    "eval_stride": (int, type(None)),
    "max_eval_blocks": (int, type(None)),
    "patience": (int,),
    "warmup_fraction": (float,),
    "gradient_accumulation_steps": (int,),
    "max_grad_norm": (float,),
    "checkpoint_every": (int,),
    "calibration_batches": (int,),
    "mixed_precision": (str,),
    "attn_implementation": (str, type(None)),
    "trust_remote_code": (bool,),
    "quiet": (bool,),
    "export": (str, type(None)),
    "options": (dict,),
}


def _check_range(name: str, value: float, low: float, high: float, what: str) -> None:
    if not low <= value < high:
        raise SentinelError(f"{name} must be {what}, got {value}")


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
