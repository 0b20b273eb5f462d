"""Train the stage-2 byte-level BPE text tokenizer (see dalle/tokenizer.py; paper sec. 2.2) on captions.

Captions come from one source: the synthetic shapes train split, text files with one caption per line,
or the ``name.txt`` caption files of an image folder (recursive, one caption per line). Writes one
Hugging Face ``tokenizer.json``.

    python tools/train_bpe.py --shapes 10000 --out runs/bpe-shapes
    python tools/train_bpe.py --folder data/my-images --vocab 16384 --out runs/bpe/tokenizer.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this checkout's dalle, even when another one is installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from dalle import cli
from dalle.data.qa import shapes_qa
from dalle.data.readers import scan_image_text_folder
from dalle.data.shapes import _rng_for, make_caption, sample_scene
from dalle.tokenizer import TOKENIZER_NAME, TextTokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the byte-level BPE text tokenizer (lower-cased captions) and write tokenizer.json.",
        formatter_class=cli.HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes", type=cli.positive_int, metavar="N",
                     help="use the captions of shapes train samples 0..N-1")
    src.add_argument("--captions", type=Path, nargs="+", metavar="FILE", help="text files, one caption per line")
    src.add_argument("--folder", type=Path, metavar="DIR", help="image folder: its name.txt files (recursive)")
    p.add_argument("--out", type=Path, required=True, help="tokenizer.json path, or a directory to write it in")
    cli.add_overwrite_flag(p, "an existing tokenizer file")
    p.add_argument("--vocab", type=cli.int_range(256), default=16384,
                   help="maximum BPE vocabulary size in tokens (>= 256)")
    p.add_argument("--min-frequency", type=cli.positive_int, default=2,
                   help="minimum count of a pair for it to be merged")
    p.add_argument("--questions", action="store_true",
                   help="with --shapes: also learn from each scene's generated questions and answers (for a model "
                        "that answers questions, model.layouts with qa)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="shapes data set seed (with --shapes)")
    cli.add_debug_flag(p)
    return p


def shapes_captions(n: int, seed: int = 0, questions: bool = False) -> Iterator[str]:
    """Captions of shapes train samples 0..n-1, equal to ``make_sample(i, "train", seed).caption``, and with
    `questions` each scene's questions and answers (`dalle.data.qa.shapes_qa`) after its caption.

    Draws the scene and caption with make_sample's per-sample rng but skips rendering (~15x faster).
    """
    for i in tqdm(range(n), desc="shapes captions", unit="cap"):
        rng = _rng_for(seed, "train", i)
        scene = sample_scene(rng, "train")
        caption, _ = make_caption(scene, rng)
        yield caption
        if questions:
            for question, answer, _ in shapes_qa(scene):
                yield question
                yield answer


def _lines(path: Path) -> list[str]:
    # Same rules as the folder reader: BOM dropped, bad bytes replaced, blank lines skipped.
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def file_captions(paths: list[Path]) -> Iterator[str]:
    for path in tqdm(paths, desc="caption files", unit="file", disable=len(paths) < 100):
        yield from _lines(path)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    target = args.out / TOKENIZER_NAME if args.out.is_dir() or args.out.suffix.lower() != ".json" else args.out
    cli.refuse_existing("--out", target, overwrite=args.overwrite)  # a model's tokenizer is not replaced unasked
    if args.questions and args.shapes is None:
        parser.error("--questions goes with --shapes (other sources: put the questions in a caption file)")
    if args.shapes is not None:
        texts = shapes_captions(args.shapes, args.seed, args.questions)
    elif args.captions is not None:
        missing = [str(p) for p in args.captions if not p.is_file()]
        if missing:
            parser.error(f"caption file(s) not found: {', '.join(missing)}")
        texts = file_captions(args.captions)
    else:
        try:
            entries, _ = scan_image_text_folder(args.folder)
        except ValueError as e:
            parser.error(str(e))
        texts = file_captions([Path(e.caption) for e in entries if e.caption is not None])

    try:
        tok = TextTokenizer.train(texts, vocab_size=args.vocab, min_frequency=args.min_frequency)
    except ValueError as e:  # e.g. caption files with no non-blank line
        parser.error(str(e))
    path = tok.save(args.out)
    sample = "A small red circle to the left of a large blue square"
    ids = tok.encode(sample)
    print(f"wrote {path}: vocab_size {tok.vocab_size} (asked for at most {args.vocab})")
    print(f"sample: {sample!r} -> {len(ids)} tokens {ids} -> {tok.decode(ids)!r}")
    return 0


if __name__ == "__main__":
    cli.run(main)
