"""Language-model data: load text through Hugging Face ``datasets``, tokenise, split and pack.

``load_data(spec, tokenizer)`` accepts a Hub dataset (``NAME`` or ``NAME:CONFIG``), a local
``.txt``/``.json``/``.jsonl``/``.parquet`` file, a folder of such files, or ``demo``. It returns
an :class:`LMData` whose splits carry the whole token stream (``ids``, for sliding-window
evaluation) and the same stream packed into fixed-length blocks (``blocks``, for training and
calibration). ``batches`` and ``collate`` turn blocks or ragged sequences into model inputs.
"""

from __future__ import annotations

import collections
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sentinel_core.errors import SentinelError

__all__ = [
    "FileSplits",
    "IGNORE_INDEX",
    "LMData",
    "TokenSplit",
    "SUPPORTED_EXTENSIONS",
    "load_data",
    "batches",
    "calibration_batches",
    "collate",
    "clear_cache",
]

# Extension -> datasets packaged builder.
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_SUPPORTED_TEXT = ", ".join(SUPPORTED_EXTENSIONS)

# File-name words that place a file of a folder into a split (as datasets' own conventions do).
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}

# At most this many contiguous row chunks per split: the unit of the train/validation split and
# of tokenisation. Enough for a fine-grained split, few enough that per-call overhead is small.
_MAX_CHUNKS = 1000

# Suffixes that mark a spec as a file path rather than a Hub dataset name.
_PATHLIKE_SUFFIXES = {".txt", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".gz", ".md", ".arrow",
                      ".zip", ".xz", ".bz2", ".zst", ".text", ".raw", ".tokens"}

# The label of positions that no loss counts (padding): PyTorch's cross_entropy default.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenSplit:
    """One split: the whole token stream and the stream packed into blocks.

    ``blocks`` is ``ids[: n_blocks * block_size].view(n_blocks, block_size)`` (the remainder of
    the last block is dropped), so the two share memory: treat both as read-only.
    """

    ids: torch.Tensor
    blocks: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Length of the token stream."""
        return int(self.ids.numel())

    @property
    def num_blocks(self) -> int:
        """Number of packed blocks."""
        return int(self.blocks.shape[0])


@dataclass(frozen=True)
class LMData:
    """Tokenised train/validation(/test) splits of one source."""

    train: TokenSplit
    validation: TokenSplit
    test: TokenSplit | None
    block_size: int
    source: str
    # True when validation was carved out of the training text by load_data (the source had
    # no validation split of its own).
    validation_from_train: bool


# --------------------------------------------------------------------------------------------
# In-process cache: repeated load_data calls in one process (e.g. a pipeline that evaluates
# several times) reuse the tensors instead of re-reading Arrow files.
_CACHE_SIZE = 4
_cache: collections.OrderedDict[tuple, LMData] = collections.OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every LMData kept by this process (datasets' on-disk cache is not touched)."""
    with _cache_lock:
        _cache.clear()


@dataclass(frozen=True)
class FileSplits:
    """Text files already assigned to splits, under one name for messages.

    ``files`` maps ``train`` (required), ``validation`` and ``test`` to lists of paths of one
    supported kind. ``sentinel_core.defaults.resolve_data("demo")`` gives the embedded corpus
    in this form.
    """

    label: str
    files: dict[str, list[str]]


