"""Write the synthetic shapes data set (see dalle/data/shapes.py) as a folder of files or webdataset shards.

Each sample ``key`` produces ``key.png`` (image), ``key.txt`` (caption) and ``key.json`` (scene + mentions).

    python tools/make_shapes.py --n 10000 --out data/shapes-train --split train --shards

With --captions it writes only the distinct captions of the n samples, one per line in order of first appearance,
to the file --out: a prompt file for fine-tuning against a reward model (inputs.prompts of
tools/train_feedback.py grpo or bon) or for tools/feedback.py sample --prompts.

    python tools/make_shapes.py --n 16000 --captions --out runs/shapes-train-captions.txt
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this checkout's dalle, even when another one is installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image
from tqdm import tqdm

from dalle import cli
from dalle.data.shapes import SPLITS, make_sample, sample_key


def _rgb(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"expected R,G,B with each in 0..255, got {text!r}")
    return values[0], values[1], values[2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate deterministic synthetic captioned shape images.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--n", type=cli.positive_int, default=1000, help="number of samples to write (indices 0..n-1)")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (created if missing); with --captions, the text file to write")
    cli.add_overwrite_flag(p, "the samples of this split and seed already in --out")
    p.add_argument("--split", choices=SPLITS, default="train", help="which split to generate")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="data set seed; sample i is a pure function of it")
    p.add_argument("--image-size", type=cli.int_range(16), default=64, help="image side in pixels (>= 16)")
    p.add_argument("--shards", action="store_true", help="write webdataset tar shards instead of a folder")
    p.add_argument("--shard-size", type=cli.positive_int, default=1000, help="samples per shard (with --shards)")
    p.add_argument("--captions", action="store_true",
                   help="write only the distinct captions, one per line, to the file --out (no images)")
    p.add_argument(
        "--background",
        type=_rgb,
        default=None,
        help="fixed background R,G,B; None draws a random grey per image",
    )
    cli.add_debug_flag(p)
    return p


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_captions(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.is_dir():
        raise SystemExit(f"--out {out} is a directory: with --captions it names the text file to write")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"--out {out} exists: choose another file or pass --overwrite")
    captions: dict[str, None] = {}  # insertion-ordered set: the first appearance sets a caption's line
    for i in tqdm(range(args.n), desc=f"shapes/{args.split} captions", unit="img"):
        captions.setdefault(make_sample(i, args.split, args.seed, args.image_size, background=args.background).caption)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    tmp.replace(out)  # a killed run leaves no half-written prompt file behind
    print(f"wrote {len(captions)} distinct captions of {args.n} {args.split} samples to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:  # fail on bad arguments before creating any output
        make_sample(0, args.split, args.seed, args.image_size, background=args.background)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.captions:
        if args.shards:
            parser.error("--captions writes a text file of captions, not shards: drop --shards")
        return _write_captions(args)
    first = "shapes-000000.tar" if args.shards else f"{sample_key(0, args.split, args.seed)}.png"
    cli.refuse_existing("--out", args.out, (first,), overwrite=args.overwrite)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    if args.shards:
        import webdataset as wds  # only shard mode needs it

        writer = wds.ShardWriter(str(out / "shapes-%06d.tar"), maxcount=args.shard_size, verbose=0)
    try:
        for i in tqdm(range(args.n), desc=f"shapes/{args.split}", unit="img"):
            s = make_sample(i, args.split, args.seed, args.image_size, background=args.background)
            key = sample_key(i, args.split, args.seed)
            png, record = _png_bytes(s.image), s.to_json()
            if writer is not None:
                writer.write({"__key__": key, "png": png, "txt": s.caption, "json": record})
            else:
                (out / f"{key}.png").write_bytes(png)
                (out / f"{key}.txt").write_text(s.caption, encoding="utf-8")
                (out / f"{key}.json").write_text(record, encoding="utf-8")
    finally:
        if writer is not None:
            writer.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
