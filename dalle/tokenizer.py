"""The text tokenizer of stage 2: byte-level BPE over lower-cased captions (paper sec. 2.2, appendix B.2).

This module owns caption -> token ids and back, the ``tokenizer.json`` file format (Hugging Face
``tokenizers``, loadable by ``tokenizers.Tokenizer.from_file``) and the padding convention below. Training
a vocabulary from raw captions is :meth:`TextTokenizer.train`; ``tools/train_bpe.py`` is its CLI.

The paper lower-cases captions, BPE-encodes them with a 16,384-token vocabulary, truncates to 256 tokens
and uses BPE dropout with rate 0.1 during training (sec. 2.2). Lower-casing (after NFKC) lives inside
``tokenizer.json`` as a normalizer, so every user of the file applies it. The BPE is byte-level (GPT-2
style, full 256-byte alphabet), so any Unicode string encodes and no unknown token is needed.

BPE dropout (Provilkov et al. 2020) runs in Python, not in HF's ``BPE(dropout=...)``, whose coins come from
Rust's OS-seeded thread RNG, which nothing can seed. Training needs every random choice of a step drawn from a
per-sample seed (so a resumed run is bitwise equal to an uninterrupted one): ``encode(..., dropout=True,
rng=random.Random(seed))`` draws every coin from ``rng``. Only the merge loop is Python; normalisation and
pre-tokenisation are the file's own (HF), and with no drops the ids equal HF's deterministic ones (tested).

Padding (appendix B.2): DALL-E gives every text position its own learned pad token instead of one shared
pad, so :meth:`TextTokenizer.encode_batch` right-pads position ``j`` with id ``vocab_size + j``. The
transformer's text embedding therefore has ``vocab_size + text_len`` rows
(``vocab_size`` is the model config's ``text_vocab_size``; the row count is
:meth:`TextTokenizer.padded_vocab_size`). An empty prompt is all pads: unconditional generation.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TOKENIZER_NAME = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from every byte, so smaller vocabularies are impossible


class TruncationWarning(UserWarning):
    """A prompt had more BPE tokens than the text sequence length and lost its tail."""


def _resolve(path: str | os.PathLike[str]) -> Path:
    # A directory (existing, or any path not ending in .json) means the tokenizer.json inside it, so a model
    # directory can be passed as is.
    p = Path(path)
    return p / TOKENIZER_NAME if p.is_dir() or p.suffix.lower() != ".json" else p


def _clean(text: str) -> str:
    """``text`` as valid Unicode: surrogate pairs joined, lone surrogates (e.g. '\\ud800') replaced by U+FFFD."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # the Rust side only accepts valid UTF-8
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _new_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # NFKC folds compatibility forms (full-width letters, ligatures) before lower-casing (sec. 2.2).
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # No prefix space: decode(encode(text)) gives back the normalized text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _check_vocab(tok: Tokenizer, where: str) -> int:
    """The vocabulary size, after checking ids are exactly 0..n-1 (the pad ids start right after them)."""
    ids = sorted(tok.get_vocab(with_added_tokens=True).values())
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"{where}: token ids must be 0..n-1 without gaps, got {len(ids)} ids up to {ids[-1:]}")
    return len(ids)


