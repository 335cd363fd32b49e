"""``--model demo-llama``: the GQA demo model, built by the GPT-2 demo's code and cache (tiny spec here)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from sentinel_core.demo import FULL, LLAMA, LLAMA_TINY, TINY, DemoSpec, demo_spec_for, ensure_demo_model
from sentinel_core.demo.corpus import corpus_dir
from sentinel_core.demo.model import demo_model_dir
from sentinel_core.errors import SentinelError

# The DemoSpec fields before demo-llama, in their order then: the cache key of a GPT-2 spec must
# still be the hash of exactly these, or every cached demo model would be rebuilt.
FORMAT_1_FIELDS = ("name", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "block_size", "batch_size",
                   "learning_rate", "max_steps", "warmup_fraction", "seed", "max_train_chars", "max_eval_chars",
                   "eval_blocks", "eval_every", "checkpoint_every")


@pytest.mark.parametrize("spec", [FULL, TINY], ids=["full", "tiny"])
def test_gpt2_demo_cache_keys_are_unchanged(spec, tmp_path):
    blob = json.dumps({"spec": {f: getattr(spec, f) for f in FORMAT_1_FIELDS}, "format": 1,
                       "corpus": corpus_dir(tmp_path).name}, sort_keys=True)
    expected = tmp_path / f"demo-{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    assert demo_model_dir(spec, cache_dir=tmp_path) == expected


def test_llama_specs_have_their_own_cache_keys(tmp_path):
    keys = {demo_model_dir(s, cache_dir=tmp_path) for s in (FULL, LLAMA, LLAMA_TINY, TINY)}
    assert len(keys) == 4
    assert demo_model_dir(LLAMA, cache_dir=tmp_path).name.startswith("demo-llama-")


def test_demo_names_resolve_to_their_specs(monkeypatch):
    monkeypatch.delenv("SENTINEL_DEMO_SPEC", raising=False)
    monkeypatch.delenv("SENTINEL_DEMO_LLAMA_SPEC", raising=False)
    assert demo_spec_for("demo") is FULL and demo_spec_for("demo-llama") is LLAMA
    monkeypatch.setenv("SENTINEL_DEMO_LLAMA_SPEC", "llama-tiny")
    assert demo_spec_for("demo-llama") is LLAMA_TINY and demo_spec_for("demo") is FULL
    monkeypatch.setenv("SENTINEL_DEMO_LLAMA_SPEC", "huge")
    with pytest.raises(SentinelError, match="SENTINEL_DEMO_LLAMA_SPEC='huge' is not a known demo spec"):
        demo_spec_for("demo-llama")
    with pytest.raises(SentinelError, match="'demo-gpt5' is not a demo model"):
        demo_spec_for("demo-gpt5")


def test_a_bad_spec_is_refused_in_one_line():
    with pytest.raises(SentinelError, match="n_kv_head dividing n_head"):
        dataclasses.replace(LLAMA, n_kv_head=3)
    with pytest.raises(SentinelError, match="architecture 'rwkv'"):
        dataclasses.replace(TINY, architecture="rwkv")
    with pytest.raises(SentinelError, match="llama-only"):
        DemoSpec(**{**dataclasses.asdict(TINY), "n_kv_head": 2})


def test_the_full_llama_spec_is_the_documented_model():
    assert (LLAMA.architecture, LLAMA.n_layer, LLAMA.n_head, LLAMA.n_kv_head, LLAMA.n_embd) == ("llama", 6, 16, 4, 256)
    # the GPT-2 demo's corpus, tokenizer size and training budget
    for field in ("vocab_size", "block_size", "batch_size", "learning_rate", "max_steps", "warmup_fraction", "seed"):
        assert getattr(LLAMA, field) == getattr(FULL, field)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-llama-cache")
    return ensure_demo_model(quiet=True, spec="llama-tiny", cache_dir=cache), cache


def test_tiny_llama_demo_builds_a_gqa_llama_that_learned(built):
    from sentinel_core.demo import read_build_info
    from sentinel_core.model_io import load_model
    from sentinel_core.surgery import get_head_map

    path, _ = built
    model, tokenizer = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 16)
    assert get_head_map(model).group_sizes == [2, 2]
    ids = tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    info = read_build_info(path)
    assert info["spec"]["architecture"] == "llama" and info["steps"] == LLAMA_TINY.max_steps
    (_, first), (_, last) = info["eval_history"][0], info["eval_history"][-1]
    assert last < first


def test_demo_llama_is_resolved_wherever_demo_is(built, monkeypatch):
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.defaults import resolve_model, resolve_model_and_data

    path, cache = built
    monkeypatch.setenv("SENTINEL_CACHE_DIR", str(cache))
    monkeypatch.setenv("SENTINEL_DEMO_LLAMA_SPEC", "llama-tiny")
    assert resolve_model("demo-llama") == str(path)
    model, data = resolve_model_and_data(ExperimentConfig(model_name="demo-llama", quiet=True), announce=False)
    assert (model, data) == (str(path), "demo")


def test_kv_groups_on_the_demo_llama_exports_a_stock_model(built, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.export import export_model
    from sentinel_core.model_io import load_model
    from sentinel_core.plugins import load_plugins

    path, _ = built
    model, tokenizer = load_model(path)
    load_plugins()
    config = ExperimentConfig(pruning_percent=0.5, prune_strategy="kv-groups", scorer="magnitude")
    scores = plugins.score_heads("magnitude", model=model, batches=[], config=config)
    plugins.prune("kv-groups", model=model, scores=scores, config=config)
    assert "removing 1 of 2 KV groups in each of 2 layers" in capsys.readouterr().err
    report = export_model(model, tokenizer, tmp_path / "stock", quiet=True)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 1)
    assert report.padded_query_slots == 0
    ids = tokenizer("Now is the winter of our discontent", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
