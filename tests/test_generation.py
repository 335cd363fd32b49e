"""Tests for sentinel_core.generation against a hand-written decoding loop."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import make_tokenizer, tiny_gpt2
from transformers import TextStreamer

from sentinel_core.errors import SentinelError
from sentinel_core.generation import generate_text, stream_text

PROMPTS = ["The king", "A quiet river runs under the old stone", "Sword"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(pad=False)  # GPT-2-like: EOS but no pad token


@pytest.fixture(scope="module")
def model(tok):
    return tiny_gpt2(len(tok), n_positions=96, seed=2)


def manual_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt)["input_ids"] or [tok.eos_token_id]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_greedy_matches_manual_argmax_loop(model, tok):
    for p in PROMPTS + [""]:
        got = generate_text(model, tok, p, max_new_tokens=8, do_sample=False)
        assert isinstance(got, str)
        assert got == manual_greedy(model, tok, p, 8)


def test_batch_with_left_padding_equals_one_at_a_time(model, tok):
    batch = generate_text(model, tok, PROMPTS, max_new_tokens=10, do_sample=False)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    assert batch == [generate_text(model, tok, p, max_new_tokens=10, do_sample=False) for p in PROMPTS]
    assert tok.pad_token is None  # the caller's tokenizer is left alone


def test_seeded_sampling_is_reproducible_and_keeps_global_rng(model, tok):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_text(model, tok, "The king", max_new_tokens=12, seed=7)
    b = generate_text(model, tok, "The king", max_new_tokens=12, seed=7)
    c = generate_text(model, tok, "The king", max_new_tokens=12, seed=8)
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), state)
    nucleus = generate_text(model, tok, PROMPTS, max_new_tokens=8, seed=3, temperature=0.7, top_k=0,
                            top_p=0.9)
    assert nucleus == generate_text(model, tok, PROMPTS, max_new_tokens=8, seed=3, temperature=0.7,
                                    top_k=0, top_p=0.9)


def test_top_k_one_is_greedy(model, tok):
    assert generate_text(model, tok, "The king", max_new_tokens=10, top_k=1, seed=0) == \
        generate_text(model, tok, "The king", max_new_tokens=10, do_sample=False)


def eos_model(tok):
    """A GPT-2 whose every position puts all mass on EOS."""
    m = tiny_gpt2(len(tok), seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.fill_(1.0)  # final hidden state is all ones
        m.lm_head.weight.zero_()
        m.lm_head.weight[tok.eos_token_id] = 10.0  # EOS logit 320, all others 0
    return m


def test_stops_at_eos(tok):
    m = eos_model(tok)
    assert generate_text(m, tok, "The king", max_new_tokens=10) == ""
    assert generate_text(m, tok, PROMPTS, max_new_tokens=10, do_sample=False) == ["", "", ""]


def prune_gpt2_heads(model, layer: int, keep: list[int]) -> None:
    """Remove attention heads of one GPT-2 layer by hand, independent of sentinel's surgery."""
    attn = model.transformer.h[layer].attn
    d, hd = attn.embed_dim, attn.head_dim
    cols = [part * d + h * hd + j for part in range(3) for h in keep for j in range(hd)]
    rows = [h * hd + j for h in keep for j in range(hd)]
    with torch.no_grad():
        attn.c_attn.weight = torch.nn.Parameter(attn.c_attn.weight[:, cols].clone())
        attn.c_attn.bias = torch.nn.Parameter(attn.c_attn.bias[cols].clone())
        attn.c_attn.nf = len(cols)
        attn.c_proj.weight = torch.nn.Parameter(attn.c_proj.weight[rows, :].clone())
        attn.c_proj.nx = len(rows)
    attn.num_heads = len(keep)
    attn.split_size = len(rows)


def test_works_with_different_head_counts_per_layer(tok):
    m = tiny_gpt2(len(tok), n_positions=96, seed=5)
    prune_gpt2_heads(m, 0, [1, 3])
    prune_gpt2_heads(m, 1, [2])
    for p in PROMPTS:
        assert generate_text(m, tok, p, max_new_tokens=8, do_sample=False) == manual_greedy(m, tok, p, 8)
    assert generate_text(m, tok, PROMPTS, max_new_tokens=8, do_sample=False) == \
        [manual_greedy(m, tok, p, 8) for p in PROMPTS]


def test_padded_tokenizer_and_training_mode(model):
    tok = make_tokenizer(pad=True)
    model.train()
    try:
        out = generate_text(model, tok, PROMPTS[:2], max_new_tokens=6, do_sample=False)
        assert model.training
    finally:
        model.eval()
    assert out == [manual_greedy(model, tok, p, 6) for p in PROMPTS[:2]]


def test_stream_text_yields_the_generated_text(model, tok):
    pieces = list(stream_text(model, tok, "The king", max_new_tokens=15, seed=4))
    assert "".join(pieces) == generate_text(model, tok, "The king", max_new_tokens=15, seed=4)
    with pytest.raises(SentinelError, match="top_p=0"):
        list(stream_text(model, tok, "The king", top_p=0))


def test_text_streamer_receives_new_text(model, tok, capsys):
    out = generate_text(model, tok, "The king", max_new_tokens=10, do_sample=False,
                        streamer=TextStreamer(tok, skip_prompt=True))
    assert out in capsys.readouterr().out
    with pytest.raises(SentinelError, match="one prompt"):
        generate_text(model, tok, PROMPTS, streamer=TextStreamer(tok))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"temperature": 0.0}, r"temperature=0.0 must be > 0"),
    ({"temperature": -1}, r"temperature=-1"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5"),
    ({"top_k": -1}, r"top_k=-1 must be an integer >= 0"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0 must be an integer >= 1"),
    ({"max_new_tokens": 500}, r"exceeds the model's 96 positions"),
])
def test_bad_parameters(model, tok, kwargs, pattern):
    with pytest.raises(SentinelError, match=pattern):
        generate_text(model, tok, "The king", **kwargs)


def test_greedy_ignores_temperature_and_bad_prompts(model, tok):
    assert generate_text(model, tok, "The king", max_new_tokens=5, do_sample=False, temperature=0) == \
        manual_greedy(model, tok, "The king", 5)
    with pytest.raises(SentinelError, match="empty"):
        generate_text(model, tok, [])
    with pytest.raises(SentinelError, match="not a string"):
        generate_text(model, tok, ["ok", 3])


def test_llama_gqa_batch_matches_manual_loop(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=96,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=None)
    m = LlamaForCausalLM(cfg).eval()
    expected = [manual_greedy(m, tok, p, 6) for p in PROMPTS]
    assert generate_text(m, tok, PROMPTS, max_new_tokens=6, do_sample=False) == expected