def load_data(
    spec: str | FileSplits,
    tokenizer: Any,
    *,
    block_size: int = 128,
    seed: int = 0,
    validation_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
) -> LMData:
    """Load, tokenise, split and pack a text source.

    Args:
        spec: ``NAME`` or ``NAME:CONFIG`` on the Hugging Face Hub (e.g.
            ``wikitext:wikitext-2-raw-v1``), a local ``.txt``/``.json``/``.jsonl``/``.parquet``
            file, a folder of files of one of those kinds, or :class:`FileSplits`. The name
            ``demo`` is resolved by :func:`sentinel_core.defaults.resolve_data`.
        tokenizer: a Hugging Face tokenizer. Text is encoded without added special tokens;
            documents are joined with the EOS token when the tokenizer has one.
        block_size: length of packed blocks (>= 2).
        seed: seeds the train/validation split when the source has no validation split.
        validation_fraction: share of the text held out for validation in that case.
        cache_dir: datasets cache folder (default: datasets' own).

    Returns:
        LMData with ``train``, ``validation`` and optionally ``test`` splits.

    Raises:
        SentinelError: for a missing, empty, too short or unsupported source or bad arguments.
    """
    if not isinstance(spec, FileSplits) and (not isinstance(spec, str) or not spec.strip()):
        raise SentinelError(f"data spec {spec!r} is empty; give a Hub dataset name, a local "
                            f"{_SUPPORTED_TEXT} file or folder, or 'demo'")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise SentinelError(f"block_size={block_size!r} is too small; use an integer >= 2")
    if not (isinstance(validation_fraction, (int, float)) and 0.0 < validation_fraction < 1.0):
        raise SentinelError(f"validation_fraction={validation_fraction!r} must be between 0 and 1 "
                            "(exclusive), e.g. 0.1")
    source = _resolve(spec)

    from datasets.fingerprint import Hasher

    key = (source.key, Hasher.hash(tokenizer), block_size, seed, float(validation_fraction),
           str(cache_dir) if cache_dir is not None else None)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]

    data = _build(source, tokenizer, block_size=block_size, seed=seed,
                  validation_fraction=validation_fraction, cache_dir=cache_dir)
    with _cache_lock:
        _cache[key] = data
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return data


# --------------------------------------------------------------------------------------------
# Resolving a spec into what datasets.load_dataset needs.


@dataclass(frozen=True)
class _Source:
    label: str  # how messages name the source
    builder: str  # "text" | "json" | "parquet" | hub dataset name
    config: str | None
    data_files: dict[str, list[str]] | None
    key: tuple  # identifies content for the in-process cache

    @property
    def is_hub(self) -> bool:
        return self.data_files is None


def _resolve(spec: str | FileSplits) -> _Source:
    if isinstance(spec, FileSplits):
        return _resolve_file_splits(spec)
    spec = spec.strip()
    if spec == "demo":
        raise SentinelError("data spec 'demo' names the embedded corpus; resolve it first with "
                            "sentinel_core.defaults.resolve_data('demo')")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _resolve_folder(path)
    if os.path.isfile(path):
        return _resolve_file(path)
    if _looks_like_path(spec):
        raise SentinelError(f"data file or folder {spec!r} not found; check the path, or give a "
                            "Hub dataset name like 'wikitext:wikitext-2-raw-v1', or 'demo'")
    name, _, config = spec.partition(":")
    if not name or ":" in config:
        raise SentinelError(f"data spec {spec!r} is not NAME or NAME:CONFIG; e.g. "
                            "'wikitext:wikitext-2-raw-v1'")
    return _Source(spec, name, config or None, None, ("hub", name, config or None))


def _resolve_file_splits(spec: FileSplits) -> _Source:
    files = {split: [os.path.abspath(os.fspath(p)) for p in paths] for split, paths in spec.files.items() if paths}
    if "train" not in files:
        raise SentinelError(f"data {spec.label!r} has no training files; give FileSplits with a 'train' list")
    kinds = {SUPPORTED_EXTENSIONS.get(os.path.splitext(p)[1].lower()) for paths in files.values() for p in paths}
    if len(kinds) != 1 or None in kinds:
        raise SentinelError(f"data {spec.label!r} mixes file kinds or has unsupported ones; use one of "
                            f"{_SUPPORTED_TEXT}")
    missing = [p for paths in files.values() for p in paths if not os.path.isfile(p)]
    if missing:
        raise SentinelError(f"data {spec.label!r} lists {missing[0]!r}, which does not exist")
    return _Source(spec.label, kinds.pop(), None, files, ("files", _file_stats(files)))


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    return os.path.splitext(spec)[1].lower() in _PATHLIKE_SUFFIXES


def _resolve_file(path: str) -> _Source:
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise SentinelError(f"data file {path!r} has unsupported type {ext or '(no extension)'!r}; "
                            f"use one of {_SUPPORTED_TEXT}")
    if os.path.getsize(path) == 0:
        raise SentinelError(f"data file {path!r} is empty; give a file with text in it")
    files = {"train": [os.path.abspath(path)]}
    return _Source(path, SUPPORTED_EXTENSIONS[ext], None, files, ("files", _file_stats(files)))


