"""Evaluate a trained dVAE: reconstruction PSNR from argmax codes, codebook perplexity and usage,
and a PNG grid of originals (top) over reconstructions (bottom).

    python tools/eval_dvae.py --model runs/dvae-shapes --n 1024 --grid recon.png [--detector 500]

On shapes, --detector N also runs the shapes detector (dalle/evaluation/detect.py) on the reconstructions
of the first N held-out scenes and reports how often it still reads each object's colour, shape and size
(and a single object's position) as drawn: whether the reconstructions are recognisable, as a number,
per size and shape (`shape_by_kind`), what each size and shape was read as (`shape_read_as`), and all
of it for one- and two-object scenes apart (`by_object_count`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from dalle import cli
from dalle.checkpoint import load_pretrained
from dalle.cli import add_threads_flag, apply_threads, resolve_device
from dalle.data.sources import DataConfig, build_dataset, eval_batches
from dalle.train.tasks.dvae import reconstruction_metrics


@torch.no_grad()
def detector_accuracy(model, n: int, seed: int, device: str) -> tuple[dict, list[torch.Tensor]]:
    """Every attribute of every object, as the detector reads it from the reconstruction; shape accuracy
    per size and shape, and what each kind was read as. Also the scenes with an object whose colour or
    shape was misread, each as (original, reconstruction)."""
    from dalle.data.shapes import make_sample
    from dalle.evaluation.compositional import (
        Prompt,
        score_images,
        shape_accuracy_by_kind,
        shape_confusion,
        summarise,
    )

    prompts, originals, recs = [], [], []
    for i in range(n):
        s = make_sample(i, "val", seed, model.config.image_size)
        single = len(s.scene.objects) == 1
        every = tuple(("colour", "shape", "size") + (("position",) if single else ()) for _ in s.scene.objects)
        prompts.append(Prompt(s.caption, dataclasses.replace(s, mentions=every)))
        image = torch.from_numpy(np.asarray(s.image).copy()).permute(2, 0, 1).float().div(255)[None].to(device)
        originals.append(image[0].cpu())
        recs.append(model.decode(model.encode(image))[0].float().cpu())
    verdicts = score_images(prompts, recs)
    groups = summarise(prompts, verdicts)
    misread = [torch.stack([o, r.clamp(0, 1)]) for o, r, v in zip(originals, recs, verdicts)
               if not all(v.attributes["colour"] + v.attributes["shape"])]
    return {**groups.pop("all"), "shape_by_kind": shape_accuracy_by_kind(prompts, verdicts),
            "shape_read_as": shape_confusion(prompts, verdicts), "by_object_count": groups,
            "misread_scenes": len(misread)}, misread


def pairs_grid(pairs: list[torch.Tensor], per_row: int = 12) -> torch.Tensor:
    """(2, 3, H, W) pairs -> one image: rows of up to `per_row` originals, each over its reconstruction."""
    cols = min(per_row, len(pairs))
    blank = torch.ones_like(pairs[0][0])
    tiles = []
    for k in range(0, len(pairs), cols):
        chunk = pairs[k : k + cols]
        pad = [blank] * (cols - len(chunk))
        tiles += [p[0] for p in chunk] + pad + [p[1] for p in chunk] + pad
    return make_grid(torch.stack(tiles), nrow=cols, padding=1)


@torch.no_grad()
def random_grid(model, dataset, n: int, k: int, seed: int, batch_size: int = 64) -> torch.Tensor:
    """`k` originals over their reconstructions, drawn uniformly (seeded reservoir sampling) from the first
    `n` readable images, so the grid is not always the first files in sorted order; streams too."""
    rng, kept, seen = random.Random(seed), [], 0
    for batch in eval_batches(dataset, n, batch_size):
        for image in batch["image"]:
            if len(kept) < k:
                kept.append(image)
            elif (j := rng.randrange(seen + 1)) < k:
                kept[j] = image
            seen += 1
    if not kept:
        raise ValueError("no readable images to show")
    images = torch.stack(kept).to(next(model.parameters()).device)
    return torch.cat([images, model.decode(model.encode(images))]).float().cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True, help="dVAE model directory, or a training run directory")
    p.add_argument("--source", default="shapes", choices=["shapes", "folder", "webdataset"],
                   help="where the evaluation images come from")
    p.add_argument("--path", default="", help="folder or shard pattern (folder and webdataset sources)")
    p.add_argument("--n", type=cli.positive_int, default=1024, help="number of images to evaluate (>= 1)")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per forward pass (>= 1)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="shapes: seed of the held-out 'val' split")
    p.add_argument("--grid", default="", help="write originals over reconstructions to this PNG")
    p.add_argument("--grid-images", type=cli.positive_int, default=16, help="columns of the grid (>= 1)")
    p.add_argument("--grid-seed", type=int, default=-1,
                   help="show a random sample, drawn with this seed, of the --n evaluated images in the grid "
                        "(-1: the first images in order)")
    p.add_argument("--json", default="", help="also write the metrics to this JSON file")
    p.add_argument("--detector", type=cli.non_negative_int, default=0, metavar="N",
                   help="shapes only: detector accuracy on the reconstructions of the first N scenes (0: off)")
    p.add_argument("--misread-grid", default="",
                   help="with --detector: write the scenes with a misread colour or shape to this PNG (each "
                        "original above its reconstruction, up to 48)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    cli.add_overwrite_flag(p, "existing --json, --grid and --misread-grid files")
    cli.add_background_flag(p)
    cli.add_debug_flag(p)
    add_threads_flag(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.detector and args.source != "shapes":
        p.error("--detector reads shapes scenes: it needs --source shapes")
    if args.misread_grid and not args.detector:
        p.error("--misread-grid shows what --detector misreads: give --detector N too")
    for flag, path in (("--json", args.json), ("--grid", args.grid), ("--misread-grid", args.misread_grid)):
        if path:
            cli.refuse_existing(flag, path, overwrite=args.overwrite)

    device = resolve_device(args.device)
    model = load_pretrained(args.model, expect="dvae", map_location=device)
    cfg = model.config
    data_cfg = DataConfig(source=args.source, path=args.path, val_path=args.path, val_size=args.n,
                          seed=args.seed, require_captions=False,
                          background="#{:02x}{:02x}{:02x}".format(*args.background))
    dataset = build_dataset(data_cfg, "val", cfg.image_size, "eval")
    try:
        found, shown = reconstruction_metrics(model, dataset, args.n, batch_size=args.batch_size,
                                              grid_images=args.grid_images)
    except ValueError:
        raise SystemExit(f"no readable images found in {args.path or args.source}") from None
    metrics = {"psnr_db": found["psnr"], "perplexity": found["perplexity"], "codes_used": found["codes_used"],
               "images": found["images"], "model": str(args.model)}
    misread: list[torch.Tensor] = []
    if args.detector:
        metrics["detector_on_reconstructions"], misread = detector_accuracy(model, args.detector, args.seed, device)
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    if args.grid and args.grid_seed >= 0:
        shown = random_grid(model, dataset, args.n, args.grid_images, args.grid_seed, args.batch_size)
    if args.grid:
        save_image(make_grid(shown, nrow=len(shown) // 2, padding=1), args.grid)
        print(f"grid written to {args.grid}")
    if args.misread_grid:
        if misread:
            save_image(pairs_grid(misread[:48]), args.misread_grid)
        print(f"{len(misread)} misread scenes" + (f", written to {args.misread_grid}" if misread else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
