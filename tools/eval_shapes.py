"""Compositional accuracy of a model on shapes prompts, judged by a deterministic detector.

    python tools/eval_shapes.py --split train zeroshot --n 200 --candidates 1 8 32 --cond-scale 1 3 \
        --out runs/eval-shapes                        # the shipped model; --model DIR for another
    python tools/eval_shapes.py --check-detector --n 1000 [--jpeg 75] [--shuffle]

For every (split, cond_scale), samples max(--candidates) images per prompt once; "best of k" keeps the
reranker's favourite among the first k of them (k = 1: the first sample, no reranking), so the rows of one
table differ only in reranking. Writes OUT/shapes-eval.json and OUT/shapes-eval.md (accuracy per
attribute, relation, object count, all-correct, Reranker score), plus a grid per setting; refuses an OUT
that holds them unless --overwrite.

--check-detector runs the detector on the ground-truth renders instead (after JPEG compression with
--jpeg, or paired with shuffled prompts with --shuffle) to show how far its verdicts can be trusted.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from dalle import cli
from dalle.cli import add_sampling_flags, add_threads_flag, apply_threads, resolve_device
from dalle.evaluation.compositional import Prompt, score_images, shapes_prompts, summarise, to_uint8
from dalle.evaluation.report import markdown_table
from dalle.generation import sample_images
from dalle.pipeline import DEFAULT_MODEL, Pipeline, load_pipeline, score

COLUMNS = ("colour", "shape", "size", "position", "relation", "count", "all_correct")


def check_detector(args: argparse.Namespace) -> list[dict]:
    rows = []
    for split in args.split:
        prompts = shapes_prompts(split, args.n, args.seed)
        images = [np.asarray(p.sample.image) for p in prompts]
        if args.jpeg:
            images = [_jpeg(im, args.jpeg) for im in images]
        if args.shuffle:
            random.Random(args.seed).shuffle(prompts)
        verdicts = score_images(prompts, [im for im in tqdm(images, desc=f"detect {split}", disable=args.no_progress)])
        rows.append({"split": split, "images": "renders" + (f", JPEG q{args.jpeg}" if args.jpeg else "")
                     + (", shuffled prompts" if args.shuffle else ""), **_flat(summarise(prompts, verdicts))})
    return rows


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _flat(summary: dict[str, dict]) -> dict:
    """Overall figures at the top level, the groups beside them."""
    return {**summary["all"], "groups": {k: v for k, v in summary.items() if k != "all"}}


def sample_candidates(pipe: Pipeline, prompts: list[Prompt], k: int, cond_scale: float,
                      args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, k, 3, H, W) uint8 images, candidate c of every prompt from seed SEED + c, and their scores."""
    jobs = [(i, args.seed + c) for i in range(len(prompts)) for c in range(k)]
    per_image = pipe.model.config.image_seq_len
    bar = tqdm(total=len(jobs) * per_image, unit="tok", desc=f"sampling (cond_scale {cond_scale})",
               disable=args.no_progress)
    out = []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        images = sample_images(pipe, [prompts[i].caption for i, _ in chunk], [s for _, s in chunk],
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cond_scale=cond_scale,
                               progress=bar.update)
        out.append(images.clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8))
    bar.close()
    images = torch.cat(out).view(len(prompts), k, *out[0].shape[1:])
    if pipe.reranker is None:
        return images, None
    scores = torch.stack([score(pipe, p.caption, images[i].float() / 255) for i, p in enumerate(prompts)])
    return images, scores


