"""Tests for sentinel_core.data: sources, splits, packing, caching, errors and batching."""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter

import pytest
import torch
from data_fixtures import make_tokenizer, sample_lines

from sentinel_core.data import batches, clear_cache, collate, load_data
from sentinel_core.errors import SentinelError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def numbered_lines(n: int, seed: int = 0) -> list[str]:
    # A unique prefix per line makes every line identifiable after decoding.
    return [f"L{i} {text}" for i, text in enumerate(sample_lines(n, seed))]


def write_txt(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def decoded_lines(tok, ids: torch.Tensor) -> list[str]:
    text = tok.decode(ids.tolist())
    assert text.endswith("\n")
    return text[:-1].split("\n")


def check_packing(split, block_size):
    n_blocks = split.ids.numel() // block_size
    assert split.blocks.shape == (n_blocks, block_size)
    assert split.blocks.dtype == torch.long and split.ids.dtype == torch.long
    assert torch.equal(split.blocks.reshape(-1), split.ids[: n_blocks * block_size])


def test_txt_file_split_is_deterministic_disjoint_and_complete(tok, tmp_path):
    lines = numbered_lines(300)
    path = write_txt(tmp_path / "corpus.txt", lines)
    cache = tmp_path / "cache"
    d = load_data(str(path), tok, block_size=16, seed=3, cache_dir=cache)

    assert d.test is None and d.validation_from_train and d.block_size == 16
    check_packing(d.train, 16)
    check_packing(d.validation, 16)

    train_lines = decoded_lines(tok, d.train.ids)
    val_lines = decoded_lines(tok, d.validation.ids)
    assert not set(train_lines) & set(val_lines)
    assert Counter(train_lines) + Counter(val_lines) == Counter(lines)
    assert len(val_lines) == round(0.1 * len(lines))
    # Each split keeps the file's order.
    assert train_lines == [x for x in lines if x in set(train_lines)]

    clear_cache()
    again = load_data(str(path), tok, block_size=16, seed=3, cache_dir=cache)
    assert torch.equal(again.train.ids, d.train.ids)
    assert torch.equal(again.validation.ids, d.validation.ids)

    other = load_data(str(path), tok, block_size=16, seed=4, cache_dir=cache)
    assert set(decoded_lines(tok, other.validation.ids)) != set(val_lines)

    frac = load_data(str(path), tok, block_size=16, seed=3, validation_fraction=0.25, cache_dir=cache)
    assert len(decoded_lines(tok, frac.validation.ids)) == 75


def test_txt_stream_matches_tokenising_the_text(tok, tmp_path):
    lines = numbered_lines(40)
    path = write_txt(tmp_path / "c.txt", lines)
    d = load_data(str(path), tok, block_size=8, cache_dir=tmp_path / "cache")
    # Lines of a text file are running text: no EOS is inserted between them.
    assert tok.eos_token_id not in d.train.ids.tolist()
    for split in (d.train, d.validation):
        text = tok.decode(split.ids.tolist())
        assert split.ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_block_remainder_is_dropped(tok, tmp_path):
    path = write_txt(tmp_path / "c.txt", numbered_lines(100))
    d = load_data(str(path), tok, block_size=7, cache_dir=tmp_path / "cache")
    assert d.train.ids.numel() % 7 != 0 or d.validation.ids.numel() % 7 != 0
    check_packing(d.train, 7)
    check_packing(d.validation, 7)


def docs(n: int) -> list[str]:
    return [f"Doc {i}: " + " ".join(sample_lines(3, seed=i)) for i in range(n)]


def split_docs(tok, ids: torch.Tensor) -> list[str]:
    eos = tok.eos_token_id
    values = ids.tolist()
    assert values[-1] == eos
    out, cur = [], []
    for v in values:
        if v == eos:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(v)
    return out


def test_jsonl_documents_are_joined_with_eos(tok, tmp_path):
    documents = docs(60)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(documents)))
    d = load_data(str(path), tok, block_size=16, seed=1, cache_dir=tmp_path / "cache")
    check_packing(d.train, 16)
    train_docs, val_docs = split_docs(tok, d.train.ids), split_docs(tok, d.validation.ids)
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(documents)
    assert len(val_docs) == 6
    expected = []
    for t in train_docs:
        expected += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert d.train.ids.tolist() == expected


def test_parquet_equals_jsonl_and_json_array(tok, tmp_path):
    import datasets

    documents = docs(50)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": documents}).to_parquet(str(parquet))
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": t} for t in documents]))

    a = load_data(str(jsonl), tok, block_size=16, seed=2, cache_dir=tmp_path / "c")
    b = load_data(str(parquet), tok, block_size=16, seed=2, cache_dir=tmp_path / "c")
    c = load_data(str(array), tok, block_size=16, seed=2, cache_dir=tmp_path / "c")
    for other in (b, c):
        assert torch.equal(a.train.ids, other.train.ids)
        assert torch.equal(a.validation.ids, other.validation.ids)


