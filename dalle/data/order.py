"""The order in which training reads samples: one seeded stream, split across ranks, resumable anywhere.

Every random choice is a function of integers (seed, epoch, index, step), never of a global RNG's
history, so a run stopped after any step and restarted reads exactly the samples, with exactly the
per-sample seeds, that an uninterrupted run would have read, on any number of ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """Combine integers into a 63-bit seed (splitmix64 rounds); stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler):
    """Endless stream of (index, sample_seed): a fresh seeded permutation per epoch, started at any
    position, so the batches after a resume are the ones an uninterrupted run would have seen.

    The stream is the same on every rank; rank r of `world` reads positions start + r, start + r + world,
    ..., so ranks never share a sample and together read exactly what one process would."""

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.size, self.seed, self.start, self.rank, self.world = size, seed, start, rank, world

    def _stream(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            for i in torch.randperm(self.size, generator=g)[offset:].tolist():
                yield i, mix_seed(self.seed, epoch, i)
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(self._stream(), self.rank, None, self.world)


class Seeded(Dataset):
    """Hands each sample its seed when the dataset takes `(index, seed)` keys (`accepts_seed`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.accepts_seed = getattr(dataset, "accepts_seed", False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key] if self.accepts_seed else self.dataset[key[0]]


def endless(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """A streaming loader's batches, epoch after epoch (each epoch re-seeds shard order and augmentation)."""
    epoch = 0
    while True:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1
