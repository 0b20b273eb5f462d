"""Turn the npm package `emoji-datasource-twitter` into an image-caption folder (docs/own-data.md).

    cd /work/data && npm pack emoji-datasource-twitter@16.0.0 && tar xzf emoji-datasource-twitter-16.0.0.tgz
    python tools/twemoji_folder.py --package /work/data/package --out /work/data/twemoji

The package holds Twemoji's 64x64 PNGs (palette images with transparency) under img/twitter/64/ and
their names in emoji.json. The graphics are CC-BY 4.0 (Twitter, Inc. and other contributors,
github.com/jdecked/twemoji); the package is MIT. Each image becomes `KEY.png` + `KEY.txt` with three
captions, one a line, so training sees each emoji under several wordings:

    grinning face
    grinning emoji
    grinning face, a face-smiling emoji of smileys & emotion

Skin-tone variants are kept too, their tone named in every caption ("waving hand, medium skin tone").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm

from dalle import cli

TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


def tone_words(key: str) -> str:
    """"1F3FB" -> "light skin tone"; "1F3FB-1F3FF" -> "light and dark skin tones"."""
    names = [TONES.get(part, part.lower()) for part in key.split("-")]
    if len(set(names)) == 1:
        return f"{names[0]} skin tone"
    return " and ".join(names) + " skin tones"


def captions(entry: dict, tone: str = "") -> list[str]:
    """Three caption lines for one emoji (and skin tone): its name, its short names, its category."""
    name = (entry.get("name") or entry.get("short_name") or "").lower().replace("_", " ")
    short = ", ".join(s.replace("_", " ") for s in entry.get("short_names") or [entry.get("short_name", "")])
    where = f"a {entry.get('subcategory', '')} emoji of {entry.get('category', '').lower()}"
    suffix = f", {tone}" if tone else ""
    return [f"{name}{suffix}", f"{short} emoji{suffix}", f"{name}{suffix}, {where}"]


def entries(meta: list[dict]) -> list[tuple[str, list[str]]]:
    """(image file name, captions) for every emoji and skin-tone variant that has a Twitter image."""
    out = []
    for e in meta:
        if e.get("has_img_twitter"):
            out.append((e["image"], captions(e)))
        for key, var in (e.get("skin_variations") or {}).items():
            if var.get("has_img_twitter"):
                out.append((var["image"], captions(e, tone_words(key))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--package", type=Path, required=True,
                   help="the unpacked npm package (the folder holding emoji.json and img/)")
    p.add_argument("--size", type=int, default=64, choices=[16, 20, 32, 64], help="image size in the package")
    p.add_argument("--out", type=Path, required=True, help="new image-caption folder")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    meta_file, img_dir = args.package / "emoji.json", args.package / "img" / "twitter" / str(args.size)
    if not meta_file.is_file() or not img_dir.is_dir():
        raise SystemExit(f"{args.package} is not an unpacked emoji-datasource-twitter package (no emoji.json "
                         f"or img/twitter/{args.size}/): run `npm pack emoji-datasource-twitter@16.0.0` and "
                         "`tar xzf` it, then pass its package/ folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.out} is not empty: pick a new folder or pass --overwrite")
    args.out.mkdir(parents=True, exist_ok=True)
    written = missing = 0
    for image, lines in tqdm(entries(json.loads(meta_file.read_text(encoding="utf-8"))), desc="emoji", unit="img"):
        src = img_dir / image
        if not src.is_file():
            missing += 1
            continue
        stem = Path(image).stem
        shutil.copyfile(src, args.out / f"{stem}.png")
        (args.out / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written += 1
    print(f"wrote {written} image-caption pairs to {args.out}" + (f"; {missing} images missing" if missing else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
