"""A ``sentinel run`` started by ``torchrun`` or ``accelerate launch``: join the processes, or say
in one line why the run cannot go on under several of them (docs/fine-tuning.md, "Several
processes"). In a single process nothing here does anything.
"""

from __future__ import annotations

from . import distributed
from .config import ExperimentConfig, resolve_device
from .errors import SentinelError


def start_processes(config: ExperimentConfig) -> None:
    """Join the launch's process group for a run with ``config`` (a no-op in one process)."""
    if distributed.world_size() <= 1:
        return
    _refuse_unbuilt_demo(config.model_name)
    distributed.start(resolve_device(config.device))


def _refuse_unbuilt_demo(model_name: str | None) -> None:
    """The demo model trains itself on first use with the training loop, which would take every
    launched process for that training while they wait for each other to load it."""
    from .defaults import DEMO, hub_reachable, is_demo_name

    if model_name is None:
        if hub_reachable():
            return
        model_name = DEMO
    if not is_demo_name(model_name):
        return
    from .demo import demo_model_dir, demo_spec_for
    from .demo.model import INFO_FILE

    spec = demo_spec_for(model_name)
    if not (demo_model_dir(spec) / INFO_FILE).is_file():
        raise SentinelError(f"the {model_name!r} model is not built yet and cannot be built by "
                            f"{distributed.world_size()} processes; build it once in one process "
                            f"(python -m sentinel_core.demo --spec {spec.name}), then launch the run again")
