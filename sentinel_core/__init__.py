"""Sentinel: prune, fine-tune and regrow the attention heads of transformer language models.

The public API is imported lazily so that ``sentinel --help`` does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "ExperimentConfig": ".config",
    "run_experiment": ".pipeline",
    "generate_text": ".generation",
    "save_model": ".model_io",
    "load_model": ".model_io",
    "SentinelError": ".errors",
    "HeadScores": ".results",
    "PruneResult": ".results",
    "FineTuneResult": ".results",
    "GrowthResult": ".results",
    "Strategy": ".results",
    "MetricEvent": ".metrics",
    "Option": ".options",
    "emit": ".plugins",
}

__all__ = [  # noqa: F822 - the lazy names resolve through __getattr__
    "__version__", "hookimpl", "ExperimentConfig", "run_experiment", "generate_text", "save_model", "load_model",
    "SentinelError", "HeadScores", "PruneResult", "FineTuneResult", "GrowthResult", "Strategy", "MetricEvent",
    "Option", "emit",
]

if TYPE_CHECKING:  # pragma: no cover
    from .config import ExperimentConfig
    from .errors import SentinelError
    from .generation import generate_text
    from .metrics import MetricEvent
    from .model_io import load_model, save_model
    from .options import Option
    from .pipeline import run_experiment
    from .plugins import emit
    from .results import FineTuneResult, GrowthResult, HeadScores, PruneResult, Strategy


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sentinel_core' has no attribute {name!r}")
