"""Comparisons as training data: the store's judgements, split into training and held-out pairs, with the
tensors of their samples (prompt ids, image codes, pixels), and pairwise accuracy on them.

Pairs are held out by prompt: every judgement of every pair of a prompt falls on the same side, by a hash of
the prompt's text and a seed, so the split does not move when comparisons are added, and two pairs of the
same images (a prompt listed twice is sampled with the same seeds) never straddle it. Skips never reach here
(`Store.judgements` leaves them out); a tie is a target of 0.5, half a win for each side.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dalle.feedback.store import Judgement, Store
from dalle.tokenizer import TextTokenizer


def held_out(prompt: str, fraction: float, seed: int) -> bool:
    """Whether the pairs of `prompt` are in the held-out share `fraction` (about) of all prompts."""
    return zlib.crc32(f"{seed}/{prompt}".encode()) % 10_000 < fraction * 10_000


@dataclass(frozen=True)
class Selection:
    """Which judgements a run learns from and which it holds out (the fields of the objectives)."""

    rater: str = ""  # learn from this rater's comparisons only ("": every rater's)
    val_fraction: float = 0.2  # share of prompts whose pairs are held out
    split_seed: int = 0
    max_train_comparisons: int = 0  # 0: all; else the first N in the order they were made (a learning curve)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_train_comparisons < 0:
            raise ValueError(f"max_train_comparisons must be >= 0 (0: all), got {self.max_train_comparisons}")


def select(store: Store, sel: Selection, *, decided_only: bool = False) -> tuple[list[Judgement], list[Judgement]]:
    """(training, held-out) judgements of `sel.rater`. Raises ValueError with the fix when there are none."""
    counts = store.counts()
    if counts["comparisons"] == 0:
        raise ValueError(f"the store {store.path} has no comparisons ({counts['pairs']} pairs): rate pairs first "
                         "(tools/feedback.py serve or simulate)")
    judged = [j for j in store.judgements() if not sel.rater or j.rater == sel.rater]
    if decided_only:
        judged = [j for j in judged if not j.tie]
    if not judged:
        raters = sorted({j.rater for j in store.judgements()})
        raise ValueError(f"the store {store.path} has no usable comparisons by rater {sel.rater!r} (raters: {raters})")
    prompt = dict(store.db.execute("SELECT p.id, q.text FROM pairs p JOIN prompts q ON q.id = p.prompt_id"))
    val = [j for j in judged if held_out(prompt[j.pair_id], sel.val_fraction, sel.split_seed)]
    train = [j for j in judged if not held_out(prompt[j.pair_id], sel.val_fraction, sel.split_seed)]
    if sel.max_train_comparisons:
        train = train[: sel.max_train_comparisons]
    if not train or not val:
        raise ValueError(f"{len(judged)} comparisons give {len(train)} for training and {len(val)} held out: add "
                         "comparisons, or change val_fraction")
    return train, val


@dataclass
class SampleTable:
    """The samples the judgements name: prompt ids (K, T), codes (K, N) and pixels (K, 3, H, W) uint8."""

    row: dict[int, int]  # sample id -> row
    text: Tensor
    codes: Tensor
    pixels: Tensor | None
    model_ids: list[str]
    prompts: list[str]


def _rows(store: Store, ids: Sequence[int]) -> list[tuple[Any, ...]]:
    out = []
    for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
        chunk = list(ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        out += store.db.execute(f"SELECT s.id, q.text, s.model_id, s.codes, s.png FROM samples s JOIN prompts q "  # noqa: S608
                                f"ON q.id = s.prompt_id WHERE s.id IN ({marks})", chunk).fetchall()
    return out


def png_rgb(data: bytes) -> np.ndarray:
    """A stored sample's PNG as an (H, W, 3) uint8 array."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def load_samples(store: Store, ids: Iterable[int], tokenizer: TextTokenizer, text_len: int, *,
                 pixels: bool) -> SampleTable:
    """Read samples `ids`; every sample's codes must have one length (one model's grid)."""
    rows = sorted(_rows(store, sorted(set(ids))))
    codes = [json.loads(r[3]) for r in rows]
    lengths = {len(c) for c in codes}
    if len(lengths) > 1:
        raise ValueError(f"the store's samples have codes of lengths {sorted(lengths)}: they come from models of "
                         "different grids; use one store per model grid")
    prompts = [r[1] for r in rows]
    unique = sorted(set(prompts))
    ids_by_prompt = dict(zip(unique, tokenizer.encode_batch(unique, text_len, truncate_warn=False)[0]))
    images = None
    if pixels:
        images = torch.stack([torch.from_numpy(png_rgb(r[4])).permute(2, 0, 1) for r in rows])
    return SampleTable({r[0]: i for i, r in enumerate(rows)}, torch.stack([ids_by_prompt[p] for p in prompts]),
                       torch.tensor(codes, dtype=torch.long), images, [r[2] for r in rows], prompts)


def images_of(table: SampleTable, rows: Tensor, *, pixels: bool) -> Tensor:
    """The image inputs of table rows: float pixels in [0, 1] or codes."""
    return table.pixels[rows].float() / 255 if pixels else table.codes[rows]


class PairDataset(Dataset):
    """One item per judgement: {"first", "second"} table rows (winner first) and "target" (1, or 0.5 a tie)."""

    def __init__(self, judgements: Sequence[Judgement], table: SampleTable) -> None:
        self.first = torch.tensor([table.row[j.winner_id] for j in judgements])
        self.second = torch.tensor([table.row[j.loser_id] for j in judgements])
        self.target = torch.tensor([0.5 if j.tie else 1.0 for j in judgements])

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"first": self.first[i], "second": self.second[i], "target": self.target[i]}


def pairwise_accuracy(scores: dict[int, float], judgements: Iterable[Judgement]) -> tuple[float, int]:
    """(share of decided judgements whose winner scores higher, their number); equal scores count half."""
    hits, n = 0.0, 0
    for j in judgements:
        if j.tie:
            continue
        a, b = scores[j.winner_id], scores[j.loser_id]
        hits += 1.0 if a > b else 0.5 if a == b else 0.0
        n += 1
    return (hits / n if n else float("nan")), n


def agreement(judgements: Iterable[Judgement], reference: Iterable[Judgement]) -> tuple[float, int]:
    """(share of pairs decided by both whose winners agree, their number): e.g. a noisy rater against the
    noiseless one, the noise ceiling of a reward model trained on the noisy rater's labels."""
    ref = {j.pair_id: j.winner_id for j in reference if not j.tie}
    both = [j for j in judgements if not j.tie and j.pair_id in ref]
    return (sum(ref[j.pair_id] == j.winner_id for j in both) / len(both) if both else float("nan")), len(both)
