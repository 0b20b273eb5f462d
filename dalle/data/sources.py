"""One place that turns a `data:` config section into a data set, for every training tool.

Sources: `shapes` (generated on the fly, deterministic), `folder` (name.jpg + name.txt pairs),
`webdataset` (tar shards as img2dataset writes them, local paths or brace patterns) and `tokens`
(captions with image codes pre-computed by tools/pretokenize.py, for the transformer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

log = logging.getLogger("dalle.data")

SOURCES = ("shapes", "folder", "webdataset", "tokens")


@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"
    path: str = ""  # folder or shard pattern of the training data (not used by shapes)
    val_path: str = ""  # held-out folder or shards; empty: evaluate on the first training samples
    train_size: int = 100_000  # shapes: number of distinct training scenes
    val_size: int = 1024  # shapes: held-out scenes (split "val", unseen in training)
    seed: int = 0
    require_captions: bool = True  # False lets a dVAE train on a folder of images without captions
    shuffle_buffer: int = 1000  # webdataset: samples held for shuffling
    # folder/webdataset: images whose header says more pixels (width x height) are skipped, warned about and
    # counted before they are decoded: decoding costs 8 bytes a pixel per worker (a 410 KiB 12000x12000 PNG:
    # 1.09 GiB). 0: max(64 * image_size**2, 2**25), i.e. 33.5 MP (any photo up to 24 MP) until image_size
    # passes 724 (see dalle.data.readers.default_max_pixels).
    max_pixels: int = 0
    # folder/webdataset: the colour transparent pixels are composited over (a name or #rrggbb), so they
    # do not turn black.
    background: str = "white"
    # folder/webdataset: "paper" crops training images at random (Listings 1 and 2; they cut the edges of
    # images that fill their frame); "center" takes the centre square, resized, in training too.
    preprocess: str = "paper"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "shapes" and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path (a folder or a shard pattern)")
        if self.max_pixels < 0:
            raise ValueError(f"data.max_pixels must be >= 0 (0: sized from the image size), got {self.max_pixels}")
        from dalle.data.transforms import PREPROCESS_MODES, parse_background

        parse_background(self.background)
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"data.preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")


def build_dataset(cfg: DataConfig, split: str, image_size: int, transform: str) -> Dataset:
    """The data set of `split` ("train" or "val"), yielding {"image", "caption", "key", ...} samples.

    `transform` names the preprocessing: "dvae" (paper Listing 1), "dalle" (Listing 2) or "eval"
    (deterministic centre crop); validation always uses "eval", and so does training when
    `cfg.preprocess` is "center".
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.source == "shapes":
        from dalle.data.shapes import ShapesDataset

        size = cfg.train_size if split == "train" else cfg.val_size
        return ShapesDataset(split=split, size=size, seed=cfg.seed, image_size=image_size)
    if cfg.source == "tokens":
        from dalle.data.tokens import TokenShards

        if split == "val" and not cfg.val_path:
            log.warning("data.val_path is not set: validating on training data, so figures are not held-out")
            return TokenShards(cfg.path, limit=cfg.val_size)
        return TokenShards(cfg.path if split == "train" else cfg.val_path)

    from dalle.data.readers import ImageTextFolder, default_max_pixels, webdataset_pairs
    from dalle.data.transforms import parse_background, transform_from_name

    path = cfg.path if split == "train" else (cfg.val_path or cfg.path)
    if split == "val" and not cfg.val_path:
        log.warning("data.val_path is not set: evaluating on training data, so figures are not held-out")
    tf = transform_from_name(transform if split == "train" else "eval", image_size, cfg.preprocess)
    max_pixels = cfg.max_pixels or default_max_pixels(image_size)
    background = parse_background(cfg.background)
    if cfg.source == "folder":
        # Validating on the training folder scans it again: its skips were warned about (and counted) once.
        return ImageTextFolder(path, tf, require_captions=cfg.require_captions, seed=cfg.seed,
                               max_pixels=max_pixels, quiet=split == "val" and not cfg.val_path,
                               background=background)
    return webdataset_pairs(path, tf, shuffle=cfg.shuffle_buffer if split == "train" else 0, seed=cfg.seed,
                            require_captions=cfg.require_captions, max_pixels=max_pixels, background=background)


def eval_batches(dataset: Dataset, n: int, batch_size: int = 64):
    """Batches of the first `n` samples of a map-style or streaming data set, unreadable ones dropped."""
    from torch.utils.data import DataLoader, IterableDataset, Subset

    from dalle.data.readers import collate_skip_bad

    if not isinstance(dataset, IterableDataset):
        dataset = Subset(dataset, range(min(n, len(dataset))))
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_bad):
        size = next((len(v) for v in batch.values() if isinstance(v, torch.Tensor)), 0)
        if not size:  # every sample of the batch was unreadable
            continue
        take = min(size, n - seen)
        yield {k: v[:take] for k, v in batch.items() if k not in ("skipped", "non_utf8_captions")}
        seen += take
        if seen >= n:
            return
