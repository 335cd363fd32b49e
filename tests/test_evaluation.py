"""Tests for sentinel_core.evaluation against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import tiny_gpt2
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sentinel_core.errors import SentinelError
from sentinel_core.evaluation import count_parameters, evaluate, sliding_windows

V = 97


def random_ids(n: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(V, n_positions=64, seed=1)


def test_uniform_model_has_perplexity_vocab_size():
    m = tiny_gpt2(V, seed=0)
    with torch.no_grad():
        m.lm_head.weight.zero_()  # every logit 0 -> uniform over V tokens
    ids = random_ids(150)
    r = evaluate(m, ids, block_size=32)
    assert r.perplexity == pytest.approx(V, rel=1e-4)
    assert r.loss == pytest.approx(math.log(V), rel=1e-5)
    # stride == block_size: every window start has no context and is not scored.
    assert r.tokens == 150 - math.ceil(150 / 32)


class ZeroLogits(nn.Module):
    """A plain module (not a transformers model) returning a logits tensor."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.vocab) + self.dummy


def test_plain_module_uniform_with_overlap():
    r = evaluate(ZeroLogits(13), random_ids(100, vocab=13), block_size=16, stride=5, batch_size=3)
    assert r.perplexity == pytest.approx(13, rel=1e-5)
    assert r.tokens == 99


def naive_nonoverlapping(model, ids, block):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.numel(), block):
            chunk = ids[i:i + block]
            if chunk.numel() < 2:
                continue
            logits = model(chunk[None]).logits[0]
            total += F.cross_entropy(logits[:-1].double(), chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
    return total / count, count


@pytest.mark.parametrize("n", [203, 192, 193])
def test_stride_equal_block_matches_naive_blocks(model, n):
    ids = random_ids(n, seed=n)
    expected, count = naive_nonoverlapping(model, ids, 32)
    r = evaluate(model, ids, block_size=32, batch_size=4)
    assert r.tokens == count
    assert r.loss == pytest.approx(expected, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert r.input_tokens == n
    assert 0 < r.tokens_per_second < math.inf  # what it times: test_throughput_leaves_out_the_first_batch...


def guide_loop(model, ids, block, stride):
    """The transformers perplexity guide's loop, scored token by token in float64."""
    n = ids.numel()
    total, count, fed = 0.0, 0, 0
    prev_end = 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + block, n)
            trg_len = end - prev_end
            window = ids[begin:end]
            fed += window.numel()
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(end - trg_len, end):
                if t == begin:
                    continue  # no context, nothing predicts it
                total -= logp[t - begin - 1, ids[t]].item()
                count += 1
            prev_end = end
            if end == n:
                break
    return total / count, count, fed


@pytest.mark.parametrize("block, stride, n", [(32, 16, 150), (32, 7, 101), (16, 1, 40), (24, 23, 90)])
def test_sliding_window_matches_guide_loop(model, block, stride, n):
    ids = random_ids(n, seed=block * stride)
    expected, count, fed = guide_loop(model, ids, block, stride)
    r = evaluate(model, ids, block_size=block, stride=stride, batch_size=5)
    assert r.tokens == count == n - 1  # with overlap, every token but the first is scored once
    assert r.input_tokens == fed
    assert r.loss == pytest.approx(expected, rel=1e-5)


def test_windows_cover_each_token_once():
    """Overlapping windows score every token but the first exactly once, within block_size."""
    windows = sliding_windows(100, 32, 8)
    scored = sorted(t for b, e, f in windows for t in range(f, e))
    assert scored == list(range(1, 100))
    assert all(e - b <= 32 for b, e, _ in windows)


def test_padding_is_excluded(model):
    ids = random_ids(100, seed=7)
    # Windows end at 32, 48, 64, 80, 96, 100: the last (20 tokens) is padded within its batch.
    single = evaluate(model, ids, block_size=32, stride=16, batch_size=1)
    batched = evaluate(model, ids, block_size=32, stride=16, batch_size=4)
    assert batched.tokens == single.tokens == 99
    assert batched.input_tokens == single.input_tokens
    assert batched.loss == pytest.approx(single.loss, rel=1e-5)

    ragged = random_ids(75, seed=8)  # non-overlapping: last window 11 tokens
    assert evaluate(model, ragged, block_size=32, batch_size=3).loss == pytest.approx(
        evaluate(model, ragged, block_size=32, batch_size=1).loss, rel=1e-5)


def test_restores_training_mode_and_accepts_2d(model):
    model.train()
    try:
        ids = random_ids(64, seed=3)
        a = evaluate(model, ids[None], block_size=32, progress=True)
        assert model.training
        b = evaluate(model, ids.tolist(), block_size=32)
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"block_size": 32, "stride": 33}, r"stride=33 must be an integer from 1 to block_size=32"),
    ({"block_size": 32, "stride": 0}, r"stride=0"),
    ({"block_size": 1}, r"block_size=1"),
    ({"block_size": 128}, r"block_size=128 exceeds the model's 64 positions"),
    ({"block_size": 32, "batch_size": 0}, r"batch_size=0"),
])
def test_bad_arguments(model, kwargs, pattern):
    with pytest.raises(SentinelError, match=pattern):
        evaluate(model, random_ids(50), **kwargs)


