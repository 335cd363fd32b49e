"""Every hook has a pytest-style docstring and a section with its signature in docs/hooks.md."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from sentinel_core import hookspecs

DOC = (Path(__file__).resolve().parents[1] / "docs" / "hooks.md").read_text(encoding="utf-8")
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "sentinel_spec")]


def test_the_hooks_of_the_design_exist():
    assert {"score_heads", "prune", "fine_tune", "grow_heads", "on_metric"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_docstring_is_complete(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc.splitlines()[0].strip(), f"{name} has no summary line"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{name}'s docstring does not describe {param}"
    assert ":return" in doc, f"{name}'s docstring does not say what it returns"
    firstresult = fn.sentinel_spec.get("firstresult", False)
    if firstresult:
        assert "firstresult" in doc
    else:
        assert "not firstresult" in doc or "Broadcast" in doc, f"{name} does not say how results combine"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented_with_signature_and_example(name):
    section = re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", DOC, flags=re.S | re.M)
    assert section, f"docs/hooks.md has no '## {name}' section"
    body = section.group(1)
    params = list(inspect.signature(getattr(hookspecs, name)).parameters)
    signature = re.search(rf"```python\n{name}\((.*?)\)", body, flags=re.S)
    assert signature, f"the {name} section does not show its signature"
    for param in params:
        assert re.search(rf"\b{param}\b", signature.group(1)), f"documented signature of {name} lacks {param}"
    assert "@hookimpl" in body, f"the {name} section has no example implementation"
