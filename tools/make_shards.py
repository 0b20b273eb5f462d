"""Pack a folder of (image, caption) pairs into webdataset tar shards.

The input is the layout :class:`dalle.data.readers.ImageTextFolder` reads (``name.jpg|jpeg|png|webp``
with ``name.txt`` and optionally ``name.json`` beside it, searched recursively). The output is the layout
img2dataset writes and :func:`dalle.data.readers.webdataset_pairs` reads: ``OUT/PREFIX-000000.tar``, ...
with ``key.<image ext>`` (the original bytes, not re-encoded), ``key.txt`` and ``key.json``.

Example::

    python tools/make_shards.py --src data/pairs --out data/shards --shard-size 10000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this checkout's dalle, even when another one is installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dalle import cli
from dalle.data.readers import scan_image_text_folder


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Pack a folder of image + caption pairs into webdataset tar shards (img2dataset layout).",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument(
        "--src", required=True, help="folder of name.jpg|jpeg|png|webp + name.txt (+ name.json) pairs"
    )
    p.add_argument("--out", required=True, help="output folder for the shards (created if missing)")
    p.add_argument("--shard-size", type=cli.positive_int, default=10000, help="samples per shard (>= 1)")
    p.add_argument("--prefix", default="shard", help="shard file names are OUT/PREFIX-%%06d.tar")
    cli.add_overwrite_flag(p, "shards of this --prefix already in --out")
    p.add_argument(
        "--allow-missing-captions",
        action="store_true",
        help="also pack images without a caption file (with an empty .txt) instead of skipping them",
    )
    p.add_argument(
        "--verify-images",
        action="store_true",
        help="fully decode each image with PIL and skip the ones that fail (slower); by default bytes are "
        "copied unchecked and the reader skips bad ones",
    )
    cli.add_debug_flag(p)
    return p.parse_args(argv)


def _tar_key(key: str, used: set[str]) -> str:
    """webdataset splits a member name at the first dot of its base name, so keys must have none."""
    base = key.replace(".", "_")
    out, n = base, 1
    while out in used:
        out, n = f"{base}_{n}", n + 1
    used.add(out)
    return out


def _image_ok(path: str) -> str | None:
    """None when PIL can fully decode ``path``, else the error as one line."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exn:  # noqa: BLE001 - PIL raises many types
        return f"{type(exn).__name__}: {exn}".replace("\n", " ")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cli.refuse_existing("--out", args.out, (f"{args.prefix}-000000.tar",), overwrite=args.overwrite)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        entries, skipped_scan = scan_image_text_folder(
            args.src, require_captions=not args.allow_missing_captions
        )
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    pattern = os.path.join(args.out, f"{args.prefix}-%06d.tar")
    used: set[str] = set()
    written = 0
    skipped = len(skipped_scan)
    with wds.ShardWriter(pattern, maxcount=args.shard_size, verbose=0) as sink:
        for entry in tqdm(entries, desc="packing", unit="img", file=sys.stderr, dynamic_ncols=True):
            try:
                if args.verify_images and (err := _image_ok(entry.image)) is not None:
                    raise OSError(err)
                sample = {"__key__": _tar_key(entry.key, used)}
                with open(entry.image, "rb") as f:
                    sample[os.path.splitext(entry.image)[1][1:].lower()] = f.read()
                sample["txt"] = b""
                if entry.caption is not None:
                    with open(entry.caption, "rb") as f:
                        sample["txt"] = f.read()
                if entry.meta is not None:
                    with open(entry.meta, "rb") as f:
                        sample["json"] = f.read()
            except OSError as exn:
                print(f"skipping {entry.image}: {exn}", file=sys.stderr)
                skipped += 1
                continue
            sink.write(sample)
            written += 1
        shards = sink.shard  # index of the next shard == number of shards opened
    last = f"..{args.prefix}-{shards - 1:06d}.tar" if shards > 1 else ""
    print(
        f"wrote {written} samples in {shards} shards ({args.prefix}-000000.tar{last} in {args.out}); "
        f"skipped {skipped}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