def test_bad_ids(model):
    with pytest.raises(SentinelError, match="1-D"):
        evaluate(model, torch.zeros(2, 10, dtype=torch.long), block_size=8)
    with pytest.raises(SentinelError, match="at least 2"):
        evaluate(model, torch.tensor([3]), block_size=8)


def test_count_parameters_gpt2():
    d, L, P = 32, 2, 64
    m = tiny_gpt2(V, n_layer=L, n_embd=d, n_positions=P)
    attn = L * (d * 3 * d + 3 * d + d * d + d)
    mlp = d * 4 * d + 4 * d + 4 * d * d + d
    total = V * d + P * d + L * (2 * d + attn // L + 2 * d + mlp) + 2 * d  # lm_head tied to wte
    assert count_parameters(m) == {"total": total, "attention": attn}


def test_count_parameters_llama_gqa():
    d, H, KV, L, inter = 32, 4, 2, 2, 48
    hd = d // H
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=L,
                      intermediate_size=inter, vocab_size=V, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    attn = L * (d * H * hd + 2 * d * KV * hd + H * hd * d)
    total = 2 * V * d + L * (attn // L + 3 * d * inter + 2 * d) + d
    assert count_parameters(m) == {"total": total, "attention": attn}


def test_count_parameters_fallback_by_layer_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4)
            self.mlp = nn.Linear(4, 8)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([Block(), Block()])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Body()

    assert count_parameters(Model()) == {"total": 2 * (20 + 40), "attention": 40}


class Clock:
    """A fake ``time.perf_counter`` that only the model advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowFirstCall(ZeroLogits):
    """Costs 100 clock seconds on its first forward (a cold start) and 1 on every later one."""

    def __init__(self, vocab: int, clock: Clock):
        super().__init__(vocab)
        self.clock, self.calls = clock, 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        self.clock.now += 100.0 if self.calls == 1 else 1.0
        return super().forward(input_ids, attention_mask)


def test_throughput_leaves_out_the_first_batch_but_seconds_count_everything(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("sentinel_core.evaluation.time.perf_counter", clock)
    model = SlowFirstCall(V, clock)
    # 6 windows of 16 tokens in batches of 2: three forwards, 32 tokens each.
    result = evaluate(model, random_ids(6 * 16), block_size=16, batch_size=2)
    assert model.calls == 3 and result.input_tokens == 96
    assert result.seconds == pytest.approx(102.0)
    assert result.tokens_per_second == pytest.approx(64 / 2.0)  # the two warm batches only
    # With a single batch there is nothing warm to time: all of it counts.
    clock.now, model.calls = 0.0, 0
    single = evaluate(model, random_ids(2 * 16), block_size=16, batch_size=2)
    assert single.tokens_per_second == pytest.approx(32 / 100.0)