def test_json_without_text_column_names_columns(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(docs(5))))
    with pytest.raises(SentinelError, match=r"no 'text' column \(columns: content, id\)"):
        load_data(str(path), tok, block_size=8, cache_dir=tmp_path / "c")


def test_folder_with_split_files_uses_them(tok, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    train, val, test = numbered_lines(80, 0), numbered_lines(20, 1), numbered_lines(20, 2)
    write_txt(folder / "train.txt", train)
    write_txt(folder / "wiki.valid.txt", val)
    write_txt(folder / "test.txt", test)
    (folder / "README.md").write_text("ignored")
    d = load_data(str(folder), tok, block_size=16, cache_dir=tmp_path / "c")
    assert not d.validation_from_train and d.test is not None
    assert decoded_lines(tok, d.train.ids) == train
    assert decoded_lines(tok, d.validation.ids) == val
    assert decoded_lines(tok, d.test.ids) == test
    check_packing(d.test, 16)


def test_folder_of_plain_files_is_one_source(tok, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    a, b = numbered_lines(60, 0), [f"M{i} x" for i in range(60)]
    write_txt(folder / "a.txt", a)
    write_txt(folder / "sub" / "b.txt", b)
    (folder / "empty.txt").write_text("")
    d = load_data(str(folder), tok, block_size=8, cache_dir=tmp_path / "c")
    assert d.validation_from_train
    got = decoded_lines(tok, d.train.ids) + decoded_lines(tok, d.validation.ids)
    assert Counter(got) == Counter(a + b)


def test_folder_errors(tok, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_txt(mixed / "a.txt", ["x"])
    (mixed / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(SentinelError, match="mixes file kinds"):
        load_data(str(mixed), tok, cache_dir=tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.csv").write_text("text\nhello\n")
    with pytest.raises(SentinelError, match=r"has no .txt, .json, .jsonl, .parquet files \(found .csv\)"):
        load_data(str(other), tok, cache_dir=tmp_path / "c")
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    write_txt(only_val / "validation.txt", numbered_lines(10))
    with pytest.raises(SentinelError, match="no training text"):
        load_data(str(only_val), tok, cache_dir=tmp_path / "c")


def test_missing_empty_short_and_unsupported_files(tok, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(SentinelError, match="not found") as e:
        load_data(str(missing), tok)
    assert str(missing) in str(e.value)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SentinelError, match="is empty") as e:
        load_data(str(empty), tok)
    assert str(empty) in str(e.value)

    short = write_txt(tmp_path / "short.txt", ["The king runs.", "A queen sings."])
    n = len(tok("The king runs.\nA queen sings.\n", add_special_tokens=False)["input_ids"])
    with pytest.raises(SentinelError) as e:
        load_data(str(short), tok, block_size=64, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert f"has {n} tokens" in msg and "block_size=64" in msg and str(short) in msg
    assert "\n" not in msg

    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(SentinelError, match=r"unsupported type '\.csv'.*\.txt, \.json, \.jsonl, \.parquet"):
        load_data(str(csv), tok)


def test_short_validation_part_is_reported(tok, tmp_path):
    # 20 lines x ~10 tokens: the 10% validation part (2 lines) is shorter than one 64-token block.
    path = write_txt(tmp_path / "c.txt", numbered_lines(20))
    with pytest.raises(SentinelError, match=r"validation part.*fewer than one block of block_size=64"):
        load_data(str(path), tok, block_size=64, cache_dir=tmp_path / "c")


def test_single_line_cannot_be_split(tok, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(sample_lines(30)))
    with pytest.raises(SentinelError, match="single line"):
        load_data(str(path), tok, block_size=8, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("kwargs, pattern", [
    ({"block_size": 1}, r"block_size=1"),
    ({"block_size": 0}, r"block_size=0"),
    ({"validation_fraction": 0.0}, r"validation_fraction=0.0"),
    ({"validation_fraction": 1.5}, r"validation_fraction=1.5"),
])
def test_bad_arguments(tok, tmp_path, kwargs, pattern):
    path = write_txt(tmp_path / "c.txt", numbered_lines(50))
    with pytest.raises(SentinelError, match=pattern):
        load_data(str(path), tok, **kwargs)


def test_hub_failure_is_one_line_and_suggests_alternatives(tok, monkeypatch):
    import datasets

    calls = []

    def fail(path, name=None, **kwargs):
        calls.append((path, name))
        raise ConnectionError("Couldn't reach the Hub\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(SentinelError) as e:
        load_data("wikitext:wikitext-2-raw-v1", tok)
    msg = str(e.value)
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert "\n" not in msg and "'wikitext:wikitext-2-raw-v1'" in msg
    assert "demo" in msg and ".txt" in msg and "Couldn't reach the Hub" in msg


def test_hub_dataset_with_own_splits(tok, monkeypatch):
    """Hub datasets go through datasets.load_dataset(name, config); their splits are used."""
    import datasets

    # Line-style rows (as wikitext stores them): rows ending in "\n" are running text.
    rows = {s: [f"{s} {t}\n" for t in numbered_lines(40, i)] + [""]
            for i, s in enumerate(["train", "validation", "test"])}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: dd)
    d = load_data("someone/corpus:cfg", tok, block_size=16)
    assert not d.validation_from_train
    # An empty row is a blank line of the running text.
    assert tok.decode(d.validation.ids.tolist()) == "".join(rows["validation"]) + "\n"
    assert tok.decode(d.test.ids.tolist()) == "".join(rows["test"]) + "\n"
    assert tok.eos_token_id not in d.train.ids.tolist()


def test_demo_resolves_to_the_demo_files(tok, tmp_path, monkeypatch):
    train = write_txt(tmp_path / "demo_train.txt", numbered_lines(60, 0))
    val = write_txt(tmp_path / "demo_val.txt", numbered_lines(20, 1))
    fake = types.ModuleType("sentinel_core.demo")
    fake.demo_corpus_files = lambda: {"train": [str(train)], "validation": [str(val)]}
    monkeypatch.setitem(sys.modules, "sentinel_core.demo", fake)
    from sentinel_core.defaults import resolve_data

    d = load_data(resolve_data("demo"), tok, block_size=16, cache_dir=tmp_path / "c")
    assert d.source == "demo" and not d.validation_from_train
    assert decoded_lines(tok, d.validation.ids) == numbered_lines(20, 1)


def test_in_process_cache_reuses_and_invalidates(tok, tmp_path, monkeypatch):
    path = write_txt(tmp_path / "c.txt", numbered_lines(100))
    first = load_data(str(path), tok, block_size=16, cache_dir=tmp_path / "c")
    assert load_data(str(path), tok, block_size=16, cache_dir=tmp_path / "c") is first
    assert load_data(str(path), tok, block_size=8, cache_dir=tmp_path / "c") is not first

    write_txt(path, numbered_lines(120))
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    changed = load_data(str(path), tok, block_size=16, cache_dir=tmp_path / "c")
    assert changed is not first
    assert changed.train.ids.numel() + changed.validation.ids.numel() > \
        first.train.ids.numel() + first.validation.ids.numel()


def test_eos_less_tokenizer_concatenates_documents(tmp_path):
    tok = make_tokenizer()
    tok.eos_token = None
    documents = docs(20)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    d = load_data(str(path), tok, block_size=8, cache_dir=tmp_path / "c")
    text = tok.decode(d.train.ids.tolist()) + tok.decode(d.validation.ids.tolist())
    assert sorted(t for t in documents if t in text) == sorted(documents)


# ---------------------------------------------------------------------------- batching


def test_batches_of_blocks():
    blocks = torch.arange(7 * 4).view(7, 4)
    out = list(batches(blocks, 3))
    assert [b["input_ids"].shape[0] for b in out] == [3, 3, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), blocks)
    for b in out:
        assert torch.equal(b["labels"], b["input_ids"])
        assert bool((b["attention_mask"] == 1).all())
    assert len(list(batches(blocks, 3, drop_last=True))) == 2

    s1 = torch.cat([b["input_ids"] for b in batches(blocks, 2, shuffle=True, seed=5)])
    s2 = torch.cat([b["input_ids"] for b in batches(blocks, 2, shuffle=True, seed=5)])
    s3 = torch.cat([b["input_ids"] for b in batches(blocks, 2, shuffle=True, seed=6)])
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert sorted(s1[:, 0].tolist()) == blocks[:, 0].tolist()


def test_collate_pads_and_masks_labels():
    seqs = [[5, 6, 7], [8], []]
    b = collate(seqs, pad_id=99)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99], [99, 99, 99]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [-100, -100, -100]]

    left = collate(seqs[:2], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"].tolist() == [[5, 6, 7], [-100, -100, 8]]

    ragged = list(batches([[1, 2], [3, 4, 5], [6]], 2, pad_id=0))
    assert ragged[0]["labels"].tolist() == [[1, 2, -100], [3, 4, 5]]
    assert ragged[1]["labels"].tolist() == [[6]]
    with pytest.raises(SentinelError, match="batch_size=0"):
        list(batches(torch.zeros(2, 2, dtype=torch.long), 0))