class TextTokenizer:
    """Byte-level BPE text tokenizer: HF's deterministic encoder plus, on request, seeded BPE dropout.

    ``bpe_dropout`` is the merge-dropout rate used by ``encode(..., dropout=True, rng=...)`` (the paper: 0.1).
    It is a training setting, not part of ``tokenizer.json``, whose model always has (HF's) dropout off.
    """

    def __init__(self, tokenizer: Tokenizer, *, bpe_dropout: float = 0.1, name: str = "tokenizer") -> None:
        if not isinstance(tokenizer.model, models.BPE):
            raise ValueError(f"{name}: expected a BPE model, got {type(tokenizer.model).__name__}")
        if not 0.0 <= bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout must be in [0, 1), got {bpe_dropout!r}")
        # A foreign tokenizer.json may carry padding/truncation settings; this class does both itself.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.model.dropout = None
        self._vocab_size = _check_vocab(tokenizer, name)
        self._tok = tokenizer
        self._bpe_dropout = float(bpe_dropout)
        # Merge and vocabulary tables of the Python BPE, built on first dropout use: inference never pays for them.
        self._tables: tuple[dict[tuple[int, int], tuple[int, int]], dict[str, int]] | None = None

    # ----- construction and files -----

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 16384,
        min_frequency: int = 2,
        *,
        bpe_dropout: float = 0.1,
        show_progress: bool = False,
    ) -> TextTokenizer:
        """Learn a BPE vocabulary of at most ``vocab_size`` tokens from ``texts`` (lower-cased first).

        A corpus with few distinct words runs out of merges early; :attr:`vocab_size` then reports the
        smaller real size.
        """
        if not isinstance(vocab_size, int) or vocab_size < BYTE_ALPHABET_SIZE:
            raise ValueError(
                f"vocab_size must be an int >= {BYTE_ALPHABET_SIZE} (the byte alphabet), got {vocab_size!r}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        count = 0

        def clean() -> Iterator[str]:
            nonlocal count
            for t in texts:
                count += 1
                yield _clean(t)

        tok = _new_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # Every byte in the vocabulary, seen in training or not, so any input encodes without an unk token.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=show_progress,
        )
        tok.train_from_iterator(clean(), trainer)
        if count == 0:
            raise ValueError("no texts to train the tokenizer on")
        return cls(tok, bpe_dropout=bpe_dropout, name="trained tokenizer")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, bpe_dropout: float = 0.1) -> TextTokenizer:
        """Load a ``tokenizer.json`` (or ``path/tokenizer.json`` when ``path`` is a directory)."""
        file = _resolve(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file {file} does not exist")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"tokenizer file {file} is not a valid tokenizer.json: {e}") from e
        return cls(tok, bpe_dropout=bpe_dropout, name=f"tokenizer file {file}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` (to ``path/tokenizer.json`` for a directory); returns the file written."""
        file = _resolve(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(self._tok.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, file)  # atomic: a crash mid-write never leaves a half-written tokenizer.json
        return file

    # ----- vocabulary -----

    @property
    def vocab_size(self) -> int:
        """Number of BPE tokens (ids 0..vocab_size-1); pad ids are not included."""
        return self._vocab_size

    @property
    def bpe_dropout(self) -> float:
        return self._bpe_dropout

    def padded_vocab_size(self, text_len: int) -> int:
        """Rows of the transformer's text embedding: BPE tokens plus one pad token per position (B.2)."""
        return self._vocab_size + text_len

    # ----- encoding -----

    def _merge_tables(self) -> tuple[dict[tuple[int, int], tuple[int, int]], dict[str, int]]:
        """``({(left id, right id): (rank, merged id)}, vocab)``, as HF's BPE model builds them."""
        if self._tables is None:
            model = json.loads(self._tok.to_str())["model"]
            if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
                raise ValueError("BPE dropout supports plain (byte-level) BPE, not subword prefixes/suffixes")
            if self._tok.get_added_tokens_decoder():
                raise ValueError("BPE dropout does not support tokenizers with added/special tokens")
            vocab = self._tok.get_vocab(with_added_tokens=False)
            merges = {}
            for rank, m in enumerate(model["merges"]):
                a, b = m.split(" ") if isinstance(m, str) else m  # "a b" (tokenizers < 0.20) or ["a", "b"]
                merges[vocab[a], vocab[b]] = (rank, vocab[a + b])  # a repeated pair keeps its last rank (as HF)
            self._tables = merges, vocab
        return self._tables

    def _bpe_encode(self, text: str, p: float, rng: random.Random) -> list[int]:
        """BPE with merge dropout rate ``p``, every coin drawn from ``rng`` (``p=0``: HF's ids, no draws).

        Per pre-token, start from its characters (byte-level symbols, all in the vocabulary) and repeat: take
        the adjacent pairs that have a merge, in HF's order (rank, then position; models/bpe/word.rs), drop
        each with probability ``p`` and apply the first survivor, one occurrence; stop when none survives.
        With no drops this is HF's deterministic BPE. HF's own dropout differs slightly: its stale heap entries
        give dropped merges extra coins, so its effective rate is lower (at p=0.1 about 1% fewer tokens on
        shapes captions than here). ``ignore_merges`` is not applied: it would exempt whole words from dropout.
        """
        merges, vocab = self._merge_tables()
        norm, pre = self._tok.normalizer, self._tok.pre_tokenizer
        text = norm.normalize_str(text) if norm is not None else text
        words = [w for w, _ in pre.pre_tokenize_str(text)] if pre is not None else [text]
        unk = vocab.get(self._tok.model.unk_token) if self._tok.model.unk_token else None
        out: list[int] = []
        for word in words:
            sym = [i for c in word if (i := vocab.get(c, unk)) is not None]  # HF skips unknowns without unk
            while len(sym) > 1:
                cands = sorted(
                    (m[0], j, m[1]) for j, m in enumerate(map(merges.get, zip(sym, sym[1:]))) if m is not None
                )
                for _, j, new in cands:
                    if p == 0.0 or rng.random() >= p:
                        sym[j : j + 2] = [new]
                        break
                else:  # no candidate, or every one dropped
                    break
            out += sym
        return out

    def encode(self, text: str, *, dropout: bool = False, rng: random.Random | None = None) -> list[int]:
        """BPE ids of ``text`` (lower-cased), all in [0, vocab_size).

        ``dropout`` applies BPE dropout at rate :attr:`bpe_dropout`, drawing every coin from ``rng``. Only a
        given ``rng`` is reproducible: with None a fresh OS-seeded ``random.Random()`` is used. The draws
        taken depend only on the text and the rng state, so a seeded rng gives the same ids on any run.
        """
        text = _clean(text)
        if not dropout or self._bpe_dropout == 0.0:
            return self._tok.encode(text).ids
        return self._bpe_encode(text, self._bpe_dropout, rng if rng is not None else random.Random())

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; ids >= vocab_size (the per-position pads) are skipped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        return self._tok.decode([i for i in ids if i < self._vocab_size])

    def encode_batch(
        self,
        texts: Sequence[str],
        text_len: int,
        *,
        dropout: bool = False,
        rng: random.Random | None = None,
        truncate_warn: bool = True,
    ) -> tuple[torch.Tensor, list[int]]:
        """Encode, truncate and pad ``texts`` for the transformer.

        Returns ``(ids, cut)``: ``ids`` is a LongTensor (B, text_len) where position ``j`` past a prompt's
        end holds its pad id ``vocab_size + j`` (appendix B.2); ``cut[b]`` is how many tokens prompt ``b``
        lost to truncation (0 when it fit). Truncation keeps the first ``text_len`` tokens and, unless
        ``truncate_warn`` is False, issues one :class:`TruncationWarning` for the call. ``dropout`` and
        ``rng`` are as in :meth:`encode`, the prompts drawing from ``rng`` in order (one rng for the batch).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of prompts; wrap a single prompt in a list")
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        if dropout and rng is None:
            rng = random.Random()
        # One call per prompt, not HF's encode_batch: its thread pool makes HF disable parallelism (with a
        # warning) in every DataLoader worker forked afterwards, and captions are too short to gain from it.
        encodings = [self.encode(t, dropout=dropout, rng=rng) for t in texts]
        pads = range(self._vocab_size, self._vocab_size + text_len)
        rows, cut = [], []
        for e in encodings:
            ids = e[:text_len]
            rows.append(ids + list(pads[len(ids) :]))  # pad id of position j is vocab_size + j
            cut.append(len(e) - len(ids))
        out = torch.tensor(rows, dtype=torch.long).reshape(len(rows), text_len)  # (B, T); reshape covers B=0
        if truncate_warn and any(cut):
            self._warn_truncated(texts, encodings, cut, text_len)
        return out, cut

    @staticmethod
    def _warn_truncated(texts: Sequence[str], encodings: list[list[int]], cut: list[int], text_len: int) -> None:
        b = max(range(len(cut)), key=cut.__getitem__)  # name the worst prompt
        text = texts[b] if len(texts[b]) <= 60 else texts[b][:57] + "..."
        n = len({t for t, c in zip(texts, cut) if c > 0})  # a prompt's candidates share its text
        others = f" ({n - 1} more prompts in this batch were truncated too)" if n > 1 else ""
        warnings.warn(
            f"prompt truncated: {cut[b]} of {len(encodings[b])} tokens cut to fit text_seq_len {text_len}: "
            f"{text!r}{others}",
            TruncationWarning,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self._vocab_size}, bpe_dropout={self._bpe_dropout})"
