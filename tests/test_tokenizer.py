"""Tests of the stage-2 BPE text tokenizer (dalle/tokenizer.py) and its CLI (tools/train_bpe.py)."""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import pickle
import random
import re
import textwrap
import typing
import warnings
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from dalle.data.shapes import make_sample
from dalle.tokenizer import TextTokenizer, TruncationWarning, _clean
from dalle_tools import train_bpe

CAPTIONS = [make_sample(i).caption for i in range(5)] + list(train_bpe.shapes_captions(400))
LONG = "a small blue square to the left of a large red star"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def test_caption_only_path_matches_make_sample():
    assert CAPTIONS[:5] == CAPTIONS[5:10]


def test_vocab_size_and_round_trip(tok):
    assert tok.vocab_size == 300 == Tokenizer.from_str(tok._tok.to_str()).get_vocab_size()
    for text in CAPTIONS[:20] + ["A Large RED Circle", "  spaces,  punctuation! 123"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text.lower()
    assert tok.encode("A LARGE Red Circle") == tok.encode("a large red circle")


def test_small_corpus_stops_early():
    # ~30 distinct words cannot fill 16384 tokens: the real size is reported, and ids stay below it.
    small = TextTokenizer.train(CAPTIONS, vocab_size=16384)
    assert 256 < small.vocab_size < 1000
    assert max(small.encode(" ".join(CAPTIONS[:50]))) < small.vocab_size
    assert len(small.encode(LONG)) == len(LONG.split())  # every word is one token


def test_encode_batch_pads_per_position(tok):
    ids, cut = tok.encode_batch(["a red circle", LONG.upper()], text_len=32)
    assert ids.shape == (2, 32) and ids.dtype == torch.long and cut == [0, 0]
    for b, text in enumerate(["a red circle", LONG]):
        n = len(tok.encode(text))
        assert ids[b, :n].tolist() == tok.encode(text)
        assert ids[b, n:].tolist() == [tok.vocab_size + j for j in range(n, 32)]
    assert tok.decode(ids[1]) == LONG
    assert tok.padded_vocab_size(32) == tok.vocab_size + 32 > ids.max()


def test_empty_prompt_is_all_pads(tok):
    ids, cut = tok.encode_batch([""], text_len=8)
    assert ids[0].tolist() == list(range(tok.vocab_size, tok.vocab_size + 8)) and cut == [0]
    assert tok.encode("") == [] and tok.decode(ids[0]) == ""


def test_truncation_warns_with_count(tok):
    n = len(tok.encode(LONG))
    with pytest.warns(TruncationWarning, match=f"prompt truncated: 3 of {n} tokens cut to fit text_seq_len {n - 3}"):
        ids, cut = tok.encode_batch([LONG, "a"], text_len=n - 3)
    assert cut == [3, 0] and ids[0].tolist() == tok.encode(LONG)[: n - 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cut = tok.encode_batch([LONG, LONG + " and more"], text_len=4, truncate_warn=False)
    assert cut[0] == n - 4 and cut[1] > cut[0]


@pytest.mark.parametrize(
    "text", ["😀 🐱‍👤", "猫が好き 中文", "\ud800 lone surrogate", "\x00\x01\x7f ctrl", "é\u0301 ﬁ Ｒｅｄ"]
)
def test_any_unicode_encodes(tok, text):
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    batch, _ = tok.encode_batch([text], text_len=64)
    assert batch.max() < tok.padded_vocab_size(64)
    assert isinstance(tok.decode(ids), str)


def test_nfkc_lowercase_saved_in_file(tok):
    spec = json.loads(tok._tok.to_str())
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["NFKC", "Lowercase"]
    assert spec["model"]["dropout"] is None  # inference files are deterministic
    assert tok.encode("Ｒｅｄ") == tok.encode("red")  # full-width letters fold to ASCII


DOC_MODULES = [argparse, collections, functools, itertools, json, random, re, textwrap, typing]
FIXED = (
    "| |   |\t\n\n  \r\n|a|aaaa aaaaa|...!!!???|it's we'll they'd 'quoted'|3.14159|2024-01-01 12:34:56|1234567890 000"
    "|😀 🐱‍👤 👍🏽 🇫🇷|猫が好き 中文 한국어|Ｒｅｄ ﬁ é\u0301|\x00\x01\x7f ctrl"
    "|tabs\tand\tnewlines\n|  leading and trailing  "
)
CHUNKS = "a|e|the|red|circle| |  |\t|\n|0|42|!|?|,|.|'s|'ll|\"|😀|🐱‍👤|猫|中文|é|ﬁ|Ｒ|ß|İ|aa|ssss|\u200d|-|_|/|(|)"


def _diverse_texts() -> list[str]:
    """A few hundred strings: shapes captions, English, punctuation, emoji, CJK, digits, whitespace runs."""
    rng = random.Random(0)
    english = [ln.strip() for m in DOC_MODULES for ln in (m.__doc__ or "").splitlines() if len(ln.strip()) > 20]
    fixed = FIXED.split("|") + ["\ud800 lone surrogate"]
    chunks = CHUNKS.split("|")
    rand = ["".join(rng.choices(chunks, k=rng.randint(1, 40))) for _ in range(100)]
    caps = [c.upper() if i % 7 == 0 else c for i, c in enumerate(CAPTIONS[:100])]
    return caps + english[:120] + fixed + rand


@pytest.fixture(scope="module")
def wide() -> TextTokenizer:
    # More merges than the shapes vocabularies, including multi-byte (emoji, CJK) and whitespace ones.
    corpus = _diverse_texts() * 3 + ["猫が好き 中文 😀😀 🐱‍👤 " * 3, "\n\n  \t  1234 5678 " * 3]
    return TextTokenizer.train(corpus, vocab_size=1500)


def test_python_bpe_equals_hf(tok, wide):
    # With no drops the Python merge loop is HF's deterministic BPE: vocab 300 (shapes), ~360 (whole shapes
    # words, long merge chains) and 1500 (English, emoji, CJK, whitespace) on ~340 diverse strings each.
    texts = _diverse_texts()
    assert len(texts) > 300
    for t in (tok, TextTokenizer.train(CAPTIONS, vocab_size=16384), wide):
        assert len(json.loads(t._tok.to_str())["model"]["merges"]) > 40
        mismatches = [x for x in texts if t._bpe_encode(_clean(x), 0.0, random.Random(0)) != t.encode(x)]
        assert not mismatches, mismatches[:5]
        assert TextTokenizer(Tokenizer.from_str(t._tok.to_str()), bpe_dropout=0.0).encode(LONG, dropout=True) == (
            t.encode(LONG)
        )


def test_dropout_is_seeded(wide):
    texts = _diverse_texts()
    state = random.getstate()
    for p in (0.1, 0.3, 0.5):
        t = TextTokenizer(Tokenizer.from_str(wide._tok.to_str()), bpe_dropout=p)
        runs = [[t.encode(x, dropout=True, rng=random.Random(seed)) for x in texts] for seed in (1, 1, 2)]
        assert runs[0] == runs[1]  # same seed, same segmentations
        assert runs[0] != runs[2]  # another seed, another segmentation for some input
        assert runs[0] != [t.encode(x) for x in texts]  # dropout did drop
        for x, ids in zip(texts, runs[0]):
            assert all(0 <= i < t.vocab_size for i in ids)
            assert t.decode(ids) == t._tok.normalizer.normalize_str(_clean(x))  # same text, other pieces
    assert random.getstate() == state  # the global random module is never used


def test_dropout_rng_state_and_batch(tok):
    a, b = random.Random(5), random.Random(5)
    batch, _ = tok.encode_batch(CAPTIONS[:8], text_len=64, dropout=True, rng=a)
    for row, text in zip(batch, CAPTIONS[:8]):  # one rng for the batch, drawn prompt by prompt
        ids = tok.encode(text, dropout=True, rng=b)
        assert row[: len(ids)].tolist() == ids
    assert a.getstate() == b.getstate()  # resumable: the draws depend only on the texts and the rng state
    assert batch.max() < tok.padded_vocab_size(64)
    c = random.Random(5)
    assert (
        tok.encode_batch(CAPTIONS[:8], text_len=64, rng=c)[0].tolist() == tok.encode_batch(CAPTIONS[:8], 64)[0].tolist()
    )
    assert c.getstate() == random.Random(5).getstate()  # no dropout, no draws
    seen = {tuple(tok.encode(LONG, dropout=True)) for _ in range(50)}  # no rng: OS-seeded, varies
    assert len(seen) > 1 and all(tok.decode(list(s)) == LONG for s in seen)
    assert tok.encode(LONG) == tok.encode(LONG, dropout=False, rng=random.Random(0))


def test_dropout_rate_extremes(tok):
    words = tok._tok.pre_tokenizer.pre_tokenize_str(LONG)
    high = TextTokenizer(Tokenizer.from_str(tok._tok.to_str()), bpe_dropout=0.999)
    assert high.encode(LONG, dropout=True, rng=random.Random(0)) == [
        tok._tok.token_to_id(c) for w, _ in words for c in w
    ]
    rng = random.Random(0)
    mean = sum(len(tok.encode(c, dropout=True, rng=rng)) for c in CAPTIONS[:200]) / 200
    assert sum(len(tok.encode(c)) for c in CAPTIONS[:200]) / 200 < mean  # p=0.1 gives longer sequences


def test_dropout_merge_formats_and_limits(tok):
    legacy = json.loads(tok._tok.to_str())
    legacy["model"]["merges"] = [" ".join(m) for m in legacy["model"]["merges"]]  # tokenizers < 0.20: "a b"
    fake = SimpleNamespace(
        _tables=None,
        _tok=SimpleNamespace(
            to_str=lambda: json.dumps(legacy), get_added_tokens_decoder=dict, get_vocab=tok._tok.get_vocab
        ),
    )
    assert TextTokenizer._merge_tables(fake) == tok._merge_tables()
    special = Tokenizer.from_str(tok._tok.to_str())
    special.add_special_tokens(["<x>"])
    with pytest.raises(ValueError, match="added/special"):
        TextTokenizer(special).encode(LONG, dropout=True, rng=random.Random(0))


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.json"
    for loaded in (TextTokenizer.from_file(tmp_path / "model"), TextTokenizer.from_file(path)):
        assert loaded.vocab_size == tok.vocab_size
        assert [loaded.encode(c) for c in CAPTIONS[:20]] == [tok.encode(c) for c in CAPTIONS[:20]]
    assert Tokenizer.from_file(str(path)).encode("A Red Circle").ids == tok.encode("a red circle")
    assert pickle.loads(pickle.dumps(tok)).encode(LONG) == tok.encode(LONG)  # DataLoader workers (spawn)
    assert TextTokenizer.from_file(path, bpe_dropout=0.0).encode(LONG, dropout=True) == tok.encode(LONG)


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextTokenizer.from_file(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="empty-dir"):
        TextTokenizer.from_file((tmp_path / "empty-dir").mkdir() or tmp_path / "empty-dir")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        TextTokenizer.from_file(bad)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        TextTokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match="text_len"):
        tok.encode_batch(["a"], text_len=0)
    with pytest.raises(TypeError):
        tok.encode_batch("a red circle", text_len=8)
    with pytest.raises(ValueError, match="bpe_dropout"):
        TextTokenizer.train(CAPTIONS, vocab_size=300, bpe_dropout=1.0)


def test_cli_shapes(tmp_path, capsys):
    assert train_bpe.main(["--shapes", "500", "--vocab", "300", "--out", str(tmp_path / "bpe")]) == 0
    loaded = TextTokenizer.from_file(tmp_path / "bpe" / "tokenizer.json")
    assert loaded.vocab_size == 300 and Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    assert "vocab_size 300" in capsys.readouterr().out
    before = (tmp_path / "bpe" / "tokenizer.json").read_bytes()
    with pytest.raises(SystemExit, match="tokenizer.json already exists: choose another --out, or pass --overwrite"):
        train_bpe.main(["--shapes", "50", "--vocab", "260", "--out", str(tmp_path / "bpe")])
    assert (tmp_path / "bpe" / "tokenizer.json").read_bytes() == before  # a model's tokenizer, kept
    assert train_bpe.main(["--shapes", "50", "--vocab", "260", "--out", str(tmp_path / "bpe"), "--overwrite"]) == 0


def test_cli_captions_and_folder(tmp_path):
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS[:300]) + "\n\n", encoding="utf-8")
    out = tmp_path / "caps-tok.json"
    assert train_bpe.main(["--captions", str(tmp_path / "caps.txt"), "--vocab", "280", "--out", str(out)]) == 0
    assert TextTokenizer.from_file(out).vocab_size == 280
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        make_sample(i).image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{CAPTIONS[i]}\n{CAPTIONS[i + 3]}", encoding="utf-8")
    assert train_bpe.main(["--folder", str(tmp_path / "images"), "--min-frequency", "1", "--out", str(tmp_path)]) == 0
    assert TextTokenizer.from_file(tmp_path).decode(TextTokenizer.from_file(tmp_path).encode("A Red")) == "a red"


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_bpe.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--shapes", "--captions", "--folder", "--out", "--vocab", "--min-frequency", "--seed"):
        assert flag in help_text
    assert "16384" in help_text
    with pytest.raises(SystemExit):
        train_bpe.main(["--out", str(tmp_path)])  # no caption source
    with pytest.raises(SystemExit):
        train_bpe.main(["--captions", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