def evaluate_model(args: argparse.Namespace, out: Path) -> tuple[list[dict], str]:
    pipe = load_pipeline(args.model, reranker_dir=args.reranker, device=resolve_device(args.device))
    k_max = max(args.candidates)
    if k_max > 1 and pipe.reranker is None:
        raise SystemExit(f"--candidates {k_max} needs a reranker and {args.model} has none: pass --reranker DIR")
    rows = []
    for split in args.split:
        prompts = shapes_prompts(split, args.n, args.seed, pipe.dvae.config.image_size)
        for cs in args.cond_scale:
            images, scores = sample_candidates(pipe, prompts, k_max, cs, args)
            shown = []
            for k in sorted(args.candidates):
                pick = scores[:, :k].argmax(1) if k > 1 else torch.zeros(len(prompts), dtype=torch.long)
                chosen = images[torch.arange(len(prompts)), pick]  # (n, 3, H, W) uint8
                verdicts = score_images(prompts, [to_uint8(im.permute(1, 2, 0).numpy()) for im in chosen])
                row = {"split": split, "cond_scale": cs, "candidates": k, **_flat(summarise(prompts, verdicts))}
                if scores is not None:
                    row["clip_score"] = float(scores[torch.arange(len(prompts)), pick].mean())
                rows.append(row)
                shown.append(chosen[:8])
            grid = make_grid(torch.cat(shown).float() / 255, nrow=min(8, len(prompts)), padding=2)
            save_image(grid, out / f"{split}-cond{cs:g}.png")  # rows: best of each k, first 8 prompts
    return rows, pipe.model_id


def markdown(rows: list[dict], keys: tuple[str, ...]) -> str:
    cols = keys + tuple(c for c in COLUMNS if any(c in r for r in rows)) + (
        ("clip_score",) if any("clip_score" in r for r in rows) else ())
    return markdown_table([c.replace("_", " ") for c in cols],
                          ([str(r[c]) if c in keys else r.get(c) for c in cols] for r in rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="transformer model or run directory (default: the shipped model)")
    p.add_argument("--reranker", default=None, help="reranker directory (default: the model's reranker/ folder)")
    p.add_argument("--split", nargs="+", default=["train", "zeroshot"], choices=["train", "val", "zeroshot"],
                   help="shapes splits whose captions are the prompts")
    p.add_argument("--n", type=cli.positive_int, default=200, help="prompts per split (the first n samples)")
    p.add_argument("--candidates", type=cli.positive_int, nargs="+", default=[1, 8, 32],
                   help="report the reranker's best of the first k samples for each k (1: no reranking)")
    p.add_argument("--cond-scale", type=cli.finite_float, nargs="+", default=[1.0, 3.0],
                   help="guidance scales to compare")
    add_sampling_flags(p)
    p.add_argument("--seed", type=cli.seed_int, default=0,
                   help="data seed of the prompts, and base seed of the samples")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images sampled together")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_threads_flag(p)
    p.add_argument("--out", default="runs/eval-shapes", help="directory for the JSON, Markdown and grids")
    cli.add_overwrite_flag(p, "an earlier evaluation in --out")
    p.add_argument("--check-detector", action="store_true", help="score ground-truth renders, not a model")
    p.add_argument("--jpeg", type=cli.int_range(0, 100), default=0,
                   help="with --check-detector: JPEG quality 1..100 applied first (0: none)")
    p.add_argument("--shuffle", action="store_true", help="with --check-detector: pair images with other prompts")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if (args.jpeg or args.shuffle) and not args.check_detector:
        p.error("--jpeg and --shuffle go with --check-detector")
    out = Path(args.out)
    cli.refuse_existing("--out", out, ("shapes-eval.json", "shapes-eval.md"), overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if args.check_detector:
        rows, model_id, keys = check_detector(args), "ground truth", ("split", "images")
    else:
        (rows, model_id), keys = evaluate_model(args, out), ("split", "cond_scale", "candidates")
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress", "out", "overwrite")}
    (out / "shapes-eval.json").write_text(json.dumps({"model": model_id, "settings": settings, "rows": rows},
                                                     indent=2) + "\n")
    table = markdown(rows, keys)
    (out / "shapes-eval.md").write_text(f"Model: {model_id}, {args.n} prompts per split\n\n{table}")
    print(table, end="")
    return 0


if __name__ == "__main__":
    cli.run(main)
