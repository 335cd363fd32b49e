"""Declared settings: one description (type, default, help, valid values) per setting, one checker.

Both kinds of settings use it:

- the fields of :class:`sentinel_core.config.ExperimentConfig`, declared with :func:`setting`
  in the field's metadata (as peft does with ``field(default=..., metadata={"help": ...})``);
- the options of a strategy (``config.options``, ``-o KEY=VALUE`` on the command line),
  declared by the strategy that owns them as :class:`Option` objects.

From the one description come the command-line flags, TOML loading, validation with one-line
errors, ``--help`` texts and the reference pages in the docs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SentinelError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
KINDS = (bool, int, float, str)


@dataclass(frozen=True)
class Rule:
    """What values a setting takes: its kind, whether it may be None, choices, and a range.

    ``minimum``/``maximum`` are inclusive unless ``min_exclusive``/``max_exclusive``. ``what``
    overrides the derived description used in errors (``"a fraction in [0, 1), e.g. 0.3"``).
    """

    kind: type
    optional: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    what: str | None = None

    def describe(self) -> str:
        """How errors and help name the valid values: 'a positive integer', 'one of a, b', ..."""
        if self.what:
            return self.what
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        text = _range_text(self.kind, self.minimum, self.maximum, self.min_exclusive, self.max_exclusive)
        return text + (" or unset" if self.optional and text else "")

    def check(self, name: str, value: Any, *, from_text: bool = False) -> Any:
        """Return ``value`` converted to the rule's kind, or raise a one-line SentinelError.

        ``from_text``: the value came from the command line as a string (``-o key=3``), so it is
        parsed ("3" -> 3, "true" -> True) instead of being required to have the type already.
        """
        if value is None:
            if self.optional:
                return None
            raise SentinelError(f"{name} must be {self._kind_name()}, got None")
        if from_text and isinstance(value, str):
            value = _parse(name, value, self)
        value = self._check_kind(name, value)
        if self.choices is not None and value not in self.choices:
            unset = " or unset" if self.optional else ""
            raise SentinelError(f"{name} must be one of {', '.join(str(c) for c in self.choices)}{unset}, "
                                f"got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SentinelError(f"{name} must be a finite number, got {value}")
        if not self._in_range(value):
            raise SentinelError(f"{name} must be {self.describe()}, got {value}")
        return value

    def _kind_name(self) -> str:
        return {bool: "bool", int: "int", float: "float", str: "str"}[self.kind] + (" or none" if self.optional else "")

    def _check_kind(self, name: str, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, self.kind) or (isinstance(value, bool) and self.kind is not bool):
            raise SentinelError(f"{name} must be {self._kind_name()}, got {value!r}")
        return value

    def _in_range(self, value: Any) -> bool:
        if self.kind not in (int, float):
            return True
        if self.minimum is not None and (value < self.minimum or (self.min_exclusive and value == self.minimum)):
            return False
        return not (self.maximum is not None
                    and (value > self.maximum or (self.max_exclusive and value == self.maximum)))


def _range_text(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if kind not in (int, float) or (low is None and high is None):
        return ""
    if high is None:
        if kind is int:
            return {0: "0 or more", 1: "a positive integer"}.get(int(low), f"at least {int(low)}")
        return "positive" if low == 0 and low_open else f"{'above' if low_open else 'at least'} {low:g}"
    if low is None:
        return f"{'below' if high_open else 'at most'} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _parse(name: str, text: str, rule: Rule) -> Any:
    raw = text.strip()
    if rule.optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if rule.kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if rule.kind is int:
            return int(raw)
        if rule.kind is float:
            return float(raw)
    except ValueError:
        raise SentinelError(f"{name} must be {rule._kind_name()}"
                            f"{' (true or false)' if rule.kind is bool else ''}, got {text!r}") from None
    return text


# -- strategy options --------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of a strategy: ``-o NAME=VALUE`` on the command line, ``[options]`` in TOML.

    :param name: the key in ``config.options``; a word of letters, digits and ``_``.
    :param kind: ``bool``, ``int``, ``float`` or ``str``.
    :param default: the value when the user gives none (None only if ``optional``).
    :param help: one line for ``sentinel plugins`` and ``sentinel run --help-strategy``.
    :param choices, minimum, maximum, min_exclusive, max_exclusive, optional, what: the valid
        values (see :class:`Rule`).
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    optional: bool = False
    what: str | None = None
    rule: Rule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"option name {self.name!r} must be a word of letters, digits and '_'")
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name!r} has kind {self.kind!r}; use one of bool, int, float, str")
        if not self.help:
            raise ValueError(f"option {self.name!r} needs a help text")
        rule = Rule(self.kind, self.optional, self.choices, self.minimum, self.maximum, self.min_exclusive,
                    self.max_exclusive, self.what)
        object.__setattr__(self, "rule", rule)
        rule.check(f"the default of option {self.name}", self.default)

    def value(self, config: Any) -> Any:
        """This option's value in ``config.options`` (the default when absent), checked.

        The pipeline checks every option before a run starts; this checks again for strategies
        called directly (from Python), so they never act on a bad value either.
        """
        return self.rule.check(f"option {self.name}", config.options.get(self.name, self.default))

    def describe(self) -> str:
        """``name`` (kind, default D; valid values): help."""
        valid = self.rule.describe()
        kind = {bool: "bool", int: "int", float: "float", str: "str"}[self.kind]
        return f"{self.name} ({kind}, default {self.default!r}{'; ' + valid if valid else ''}): {self.help}"


def resolve_options(declared: Mapping[str, Option], given: Mapping[str, Any], *,
                    owners: Mapping[str, str]) -> dict[str, Any]:
    """Check ``given`` against the ``declared`` options and fill in the defaults.

    :param declared: option name -> Option, for the strategies a run uses.
    :param given: the user's ``config.options``.
    :param owners: option name -> the strategy (or part of Sentinel) that declares it, for errors.
    :return: every declared option with its value (converted to its kind).
    :raises SentinelError: one line for an unknown name or a bad value.
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise SentinelError(f"unknown option {unknown[0]!r} for this run's strategies; they take: {known} "
                            "(see `sentinel run --help-strategy NAME`)")
    resolved = {}
    for name, option in declared.items():
        label = f"option {name} (of {owners.get(name, 'a strategy')})"
        value = given.get(name, option.default)
        resolved[name] = option.rule.check(label, value)
    return resolved


def merge_declarations(groups: Iterable[tuple[str, Iterable[Option]]]) -> tuple[dict[str, Option], dict[str, str]]:
    """Combine the options of several strategies; one name must mean one thing.

    :param groups: ``(owner, options)`` pairs, e.g. ``("fine-tuning strategy 'adaptive'", [...])``.
    :return: ``(name -> Option, name -> owner)``.
    :raises SentinelError: when two owners declare one name differently.
    """
    declared: dict[str, Option] = {}
    owners: dict[str, str] = {}
    for owner, options in groups:
        for option in options:
            if option.name in declared and declared[option.name] != option:
                raise SentinelError(f"option {option.name!r} is declared differently by {owners[option.name]} and "
                                    f"{owner}; rename one of them")
            declared.setdefault(option.name, option)
            owners.setdefault(option.name, owner)
    return declared, owners


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` (from ``-o``) -> ``{"a": "1", "b": "x"}``; one line for a malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SentinelError(f"-o {pair!r} is not KEY=VALUE; e.g. -o max_bad_steps=5")
        out[key] = value
    return out
