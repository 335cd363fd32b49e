"""Output folders: Sentinel never deletes or replaces a file that it did not write.

The policy (docs/output-folders.md):

- A **model folder** (what ``save_model``, ``sentinel prune`` and ``sentinel export`` write) is
  written whole: it is assembled in a temporary folder beside the target and renamed into place,
  so a reader never sees half of one. The target must be new, empty, or a model folder that
  Sentinel wrote earlier. Sentinel knows its own folders by the manifest it writes into each
  (``.sentinel-manifest.json``, listing every entry); a folder holding anything the manifest does
  not list is refused with one line, and nothing is touched.
- The current folder (``.``) and the folders above it are never a model folder: replacing them
  would pull the folder out from under the user's shell.
- A **run folder** (``sentinel run --output-dir``) must be new, empty, or a run that Sentinel
  started there (it has ``state.json``). It is locked while a run uses it (:mod:`run_lock`).
- An output folder must neither contain nor lie inside the run's input model or data, so an
  output can never overwrite what it was made from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import SentinelError
from .run_files import RUN_STATE_FILE

MANIFEST = ".sentinel-manifest.json"
# Files of a run folder that belong to its lock, not to the run (see run_lock.py).
LOCK_FILES = (".sentinel.lock", ".sentinel.lock.json")


def _absolute(path: str | os.PathLike) -> Path:
    # abspath, not resolve(): a symlinked folder is judged where the user pointed.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path) or ".")))


def _show(path: str | os.PathLike) -> str:
    return repr(os.fspath(path) or ".")


def _sample(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_manifest(folder: Path) -> set[str] | None:
    """The entries Sentinel recorded as its own in ``folder``, or None when it has no manifest."""
    try:
        record = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files) | {MANIFEST}


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that Sentinel did not write (every entry when there is no manifest)."""
    entries = [child.name for child in folder.iterdir()]
    own = read_manifest(folder) or set()
    return [name for name in entries if name not in own]


def _is_cwd_or_above(path: Path) -> bool:
    cwd = _absolute(os.getcwd())
    return cwd == path or path in cwd.parents


def check_model_folder(target: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Raise SentinelError unless a model folder may be written at ``target``; returns its absolute path."""
    path = _absolute(target)
    if path.exists() and not path.is_dir():
        raise SentinelError(f"{what} {_show(target)} is a file; give the path of a new folder")
    if _is_cwd_or_above(path):
        raise SentinelError(f"{what} {_show(target)} is the current folder or one above it; a model is saved as "
                            "a folder of its own: give a new folder name, e.g. ./pruned")
    if path.is_dir():
        foreign = foreign_entries(path)
        if foreign:
            raise SentinelError(f"{what} {_show(target)} already holds files Sentinel did not write "
                                f"({_sample(foreign)}); give a new or empty folder")
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike, *, what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``target`` in one rename.

    ``target`` must pass :func:`check_model_folder`. Everything written into the temporary
    folder is listed in its manifest. An earlier Sentinel folder at ``target`` is moved aside,
    replaced, and then deleted; it held only Sentinel's own files. On an error the temporary
    folder is removed and ``target`` is untouched.
    """
    path = check_model_folder(target, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _write_manifest(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model is not
        if path.exists():
            check_model_folder(target, what=what)  # nothing foreign arrived while we wrote
        try:
            swap_into_place(tmp, path)
        except OSError as exc:  # another process created a non-empty folder meanwhile
            raise SentinelError(f"{what} {_show(target)} was filled by another process while this one "
                                f"wrote it ({exc.strerror}); nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, target: Path) -> Path:
    """Make the finished folder ``tmp`` become ``target`` (beside it, same file system).

    A folder already at ``target`` is first renamed aside, then deleted once ``tmp`` is in its
    place, so a reader finds the old folder or the new one, never a mix. Callers decide first
    that ``target`` may be replaced (model folders: :func:`check_model_folder`; step
    checkpoints: a folder the training loop itself wrote).
    """
    fsync_dir(tmp)
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "previous")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def _write_manifest(folder: Path) -> None:
    names = sorted(child.name for child in folder.iterdir() if child.name != MANIFEST)
    record = {"written_by": f"sentinel-core {__version__}", "files": names}
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def check_run_folder(output_dir: str | os.PathLike) -> bool:
    """Raise SentinelError if ``output_dir`` holds files that are not a Sentinel run.

    Returns True when it already holds a run (``state.json``), False when it is new or empty.
    """
    path = _absolute(output_dir)
    if path.exists() and not path.is_dir():
        raise SentinelError(f"output_dir {_show(output_dir)} is a file; give the path of a new folder")
    if not path.is_dir():
        return False
    entries = [child.name for child in path.iterdir() if child.name not in LOCK_FILES]
    if RUN_STATE_FILE in entries:
        return True
    if entries:
        raise SentinelError(f"output_dir {_show(output_dir)} already holds files that are not a Sentinel run "
                            f"({_sample(entries)}); give a new or empty folder")
    return False


def check_no_overlap(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *,
                     what: str = "output folder") -> None:
    """Refuse an output folder that is, contains, or lies inside one of the local ``inputs``.

    ``inputs`` maps a name ("model", "data") to a path; names of Hub models or datasets (paths
    that do not exist here) and None are skipped.
    """
    out = _absolute(output)
    for name, source in inputs.items():
        if source is None or not os.path.exists(os.path.expanduser(os.fspath(source))):
            continue
        src = _absolute(source)
        if out == src or out in src.parents:
            raise SentinelError(f"{what} {_show(output)} contains the input {name} {_show(source)}; writing there "
                                "could replace it: give a folder outside it")
        if src in out.parents:
            raise SentinelError(f"{what} {_show(output)} lies inside the input {name} {_show(source)}; give a "
                                "folder outside it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for child in folder.rglob("*"):
        if child.is_file():
            fd = os.open(child, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
