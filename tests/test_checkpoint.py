"""Sentinel checkpoints: exact reload, refusal by plain transformers, dense export, plain HF dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from surgery_fixtures import ATTN, inputs, logits, tiny_gpt2, tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, ViTConfig, ViTModel

from sentinel_core.errors import SentinelError
from sentinel_core.model_io import WEIGHTS_NAME, load_model, save_model
from sentinel_core.surgery import get_head_map, grow_heads, mask_heads, prune_heads


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def operated(make, attn: str):
    model = make(attn)
    prune_heads(model, {0: [1], 1: [0, 1, 2, 3]})
    grow_heads(model, {1: 1, 0: 1}, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # give the grown heads a voice so the reload test can see them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    mask_heads(model, {0: [3]})
    return model


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_qwen2], ids=["gpt2", "llama", "qwen2"])
def test_save_load_is_bit_identical(tmp_path: Path, make, attn: str) -> None:
    model, x = operated(make, attn), inputs()
    save_model(model, None, tmp_path / "ck")
    loaded, tokenizer = load_model(tmp_path / "ck")
    assert tokenizer is None
    assert loaded.config._attn_implementation == attn
    assert get_head_map(loaded).to_dict() == get_head_map(model).to_dict()
    assert torch.equal(logits(loaded, x), logits(model, x))
    stored = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert stored["sentinel_head_map"] == get_head_map(model).to_dict()
    assert stored.get("num_attention_heads", stored.get("n_head")) == 4  # config still validates


def test_dtype_is_recorded_and_restored(tmp_path: Path) -> None:
    model, x = tiny_llama("eager").to(torch.bfloat16), inputs()
    prune_heads(model, {0: [2]})
    save_model(model, None, tmp_path / "bf16")
    loaded, _ = load_model(tmp_path / "bf16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, x), logits(model, x))
    as_float, _ = load_model(tmp_path / "bf16", dtype="float32")
    assert as_float.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(SentinelError, match="not a torch floating dtype"):
        load_model(tmp_path / "bf16", dtype="int8")


@pytest.mark.parametrize("surgery", ["compact", "masked"])
def test_plain_from_pretrained_refuses_a_sentinel_checkpoint(tmp_path: Path, surgery: str) -> None:
    model = tiny_gpt2()
    if surgery == "compact":
        prune_heads(model, {0: [0]})
    else:
        mask_heads(model, {0: [0]})
    save_model(model, None, tmp_path / "ck")
    assert (tmp_path / "ck" / WEIGHTS_NAME).exists()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_dense_export_loads_in_plain_transformers(tmp_path: Path, make, attn: str) -> None:
    model, x = make(attn), inputs()
    prune_heads(model, {0: [1, 2], 1: [3]})
    mask_heads(model, {1: [0]})
    save_model(model, word_tokenizer(), tmp_path / "dense", dense=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation=attn).eval()
    assert plain.config.to_dict().get("sentinel_head_map") is None
    torch.testing.assert_close(logits(plain, x), logits(model, x), atol=1e-5, rtol=0)
    # load_model re-gates the zeroed heads, so fine-tuning cannot revive them
    again, tokenizer = load_model(tmp_path / "dense")
    assert get_head_map(again).masked(0) == [1, 2] and get_head_map(again).masked(1) == [0, 3]
    assert again.config._attn_implementation == attn
    assert torch.equal(logits(again, x), logits(plain, x))
    assert tokenizer("the cat sat")["input_ids"] == [1, 2, 3]


def test_dense_export_refuses_active_grown_heads(tmp_path: Path) -> None:
    model, x = tiny_gpt2(), inputs()
    grow_heads(model, {0: 1})
    with pytest.raises(SentinelError, match="grown heads"):
        save_model(model, None, tmp_path / "d", dense=True)
    assert not (tmp_path / "d").exists()
    mask_heads(model, {0: [4]})  # a silent grown head can be dropped
    save_model(model, None, tmp_path / "d", dense=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(logits(plain, x), logits(model, x), atol=1e-5, rtol=0)


def test_plain_hf_directory_and_tokenizer(tmp_path: Path) -> None:
    model, x = tiny_llama(), inputs()
    model.save_pretrained(tmp_path / "hf")
    word_tokenizer().save_pretrained(tmp_path / "hf")
    loaded, tokenizer = load_model(str(tmp_path / "hf"))
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert tokenizer.decode(tokenizer("a mat")["input_ids"]) == "a mat"
    assert get_head_map(loaded).is_original()
    # and a loaded plain model can go through surgery and a Sentinel round trip
    prune_heads(loaded, {1: [0]})
    before = sorted(os.listdir(tmp_path / "hf"))
    # Never over the folder it came from: transformers wrote those files, not Sentinel.
    with pytest.raises(SentinelError, match="already holds files Sentinel did not write"):
        save_model(loaded, tokenizer, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == before
    save_model(loaded, tokenizer, tmp_path / "pruned")
    save_model(loaded, tokenizer, tmp_path / "pruned")  # its own folder: replaced in place, atomically
    reloaded, tok2 = load_model(tmp_path / "pruned")
    assert torch.equal(logits(reloaded, x), logits(loaded, x))
    assert tok2("the cat")["input_ids"] == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["hf", "pruned"]  # no temp or backup dirs left behind


def test_loading_errors_are_one_line_sentinel_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ViTModel(
        ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
        )
    ).save_pretrained(tmp_path / "vit")
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (tmp_path / "missing", "does not exist"),
        ("./no/such/model", "does not exist"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "vit", "not a causal language model"),
        (tmp_path / "file.txt", "is a file; give the folder that holds config.json"),
    ]
    for path, pattern in cases:
        with pytest.raises(SentinelError, match=pattern) as info:
            load_model(path)
        assert "\n" not in str(info.value)


def test_corrupt_sentinel_checkpoint_raises(tmp_path: Path) -> None:
    model = tiny_gpt2()
    prune_heads(model, {0: [0]})
    save_model(model, None, tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    config["sentinel_head_map"]["layers"][0] = [0, 1, 2, 3]  # claims shapes the weights lack
    config_path.write_text(json.dumps(config))
    with pytest.raises(SentinelError, match="does not match"):
        load_model(tmp_path / "ck")
    with pytest.raises(SentinelError, match="a file"):
        save_model(model, None, config_path)


def test_save_pretrained_of_an_operated_model_is_refused(tmp_path: Path) -> None:
    model = tiny_gpt2()
    mask_heads(model, {0: [1]})
    model.save_pretrained(tmp_path / "hf")  # config carries the head map, weights lack the gates
    with pytest.raises(SentinelError, match="save_model"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_sharded_weights_with_an_index_reload_bit_identically(tmp_path: Path, build) -> None:
    model, x = build(), inputs()
    prune_heads(model, {0: [1], 1: [0, 3]})
    save_model(model, None, tmp_path / "sharded", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("sentinel-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "sentinel.safetensors.index.json" in files and "sentinel.safetensors" not in files
    index = json.loads((tmp_path / "sharded" / "sentinel.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded, _ = load_model(tmp_path / "sharded")
    assert torch.equal(logits(reloaded, x), logits(model, x))
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(SentinelError, match="incomplete"):
        load_model(tmp_path / "sharded")


def test_tied_weights_come_back_tied(tmp_path: Path) -> None:
    model = tiny_gpt2()
    save_model(model, None, tmp_path / "m")
    reloaded, _ = load_model(tmp_path / "m")
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert not any(t.is_meta for t in (*reloaded.parameters(), *reloaded.buffers()))


@pytest.mark.parametrize("build", [tiny_gpt2, lambda: tiny_llama(tie_word_embeddings=True)], ids=["gpt2", "llama"])
def test_a_folder_written_by_the_earlier_writer_loads_with_its_tied_weights(tmp_path: Path, build) -> None:
    # Until the tensors went through tensor_io, save_model wrote them with
    # safetensors.torch.save_model, which keeps one name of a tied pair and records the other in
    # the file's metadata ({dropped: kept}); the same format version still has to read it (the
    # cached demo-llama keeps only lm_head.weight).
    from safetensors import safe_open
    from safetensors.torch import save_model as safetensors_save_model

    model, x = build(), inputs()
    prune_heads(model, {0: [1], 1: [0, 3]})
    save_model(model, None, tmp_path / "old")
    weights = tmp_path / "old" / WEIGHTS_NAME
    weights.unlink()
    safetensors_save_model(model, str(weights), metadata={"format": "pt", "sentinel_format": "1"})
    with safe_open(str(weights), framework="pt") as handle:
        stored, meta = set(handle.keys()), handle.metadata()
    tied = {name for name in meta if name not in ("format", "sentinel_format")}
    assert len(tied) == 1 and tied.isdisjoint(stored) and meta[tied.pop()] in stored
    reloaded, _ = load_model(tmp_path / "old")
    assert torch.equal(logits(reloaded, x), logits(model, x))
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_the_weights_fingerprint_sums_in_slices_to_the_float64_sums(monkeypatch):
    from sentinel_core.training import checkpoints as ckpt

    state = {"w": torch.randn(37, 11, generator=torch.Generator().manual_seed(0)), "ids": torch.arange(9),
             "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0)}
    monkeypatch.setattr(ckpt, "FINGERPRINT_CHUNK", 16)  # 26 slices of the 407 weights
    rows = ckpt.weights_fingerprint(state)
    for (name, tensor), row in zip(state.items(), rows, strict=True):
        values = tensor.double()
        assert row[:3] == [name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        assert row[3] == pytest.approx(float(values.sum()), rel=1e-12, abs=1e-12)
        assert row[4] == pytest.approx(float((values * values).sum()), rel=1e-12, abs=1e-12)
    moved = dict(state, w=state["w"] + 1e-3)
    assert not ckpt.fingerprints_match(rows, ckpt.weights_fingerprint(moved))
    assert ckpt.fingerprints_match(rows, ckpt.weights_fingerprint(dict(state)))
