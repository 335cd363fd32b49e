"""Atomic writes and strict JSON: a reader never sees a half-written file, even after a crash or
Ctrl-C, and every JSON file or line Sentinel writes parses with any strict JSON reader."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomically write ``text`` as UTF-8 (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_ready(value: Any) -> Any:
    """``value`` with tensors and arrays as lists, and NaN and infinities as None.

    JSON has no NaN or infinity (Python's ``json`` writes ``NaN``, which strict readers such as
    JavaScript's ``JSON.parse`` reject). Where a non-finite number is a result the reader must
    notice, the writer adds a flag beside it (for example ``"finite": false``).
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


def dumps_strict(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_ready` data (strict JSON, never ``NaN``)."""
    return json.dumps(json_ready(data), allow_nan=False, **kwargs)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as strict JSON (see :func:`json_ready`)."""
    write_text_atomic(path, dumps_strict(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