def _resolve_folder(folder: str) -> _Source:
    found: list[str] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    usable = [f for f in found if os.path.splitext(f)[1].lower() in SUPPORTED_EXTENSIONS]
    if not usable:
        seen = sorted({os.path.splitext(f)[1].lower() or "(none)" for f in found})
        raise SentinelError(f"data folder {folder!r} has no {_SUPPORTED_TEXT} files"
                            + (f" (found {', '.join(seen)})" if seen else " (it is empty)"))
    kinds = sorted({SUPPORTED_EXTENSIONS[os.path.splitext(f)[1].lower()] for f in usable})
    if len(kinds) > 1:
        raise SentinelError(f"data folder {folder!r} mixes file kinds ({', '.join(kinds)}); "
                            "keep files of one kind (.txt, .json/.jsonl or .parquet) per folder")
    # Empty files contribute nothing, and some builders choke on them.
    nonempty = [f for f in usable if os.path.getsize(f) > 0]
    if not nonempty:
        raise SentinelError(f"data folder {folder!r} has only empty files; give files with text")

    files: dict[str, list[str]] = {}
    for f in nonempty:
        rel = os.path.relpath(f, folder)
        words = re.split(r"[^a-z]+", os.path.splitext(rel)[0].lower())
        split = next((_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS), "train")
        files.setdefault(split, []).append(os.path.abspath(f))
    if "train" not in files:
        raise SentinelError(f"data folder {folder!r} has {', '.join(sorted(files))} files but no "
                            "training text; add a file without a split word or named '*train*'")
    return _Source(folder, kinds[0], None, files, ("files", _file_stats(files)))


