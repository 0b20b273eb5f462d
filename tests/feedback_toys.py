"""Toy parts that the feedback tests share: a known preference (bright images and low codes win), tiny models
saved as model directories, and a reward whose optimum is known."""

import json
from types import SimpleNamespace

import numpy as np
import torch
from tiny import tiny_config

from dalle.feedback.pairs import png_bytes
from dalle.feedback.store import Store
from dalle.reranker.model import Reranker
from dalle.tokenizer import TextTokenizer
from dalle.transformer.model import DALLE
from dvae.model import DiscreteVAE

PROMPTS = [f"a {size} {color} {shape}" for size in ("small", "big") for color in ("red", "blue", "green")
           for shape in ("circle", "square", "star", "triangle")]


def toy_store(path, pairs=48, model_id="sft@1", ties=4, seed=0):
    """Pairs of a good sample (bright pixels, codes below 32) and a bad one (dark, codes 32 and up), judged by
    rater "r": the good one wins, except `ties` ties; one skip. 16 codes (the tiny transformer's 4x4 grid)."""
    rng = np.random.default_rng(seed)
    store = Store(path)
    for i in range(pairs):
        pid = store.prompt(PROMPTS[i % len(PROMPTS)], "train")
        ids = []
        for good in (True, False):
            level = rng.uniform(0.6, 1.0) if good else rng.uniform(0.0, 0.4)
            image = torch.from_numpy(np.clip(level + rng.normal(0, 0.1, (3, 32, 32)), 0, 1)).float()
            codes = (rng.integers(0, 32, 16) + (0 if good else 32)).tolist()
            ids.append(store.add_sample(pid, model_id, i, {}, codes, png_bytes(image)))
        pair = store.add_pair(*ids)
        left = ids[i % 2]  # sides alternate
        choice = "tie" if i < ties else "left" if left == ids[0] else "right"
        store.record(pair, left, choice, "r")
    store.record(pair, left, "skip", "r2")
    return store


def make_parts(root):
    """A tokenizer, a tiny reranker, a tiny transformer that draws and one that also reads, saved as model
    directories under root, and a toy store (toy.db)."""
    from dalle.checkpoint import save_pretrained
    from dalle_tools import train_bpe

    assert train_bpe.main(["--shapes", "300", "--vocab", "300", "--out", str(root / "tokenizer.json")]) == 0
    tok = TextTokenizer.from_file(root / "tokenizer.json")
    torch.manual_seed(0)
    save = lambda d: tok.save(d / "tokenizer.json")  # noqa: E731
    save_pretrained(Reranker(tiny_config("reranker", text_vocab_size=tok.vocab_size, layers=1)), root / "reranker",
                    extra=save)
    save_pretrained(DiscreteVAE(tiny_config("dvae", downsample=8)), root / "dvae")  # the tiny transformer's 4x4 grid

    def extra(d):
        save(d)
        (d / "dvae.json").write_text(json.dumps({"path": str(root / "dvae")}))
    save_pretrained(DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2)), root / "dalle", extra=extra)
    save_pretrained(DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2, layouts=("t2i", "caption"))),
                    root / "reader", extra=extra)
    toy_store(root / "toy.db").close()
    return root


def task_tok(parts):
    return TextTokenizer.from_file(parts / "tokenizer.json")


class LowCodes(torch.nn.Module):
    """A reward whose optimum is known: the lower the image's codes, the better."""

    config = SimpleNamespace(reads_pixels=False, text_seq_len=12)

    def forward(self, text, codes):
        self.scored = len(codes)
        return -codes.float().mean(-1) / 8
