"""Generate images from text prompts with a trained DALL-E model (default: the one shipped with the package).

    python generate.py "a red circle above a blue square" --num-images 8 --candidates 32 --grid

Samples --candidates images per prompt, ranks them with the model's reranker (paper sec. 2.5) and
keeps the best --num-images. Writes OUT/<prompt>-<rank>.png, best first, and a JSON sidecar for each
(prompt, its position in the list, seed, settings, rerank score, model id). <prompt> is the prompt's
words in any script, lower case, joined by "-"; a prompt whose name an earlier one took gets
"-p<position>" added, so every prompt keeps its images. Files already in OUT are never replaced
without --overwrite. Candidate c of a prompt is sampled with seed SEED + c
alone, so any image can be made again exactly with `--seed <its seed> --num-images 1 --candidates 1`
and the sidecar's settings. With --grid, also one grid PNG per prompt, best first.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from dalle.cli import (
    DTYPES,
    SEED_MAX,
    HelpFormatter,
    add_debug_flag,
    add_sampling_flags,
    add_threads_flag,
    apply_threads,
    finite_float,
    float_range,
    non_negative_int,
    positive_int,
    read_prompt_file,
    resolve_device,
    run,
    seed_int,
)
from dalle.data.transforms import EvalTransform, to_rgb
from dalle.generation import (
    DEFAULT_BATCH_MEMORY,
    MAX_AUTO_BATCH,
    RERANKERS,
    auto_batch_size,
    can_rerank,
    default_candidates,
    generate_many,
)
from dalle.pipeline import DEFAULT_MODEL, load_pipeline, prime_codes
from dalle.tokenizer import TruncationWarning


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("prompts", nargs="*", help="one or more prompts (quote each)")
    p.add_argument("--prompts", dest="prompt_file", default="", help="file with one prompt per line")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="transformer model directory or training run directory (default: the shipped model)")
    p.add_argument("--dvae", default=None, help="dVAE directory (default: the one the model names)")
    p.add_argument("--reranker", default=None, help="reranker directory (default: the model's reranker/ folder)")
    p.add_argument("--rerank", choices=RERANKERS, default="clip",
                   help="how candidates are ranked: clip (the CLIP-style reranker) or self (the model's own "
                        "log p(prompt | image), for a model trained to caption)")
    p.add_argument("--num-images", type=positive_int, default=4, help="images kept per prompt (>= 1)")
    p.add_argument("--candidates", type=non_negative_int, default=0,
                   help="images sampled per prompt, then reranked, keeping the best --num-images "
                        "(0: 4 x --num-images when the model has a reranker, else --num-images)")
    p.add_argument("--batch-size", type=non_negative_int, default=0,
                   help="candidates sampled together (0: as many as fit --batch-memory, at most "
                        f"{MAX_AUTO_BATCH}); on a CPU in fp32 the images do not depend on it")
    p.add_argument("--batch-memory", type=float_range(0, lo_open=True), default=DEFAULT_BATCH_MEMORY / 2**20,
                   help="MiB a batch may hold while it samples and decodes (key/value cache, logits, images); "
                        "sizes --batch-size 0")
    p.add_argument("--seed", type=seed_int, default=0,
                   help=f"candidate c of each prompt uses seed SEED + c (0..{SEED_MAX})")
    add_sampling_flags(p)
    p.add_argument("--cond-scale", type=finite_float, default=1.0,
                   help="classifier-free guidance scale, any finite number (1.0: off; 3.0 is a common choice)")
    p.add_argument("--prime-image", default="", help="image whose top rows of codes are kept (image-to-image)")
    p.add_argument("--prime-rows", type=non_negative_int, default=0,
                   help="rows of the code grid taken from --prime-image (1 .. the model's grid rows - 1)")
    p.add_argument("--out", default="outputs", help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same names in --out (default: refuse, and write nothing)")
    p.add_argument("--grid", action="store_true", help="also write one grid PNG per prompt, best first")
    p.add_argument("--scores", action="store_true", help="print the rerank score under each image of the grid")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_threads_flag(p)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and compute dtype")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_debug_flag(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.prompt_file:
        args.prompts += read_prompts(p, args.prompt_file)
    if not args.prompts:
        p.error("give at least one prompt, or --prompts FILE")
    if args.seed + max(args.candidates, 4 * args.num_images) - 1 > SEED_MAX:
        p.error(f"--seed {args.seed}: candidate seeds SEED + c must stay <= {SEED_MAX}; choose a smaller seed")
    if args.candidates and args.candidates < args.num_images:
        p.error(f"--candidates {args.candidates} is fewer than --num-images {args.num_images}: "
                "sample at least as many candidates as images to keep")
    if bool(args.prime_image) != bool(args.prime_rows):
        p.error("--prime-image and --prime-rows go together")
    return args


def read_prompts(p: argparse.ArgumentParser, path: str) -> list[str]:
    """The prompt file's non-blank lines; an unreadable file or a line that is not UTF-8 is a parser error naming
    the file and line."""
    try:
        return read_prompt_file(path, "--prompts")
    except ValueError as e:
        p.error(str(e))


def slug(prompt: str) -> str:
    """A file-name stem a person can match to the prompt: its words in any script, lower case, joined by
    "-", at most 60 characters; "prompt" when nothing of it is a letter or digit (emoji, punctuation)."""
    return re.sub(r"[\W_]+", "-", prompt.casefold()).strip("-")[:60].strip("-") or "prompt"


def output_stems(prompts: list[str]) -> list[str]:
    """One distinct stem per prompt, in order: its slug, with "-p<position>" (1-based) added when an
    earlier prompt of the list already took that slug (repeated lines, case variants, two emoji)."""
    taken: set[str] = set()
    stems = []
    for i, prompt in enumerate(prompts, 1):
        stem = slug(prompt)
        if stem in taken:
            stem = f"{stem}-p{i}"
        taken.add(stem)
        stems.append(stem)
    return stems


# torchvision's make_grid and save_image, written out: importing torchvision pulls in torch._dynamo, 1.6 s of a
# 4.5 s CPU run of this script. The bytes are the same as theirs (tests/test_generate.py compares them).
def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [0, 1] as 8-bit RGB, rounded as torchvision's save_image rounds."""
    return Image.fromarray(image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).cpu().numpy())


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """(B, 3, H, W) -> (3, H', W'): rows of `nrow` images with `padding` pixels of `pad_value` around each."""
    b, c, h, w = images.shape
    cols, rows = min(nrow, b), -(-b // min(nrow, b))
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k, image in enumerate(images):
        top, left = (k // cols) * (h + padding) + padding, (k % cols) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = image
    return grid


def labelled_grid(images: torch.Tensor, labels: list[str], nrow: int) -> Image.Image:
    """A grid of images with a caption strip under each (the rerank scores)."""
    tiles = []
    for image, label in zip(images, labels):
        # truncated, not rounded, as torchvision's to_pil_image did here
        tile = Image.fromarray(image.clamp(0, 1).mul(255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        canvas = Image.new("RGB", (tile.width, tile.height + 12), "white")
        canvas.paste(tile, (0, 0))
        ImageDraw.Draw(canvas).text((2, tile.height), label, fill="black")
        tiles.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
    return Image.fromarray(make_grid(torch.stack(tiles), nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy())


def warn_truncated(pipe, prompts: list[str]) -> None:
    """One line per prompt longer than the model (or its reranker) reads, said once here rather than as a
    library warning per batch and per scorer."""
    readers = [("the model", pipe.tokenizer, pipe.model.config.text_seq_len)]
    if pipe.reranker is not None:
        readers.append(("the reranker", pipe.reranker_tokenizer, pipe.reranker.config.text_seq_len))
    for prompt in dict.fromkeys(prompts):
        cuts: dict[tuple[int, int], list[str]] = {}
        for who, tok, length in readers:
            cut = tok.encode_batch([prompt], length, truncate_warn=False)[1][0]
            if cut:
                cuts.setdefault((length, cut), []).append(who)
        for (length, cut), who in cuts.items():
            print(f"warning: {' and '.join(who)} read{'s' if len(who) == 1 else ''} {length} text tokens: the last "
                  f"{cut} tokens of {prompt!r} are left out (shorten the prompt)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise SystemExit(f"cannot write to --out {out}: {e.strerror}") from None
    if not Path(args.model).exists():
        hint = ("the model shipped with the package is missing: reinstall it, or rebuild it with "
                "tools/train_default.sh" if Path(args.model) == DEFAULT_MODEL else "check the path")
        raise SystemExit(f"--model {args.model} does not exist ({hint})")
    try:
        pipe = load_pipeline(args.model, dvae_dir=args.dvae, reranker_dir=args.reranker,
                             device=resolve_device(args.device), dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load the model: {e}") from None
    if args.rerank == "self" and not can_rerank(pipe, "self"):
        raise SystemExit(f"--rerank self: {args.model} was trained text-to-image only and cannot score its images; "
                         "train one that captions with configs/dalle/shapes.yaml, or use --rerank clip")
    candidates = args.candidates or default_candidates(pipe, args.num_images, args.rerank)
    grid = pipe.model.config.image_grid_size
    if args.prime_rows >= grid:
        raise SystemExit(f"--prime-rows {args.prime_rows}: {args.model} samples a {grid}x{grid} code grid, so "
                         f"1..{grid - 1} rows can be primed")
    if candidates > args.num_images and args.rerank == "clip" and pipe.reranker is None:
        raise SystemExit(f"--candidates {candidates} > --num-images {args.num_images} needs a reranker, and "
                         f"{args.model} has none: pass --reranker DIR (a tools/train_reranker.py run)")
    stems = output_stems(args.prompts)
    targets = [out / f"{stem}-{rank}{ext}" for stem in stems for rank in range(args.num_images)
               for ext in (".png", ".json")] + ([out / f"{stem}-grid.png" for stem in stems] if args.grid else [])
    existing = [t.name for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"--out {out} already holds {existing[0]}" + (f" and {len(existing) - 1} more of this "
                         f"run's file names" if len(existing) > 1 else "") + ": choose another --out, or pass "
                         "--overwrite to replace them")
    prime = None
    if args.prime_image:
        try:
            image = EvalTransform(pipe.dvae.config.image_size)(to_rgb(Image.open(args.prime_image)), None)
        except (OSError, Image.DecompressionBombError) as e:  # the latter: over PIL's 179 MP limit
            raise SystemExit(f"cannot read --prime-image {args.prime_image}: {e}") from None
        prime = prime_codes(pipe, image, args.prime_rows)
    warn_truncated(pipe, args.prompts)
    settings = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "cond_scale", "prime_image",
                                              "prime_rows", "dtype")}
    per_image = pipe.model.config.image_seq_len - (0 if prime is None else len(prime))
    batch_size = args.batch_size or auto_batch_size(pipe, int(args.batch_memory * 2**20), guided=args.cond_scale != 1)
    # Counted in candidates, advanced a token at a time, so a batch of 64 still shows it moving.
    total = len(args.prompts) * candidates
    bar = tqdm(total=total, desc=f"sampling in batches of {min(batch_size, total)}",
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} candidates [{elapsed}<{remaining}]",
               disable=args.no_progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        results = generate_many(pipe, args.prompts, keep=args.num_images, candidates=candidates, seed=args.seed,
                                batch_size=batch_size, progress=lambda n: bar.update(n / per_image),
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                cond_scale=args.cond_scale, prime=prime, rerank=args.rerank)
    bar.close()
    for position, (prompt, stem, kept) in enumerate(zip(args.prompts, stems, results), 1):
        for rank, g in enumerate(kept):
            to_pil(g.image).save(out / f"{stem}-{rank}.png")
            meta = {"prompt": prompt, "position": position, "seed": g.seed, "rank": rank, "candidate": g.candidate,
                    "candidates": candidates, "score": None if g.score is None else round(g.score, 6),
                    "model": pipe.model_id, "reranker": pipe.reranker_id if args.rerank == "clip" else "self",
                    **settings}
            (out / f"{stem}-{rank}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if args.grid:
            images = torch.stack([g.image for g in kept])
            nrow = min(len(kept), 8)
            if args.scores and kept[0].score is not None:
                labelled_grid(images, [f"{g.score:.3f}" for g in kept], nrow).save(out / f"{stem}-grid.png")
            else:
                to_pil(make_grid(images, nrow=nrow, padding=2)).save(out / f"{stem}-grid.png")
    by = "the reranker" if args.rerank == "clip" else "the model's own log p(prompt | image)"
    kept_note = f", best {args.num_images} of {candidates} by {by}" if candidates > args.num_images else ""
    print(f"wrote {args.num_images} image(s) for each of {len(args.prompts)} prompt(s) to {out}{kept_note}")
    return 0


if __name__ == "__main__":
    run(main)