def _file_stats(files: dict[str, list[str]]) -> tuple:
    out = []
    for split in sorted(files):
        for f in files[split]:
            st = os.stat(f)
            out.append((split, os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Loading and tokenising.


def _load(source: _Source, cache_dir: str | os.PathLike | None):
    import datasets

    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    if not source.is_hub:
        if source.builder == "text":
            # Keep "\n" so joining rows reproduces the file text exactly.
            kwargs["keep_linebreaks"] = True
        try:
            return datasets.load_dataset(source.builder, data_files=source.data_files, **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable files
            decode = _cause(exc, UnicodeDecodeError)
            if decode is not None:
                raise SentinelError(_not_utf8(source, decode)) from exc
            raise SentinelError(f"could not read {source.label!r} as {source.builder}: "
                                f"{_one_line(exc)}") from exc
    try:
        return datasets.load_dataset(source.builder, source.config, **kwargs)
    except Exception as exc:  # network, missing dataset, missing config: all user-fixable
        raise SentinelError(
            f"could not load {source.label!r} from the Hugging Face Hub ({_one_line(exc)}); no local "
            f"file or folder has that name; check the name and network, or use a local "
            f"{_SUPPORTED_TEXT} file or folder, or 'demo'"
        ) from exc


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``'s chain of causes (datasets wraps them)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _not_utf8(source: _Source, error: UnicodeDecodeError) -> str:
    """Name the file and the first bad byte: text must be UTF-8 (datasets reads nothing else)."""
    for path in (p for paths in (source.data_files or {}).values() for p in paths):
        bad = _first_non_utf8_byte(path)
        if bad is not None:
            offset, byte = bad
            return (f"data file {path!r} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); save it as "
                    "UTF-8, e.g. iconv -f latin1 -t utf-8 in.txt > out.txt, or give a text file")
    return f"data source {source.label!r} is not UTF-8 text ({error.reason}); save it as UTF-8"


def _first_non_utf8_byte(path: str, chunk: int = 1 << 20) -> tuple[int, int] | None:
    """``(offset, byte)`` of the first byte of ``path`` that is not valid UTF-8, or None."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as bad:
                # The decoder's error positions count from the bytes it still held plus this block.
                pending = len(bad.object) - len(block)
                return offset - pending + bad.start, bad.object[bad.start]
            if not block:
                return None
            offset += len(block)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pick_splits(dd, label: str) -> tuple[Any, Any | None, Any | None]:
    names = list(dd.keys())
    by_role: dict[str, str] = {}
    for n in names:
        role = _SPLIT_WORDS.get(n.lower())
        if role and role not in by_role:
            by_role[role] = n
    if "train" in by_role:
        train = dd[by_role["train"]]
    elif len(names) == 1:
        train = dd[names[0]]
    else:
        raise SentinelError(f"dataset {label!r} has splits {', '.join(names)} but no 'train' split; "
                            "use a dataset or folder with training text")
    validation = dd[by_role["validation"]] if "validation" in by_role else None
    test = dd[by_role["test"]] if "test" in by_role else None
    return train, validation, test


def _check_text_column(ds, label: str) -> None:
    if "text" not in ds.column_names:
        raise SentinelError(f"dataset {label!r} has no 'text' column (columns: "
                            f"{', '.join(ds.column_names) or 'none'}); give records with a 'text' field")


def _rows_are_lines(ds, builder: str) -> bool:
    """Whether rows are lines of running text (joined as-is) rather than separate documents."""
    if builder == "text":
        return True
    sample = [t for t in ds.select(range(min(len(ds), 1000)))["text"] if t]
    return bool(sample) and all(t.endswith("\n") for t in sample)


def _chunk_rows(n_rows: int) -> int:
    return max(1, math.ceil(n_rows / _MAX_CHUNKS))


def _tokenise(ds, tokenizer, *, lines: bool, eos_id: int | None, label: str):
    """Tokenise into contiguous chunks of rows: one output row (``input_ids``) per chunk."""
    if len(ds) == 0:
        raise SentinelError(f"data source {label!r} has no rows of text; give a non-empty source")
    chunk = _chunk_rows(len(ds))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch["text"] if t is not None]
        if lines:
            # Running text: tokenise the chunk as one string so merges across line ends
            # (e.g. "\n\n") match how the whole text would tokenise.
            joined = "".join(t if t.endswith("\n") else t + "\n" for t in texts)
            ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"] if joined else []
        else:
            docs = [t for t in texts if t]
            ids = []
            if docs:
                for doc_ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
                    ids.extend(doc_ids)
                    if eos_id is not None:
                        ids.append(eos_id)
        return {"input_ids": [ids]}

    return ds.map(encode, batched=True, batch_size=chunk, remove_columns=ds.column_names,
                  desc="Tokenising")


def _stream(chunks) -> torch.Tensor:
    """Concatenate the chunks' ids (in row order) into one 1-D LongTensor."""
    if len(chunks) == 0:
        return torch.zeros(0, dtype=torch.long)
    table = chunks.with_format("arrow")[:]
    col = table.column("input_ids").combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.asarray(values, dtype=np.int64).copy())


def _split_chunks(n_chunks: int, seed: int, fraction: float, label: str) -> tuple[list[int], list[int]]:
    """Deterministic, disjoint choice of validation chunks (train keeps the rest, in order)."""
    if n_chunks < 2:
        raise SentinelError(f"data source {label!r} is a single line/record, so no validation text "
                            "can be held out; give more lines or records, or a folder with a "
                            "validation file")
    n_val = min(n_chunks - 1, max(1, round(fraction * n_chunks)))
    perm = np.random.default_rng(seed).permutation(n_chunks)
    val = sorted(int(i) for i in perm[:n_val])
    val_set = set(val)
    train = [i for i in range(n_chunks) if i not in val_set]
    return train, val


def _pack(ids: torch.Tensor, block_size: int, what: str) -> TokenSplit:
    n = int(ids.numel())
    if n < block_size:
        raise SentinelError(f"{what} has {n} tokens, fewer than one block of block_size={block_size}; "
                            "use a smaller block size or more text")
    n_blocks = n // block_size
    return TokenSplit(ids=ids, blocks=ids[: n_blocks * block_size].view(n_blocks, block_size))


def _build(source: _Source, tokenizer, *, block_size: int, seed: int, validation_fraction: float,
           cache_dir) -> LMData:
    dd = _load(source, cache_dir)
    train_ds, val_ds, test_ds = _pick_splits(dd, source.label)
    for ds in (train_ds, val_ds, test_ds):
        if ds is not None:
            _check_text_column(ds, source.label)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    lines = _rows_are_lines(train_ds, source.builder) if len(train_ds) else True

    def tok(ds, split):
        return _tokenise(ds, tokenizer, lines=lines, eos_id=eos_id, label=f"{source.label} ({split})")

    train_chunks = tok(train_ds, "train")
    validation_from_train = val_ds is None
    if validation_from_train:
        tr_idx, va_idx = _split_chunks(len(train_chunks), seed, validation_fraction, source.label)
        train_ids = _stream(train_chunks.select(tr_idx))
        val_ids = _stream(train_chunks.select(va_idx))
        total = train_ids.numel() + val_ids.numel()
        if total < block_size:
            raise SentinelError(f"data source {source.label!r} has {total} tokens, fewer than "
                                f"one block of block_size={block_size}; use a smaller block size or "
                                "more text")
        val_what = f"the validation part ({validation_fraction:g}) of {source.label!r}"
    else:
        train_ids = _stream(train_chunks)
        val_ids = _stream(tok(val_ds, "validation"))
        val_what = f"the validation split of {source.label!r}"

    train = _pack(train_ids, block_size, f"the training text of {source.label!r}")
    validation = _pack(val_ids, block_size, val_what)
    test = None
    if test_ds is not None:
        test = _pack(_stream(tok(test_ds, "test")), block_size, f"the test split of {source.label!r}")
    return LMData(train=train, validation=validation, test=test, block_size=block_size,
                  source=source.label, validation_from_train=validation_from_train)


# --------------------------------------------------------------------------------------------
# Batching.


def collate(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int,
    *,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad ragged token sequences into a batch.

    Returns ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (0 on padding) and
    ``labels`` (equal to ``input_ids``, -100 on padding).
    """
    if padding_side not in ("right", "left"):
        raise SentinelError(f"padding_side={padding_side!r} must be 'right' or 'left'")
    if len(sequences) == 0:
        raise SentinelError("collate got no sequences; give at least one")
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.numel()
        if n == 0:
            continue
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, sl] = r
        attention_mask[i, sl] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    blocks: torch.Tensor | Sequence[Sequence[int]],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    pad_id: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"input_ids", "attention_mask", "labels"}`` batches.

    ``blocks`` is a packed ``[n, block_size]`` tensor (no padding: mask all ones) or a list of
    ragged sequences (right-padded with ``pad_id`` through :func:`collate`). ``labels`` equal
    ``input_ids`` and are -100 where ``attention_mask`` is 0. ``shuffle`` permutes the order
    with a generator seeded by ``seed``; ``drop_last`` skips a final short batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SentinelError(f"batch_size={batch_size!r} must be an integer >= 1")
    is_tensor = isinstance(blocks, torch.Tensor)
    if is_tensor and blocks.dim() != 2:
        raise SentinelError(f"blocks must be a 2-D [n_blocks, block_size] tensor, got shape "
                            f"{tuple(blocks.shape)}")
    n = int(blocks.shape[0]) if is_tensor else len(blocks)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if drop_last and idx.numel() < batch_size:
            return
        if is_tensor:
            input_ids = blocks[idx].long()
            attention_mask = torch.ones_like(input_ids)
            yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone()}
        else:
            yield collate([blocks[int(i)] for i in idx], pad_id)


def calibration_batches(blocks: torch.Tensor, batch_size: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The calibration data of scorers and growth: the first ``count`` batches of ``blocks``
    (the training blocks) in an order shuffled by ``seed``."""
    out = []
    for batch in batches(blocks, batch_size, shuffle=True, seed=seed):
        out.append(batch)
        if len(out) >= count:
            break
    return out


def loss_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, ...] | None:
    """``(input_ids, attention_mask, labels)`` of ``batch`` on ``device`` for a causal-LM loss.

    A missing mask means every token is real; missing labels are the ids with padding set to
    -100. Returns None when no position has a next token to predict (the loss is undefined).
    """
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
    labels = batch.get("labels")
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else labels.to(device)
    if int((labels[:, 1:] != IGNORE_INDEX).sum()) == 0:
        return None
    return input_ids, mask, labels
