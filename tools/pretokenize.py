"""Encode a data set's images with a trained dVAE once, so transformer training never re-encodes them.

    python tools/pretokenize.py --dvae runs/dvae-shapes --source shapes --split train --n 100000 --out data/tok-train

Writes a token directory (see dalle/data/tokens.py): image codes as memory-mapped safetensors shards and
the captions as text, so BPE dropout can still vary them at training time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from dalle import cli
from dalle.checkpoint import load_pretrained, resolve_model_dir
from dalle.cli import add_threads_flag, apply_threads, resolve_device
from dalle.data.qa import qa_for_sample
from dalle.data.readers import collate_skip_bad
from dalle.data.tokens import TokenShardWriter


def build_source(args: argparse.Namespace, image_size: int):
    if args.source == "shapes":
        from dalle.data.shapes import ShapesDataset

        return ShapesDataset(split=args.split, size=args.n, seed=args.seed, image_size=image_size)
    from dalle.data.readers import ImageTextFolder, webdataset_pairs
    from dalle.data.transforms import transform_from_name

    # Centre crops: the codes are the data from now on, so they should show the whole image.
    tf = transform_from_name("eval", image_size)
    if args.source == "folder":
        return ImageTextFolder(args.path, tf, seed=args.seed, background=args.background)
    return webdataset_pairs(args.path, tf, shuffle=0, seed=args.seed, background=args.background)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--dvae", required=True, help="dVAE model directory or training run directory")
    p.add_argument("--source", default="shapes", choices=["shapes", "folder", "webdataset"],
                   help="where the captioned images come from")
    p.add_argument("--path", default="", help="folder or shard pattern (folder and webdataset sources)")
    p.add_argument("--split", default="train", choices=["train", "val", "zeroshot"], help="shapes split")
    p.add_argument("--n", type=cli.non_negative_int, default=0,
                   help="samples to encode (0: all; shapes needs a number)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="shapes seed / caption choice seed")
    p.add_argument("--out", required=True, help="new token directory")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="images per dVAE forward pass")
    p.add_argument("--shard-size", type=cli.positive_int, default=100_000, help="samples per shard")
    p.add_argument("--workers", type=cli.non_negative_int, default=0,
                   help="DataLoader worker processes for image decoding")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    cli.add_background_flag(p)
    cli.add_debug_flag(p)
    add_threads_flag(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.source == "shapes" and args.n <= 0:
        p.error("--source shapes needs --n, the number of scenes to generate")
    if args.source != "shapes" and not args.path:
        p.error(f"--source {args.source} needs --path")

    device = resolve_device(args.device)
    dvae = load_pretrained(args.dvae, expect="dvae", map_location=device)
    cfg = dvae.config
    data = build_source(args, cfg.image_size)
    if args.n and not isinstance(data, IterableDataset):
        data = Subset(data, range(min(args.n, len(data))))
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skip_bad)
    writer = TokenShardWriter(args.out, grid=cfg.grid_size, image_vocab_size=cfg.vocab_size,
                              shard_size=args.shard_size,
                              dvae={"path": str(resolve_model_dir(args.dvae).resolve()), "config": cfg.to_dict()})
    skipped, done = 0, 0
    with torch.no_grad(), tqdm(total=args.n or None, desc="encoding", unit="img") as bar:
        for batch in loader:
            skipped += batch.get("skipped", 0)
            if "image" not in batch:
                continue
            codes = dvae.encode(batch["image"].to(device))
            # Every caption line of an image goes to the shards; TokenShards picks one per draw.
            every = batch.get("captions") or [None] * len(codes)
            captions = [list(lines) if lines else [c] for c, lines in zip(batch["caption"], every)]
            # Questions and answers (a side file's "qa", or those of a shapes scene) ride along for the qa layout.
            qa = [qa_for_sample({k: batch[k][i] for k in ("key", "qa", "meta", "scene") if k in batch})
                  for i in range(len(codes))]
            writer.add(list(batch["key"]), captions, codes, qa)
            done += len(codes)
            bar.update(len(codes))
            if args.n and done >= args.n:
                break
    meta = writer.close()
    print(f"wrote {meta['count']} samples in {len(meta['shards'])} shard(s) to {args.out}"
          + (f"; skipped {skipped} unreadable" if skipped else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
