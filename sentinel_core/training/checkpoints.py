"""Step checkpoints inside one training stage: written atomically, found again, loaded back.

A checkpoint is a folder ``<output_dir>/checkpoints/<stage>-steps/step-NNNNNNNN/`` holding

- ``model.safetensors``: the model's state dict (tied tensors stored once; the aliases are in
  the file's metadata),
- ``best.safetensors``: the best-so-far weights, when they differ from the current ones,
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors, and its param
  groups and scalar state as JSON,
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: each process's torch (CPU and CUDA)
  generator states, and Python's and NumPy's as JSON,
- ``trainer_state.json``: the loop's counters, best-so-far, and the fingerprint that says which run
  the checkpoint belongs to (written last).

Nothing is pickled: tensors go through safetensors and everything else through JSON, so
loading a checkpoint never executes code from the file. The folder is written under a
temporary name and renamed into place, so a reader sees a whole checkpoint or none.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import write_json_atomic
from ..tensor_io import all_finite, cpu_state_copy, load_tensors, save_tensors

__all__ = ["all_finite", "cpu_state_copy", "load_tensors", "save_tensors"]  # used through this module too
from ..folders import swap_into_place

# 2: the loop's record is trainer_state.json (it was state.json, the name of the run's own record).
STEP_CHECKPOINT_FORMAT = 2
TRAINER_STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
FINAL = "final"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def stage_dir(output_dir: str | os.PathLike, stage: str) -> Path:
    """Where the step checkpoints of ``stage`` live."""
    return Path(output_dir) / "checkpoints" / f"{stage}-steps"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# -- tensors ---------------------------------------------------------------------------------


# -- optimizer -------------------------------------------------------------------------------


def split_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = _jsonable(value)
    groups = [{k: _jsonable(v) for k, v in group.items()} for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def join_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, _, name = key.partition("/")
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/nan; kept as text, nothing here needs them back
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


# -- random number generators ----------------------------------------------------------------


def torch_rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU and CUDA generator states (cheap: taken before every training step)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return tensors


def rng_state(torch_states: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: torch's as tensors (``torch_states`` when given, e.g. taken
    earlier), Python's and NumPy's as JSON."""
    tensors = dict(torch_states) if torch_states is not None else torch_rng_state()
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    meta = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": np.asarray(np_state["state"]["key"]).tolist(),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
    }
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npm = meta["numpy"]
    np.random.set_state({"bit_generator": npm["bit_generator"],
                         "state": {"key": np.asarray(npm["key"], dtype=np.uint32), "pos": npm["pos"]},
                         "has_gauss": npm["has_gauss"], "gauss": npm["gauss"]})


# -- fingerprints ----------------------------------------------------------------------------


# Values per slice: 32 MiB in float64, glibc's largest mmap threshold, so that every slice is
# mapped and unmapped whole rather than left behind in the heap.
FINGERPRINT_CHUNK = 1 << 22


@torch.no_grad()
def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> list[list[Any]]:
    """Per tensor: name, shape, dtype, and the float64 sum and sum of squares of its values.

    Cheap (a few reductions per tensor on its own device) and enough to tell whether a model
    holds the same weights as the one a checkpoint was written for. The sums run over slices
    of at most ``FINGERPRINT_CHUNK`` values: a float64 copy of a whole embedding matrix and its
    square cost four times the tensor's own size (measured: +0.9 GiB peak on distilgpt2, and
    on a CPU up to 0.4 GiB of it stayed resident for the rest of the run).
    """
    items = list(state.items())
    # Allocated before the slices so that no long-lived result sits between them in the heap.
    values = torch.zeros(len(items), 2, dtype=torch.float64)
    rows: list[list[Any]] = []
    for i, (name, tensor) in enumerate(items):
        rows.append([name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")])
        flat = tensor.detach().reshape(-1)
        total = torch.zeros(2, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
            t = flat[start: start + FINGERPRINT_CHUNK]
            t = t.double() if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool else t.long().double()
            total += torch.stack([t.sum(), (t * t).sum()])
            del t
        values[i] = total.to("cpu")
    for row, (total, squares) in zip(rows, values.tolist(), strict=True):
        row.extend([total, squares])
    return rows


def fingerprints_match(a: list[list[Any]] | None, b: list[list[Any]] | None) -> bool:
    """Same tensors (names, shapes, dtypes) with sums equal up to float rounding."""
    if a is None or b is None or len(a) != len(b):
        return False
    for row_a, row_b in zip(a, b, strict=True):
        if row_a[:3] != row_b[:3]:
            return False
        for x, y in zip(row_a[3:], row_b[3:], strict=True):
            if not math.isclose(x, y, rel_tol=1e-7, abs_tol=1e-9):
                return False
    return True


# -- folders ---------------------------------------------------------------------------------


def list_step_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints in ``directory``, oldest first, as ``(step, path)``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``trainer_state.json`` of checkpoint folder ``path``, or None if it is missing or unreadable."""
    try:
        state = json.loads((Path(path) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("format") != STEP_CHECKPOINT_FORMAT:
        return None
    return state


def temp_dir_for(directory: Path, name: str) -> Path:
    """The temporary folder a checkpoint called ``name`` is assembled in (same for every process)."""
    return directory / f".tmp-{name}"


def begin_checkpoint(directory: Path, name: str) -> Path:
    """Create an empty temporary folder for checkpoint ``name`` (removing a stale one)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(directory, name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(directory: Path, name: str) -> Path:
    """Rename the finished temporary folder into place (replacing an older folder of that name)."""
    tmp = temp_dir_for(directory, name)
    return swap_into_place(tmp, directory / name)


def _is_leftover(name: str) -> bool:
    """A checkpoint being assembled (``.tmp-NAME``) or a replaced one being deleted
    (``.NAME.old-XXXX``, see :func:`sentinel_core.folders.swap_into_place`) when a crash struck."""
    return name.startswith(".tmp-") or (name.startswith(".") and ".old-" in name)


def remove_old(directory: Path, keep: int, *, protect: Callable[[Path], bool] | None = None) -> None:
    """Delete all but the newest ``keep`` step checkpoints, sparing those ``protect`` approves."""
    found = list_step_checkpoints(directory)
    for _, path in found[: max(0, len(found) - keep)]:
        if protect is not None and protect(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
    for child in directory.iterdir() if directory.is_dir() else ():
        if _is_leftover(child.name):
            shutil.rmtree(child, ignore_errors=True)


def clear(directory: Path) -> None:
    """Remove every checkpoint of the stage (a fresh start): only the folders this module names
    (step checkpoints, ``final``, and unfinished ``.tmp-``/``.old-`` ones), never anything else."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        ours = _STEP_DIR.match(child.name) or child.name == FINAL or _is_leftover(child.name)
        if ours and child.is_dir():
            shutil.rmtree(child)


def write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def remove_step_checkpoints(directory: Path) -> None:
    """Delete every step checkpoint (the stage finished; its ``final`` record stays)."""
    for _, path in list_step_checkpoints(directory):
        shutil.rmtree(path, ignore_errors=True)
