"""``--report-to``: which experiment trackers a run reports to, and what each one needs installed.

The trackers themselves live in the separately installed ``sentinel-trackers`` plugin; the core only
knows their names, so that a misspelled name or a missing package stops a run before any stage
with one line saying what to install, instead of failing (or silently not tracking) hours later.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import SentinelError

NONE = "none"
# The entry-point name under which the sentinel-trackers plugin registers.
PLUGIN_NAME = "trackers"
PLUGIN_INSTALL = "pip install ./plugins/sentinel-trackers (from a Sentinel checkout)"


@dataclass(frozen=True)
class TrackerRequirement:
    module: str
    pip: str


TRACKERS: dict[str, TrackerRequirement] = {
    "tensorboard": TrackerRequirement("tensorboard", "pip install tensorboard"),
    "mlflow": TrackerRequirement("mlflow", "pip install mlflow-skinny (or mlflow)"),
    "wandb": TrackerRequirement("wandb", "pip install wandb"),
}


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """``"tensorboard, mlflow"`` -> ``("tensorboard", "mlflow")``; ``"none"`` (or empty) -> ``()``.

    :raises SentinelError: for a name that is not a known tracker, naming the known ones.
    """
    if value is None:
        return ()
    names = [name.strip().lower() for name in str(value).split(",") if name.strip()]
    if names == [NONE] or not names:
        return ()
    chosen: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise SentinelError(f"report_to names unknown tracker {name!r}; use a comma list of "
                                f"{', '.join(TRACKERS)}, or {NONE}")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def check_trackers_available(value: str | None) -> tuple[str, ...]:
    """Fail in one line when a requested tracker's plugin or library is not installed.

    :return: the parsed tracker names.
    """
    names = parse_report_to(value)
    if not names:
        return names
    from .plugins import load_plugins, pm

    load_plugins()
    if pm.get_plugin(PLUGIN_NAME) is None:
        raise SentinelError(f"--report-to {','.join(names)} needs the sentinel-trackers plugin: {PLUGIN_INSTALL}")
    for name in names:
        requirement = TRACKERS[name]
        if importlib.util.find_spec(requirement.module) is None:
            raise SentinelError(f"--report-to {name} needs the {requirement.module} package: {requirement.pip}")
    return names
