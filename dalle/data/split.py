"""A held-out split of a folder or of webdataset shards, made once and recorded (tools/train_all.py).

The held-out images are the ones whose keys hash lowest, so the split depends on the keys alone, not
on the order of the files, and holds exactly the number asked for.
A folder is split into two folders of symbolic links (image, caption and metadata files), so nothing
is copied; shards are re-packed into train and held-out shards, their raw bytes untouched.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dalle.data.readers import expand_shard_urls, scan_image_text_folder


def held_out_keys(keys: list[str], count: int, seed: int = 0) -> set[str]:
    """The `count` keys with the lowest hash of (seed, key)."""
    return set(sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())[:count])


def held_out_count(total: int) -> int:
    """How many images to hold out: a tenth, at least 8 (a covariance and a grid need a few), at most 1000
    (evaluation time grows with it, its precision hardly past that)."""
    return max(8, min(1000, total // 10))


def split_folder(src: str | Path, out: Path, seed: int = 0) -> dict:
    """Link the pairs of folder `src` into out/train and out/val; returns the record of the split."""
    entries, skipped = scan_image_text_folder(src)
    val = held_out_keys([e.key for e in entries], held_out_count(len(entries)), seed)
    split = {"train": [], "val": []}
    for e in entries:
        part = "val" if e.key in val else "train"
        split[part].append(e.key)
        stem = out / part / e.key
        stem.parent.mkdir(parents=True, exist_ok=True)
        for path in (e.image, e.caption, e.meta):
            if path is not None:
                link = stem.with_name(stem.name + os.path.splitext(path)[1])
                if not link.is_symlink():
                    link.symlink_to(os.path.abspath(path))
    return {"source": "folder", "data": os.path.abspath(src), "train": str(out / "train"),
            "val": str(out / "val"), "seed": seed, "skipped": len(skipped),
            "train_keys": split["train"], "val_keys": split["val"]}


def shard_samples(urls: list[str]):
    import webdataset as wds

    for url in urls:
        yield from wds.WebDataset(url, shardshuffle=False, empty_check=False)


def split_shards(pattern: str, out: Path, seed: int = 0) -> dict:
    """Re-pack the samples of shards `pattern` into out/train-*.tar and out/val-*.tar, plus
    out/train-captions.txt (every caption line of the training split, for the tokenizer)."""
    import webdataset as wds

    urls = expand_shard_urls(pattern)
    keys = [str(s["__key__"]) for s in shard_samples(urls)]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{pattern}: sample keys repeat across shards, so a key-based split is ambiguous")
    val = held_out_keys(keys, held_out_count(len(keys)), seed)
    out.mkdir(parents=True, exist_ok=True)
    split = {"train": [], "val": []}
    writers = {part: wds.ShardWriter(str(out / f"{part}-%06d.tar"), maxcount=100_000, verbose=0)
               for part in split}
    with (out / "train-captions.txt").open("w", encoding="utf-8") as captions:
        for sample in shard_samples(urls):
            key = str(sample["__key__"])
            part = "val" if key in val else "train"
            split[part].append(key)
            writers[part].write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
            if part == "train" and "txt" in sample:
                captions.write(sample["txt"].decode("utf-8", errors="replace").strip() + "\n")
    shards = {}
    for part, w in writers.items():
        last = max(w.shard - 1, 0)  # w.shard: shards opened so far (the first one when built); close drops it
        w.close()
        shards[part] = str(out / (f"{part}-000000.tar" if last == 0 else f"{part}-{{000000..{last:06d}}}.tar"))
    return {"source": "webdataset", "data": pattern, "train": shards["train"], "val": shards["val"],
            "captions": str(out / "train-captions.txt"), "seed": seed, "skipped": 0,
            "train_keys": split["train"], "val_keys": split["val"]}
