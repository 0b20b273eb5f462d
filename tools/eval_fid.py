"""Zero-shot FID and IS by the paper's protocol (sec. 3.2): one image per held-out caption, compared with
the real images of those captions, also after blurring both sets (Fig. 9a).

    python tools/eval_fid.py --source shapes --split zeroshot --n 2000 --features reranker --out runs/fid-shapes
    python tools/eval_fid.py --model runs/my-dalle --source coco --captions annotations/captions_val2014.json \
        --path val2014 --n 30000 --features inception --candidates 32 --device cuda --out runs/fid-coco

Sources of (caption, real image) pairs: shapes (a split of the synthetic data), folder (image + .txt pairs),
webdataset (shards) or coco (a captions JSON, with --path the image folder; the first caption of each of
the first N images by id). Real images are centre-cropped and resized to the model's output size.

Generated images are written to OUT/images/ as they are made, so a restarted run continues where it
stopped; OUT/images/made-by.json names the model and settings that drew them, and images of another model or
other settings are refused, never mixed in (--overwrite draws them again). A finished evaluation (OUT/fid.json)
is replaced only with --overwrite. Real-image statistics are cached in --stats-cache, keyed by the data, the
features and the blur.
Writes OUT/fid.json and OUT/fid.md: FID for each blur radius, IS, Reranker score, N, settings and model id.
With --reference-path (the training split, read like --path; for shapes, --reference-split train) it also
writes the FID's floor (N real training images, drawn at random, against the held-out ones) and its stage-1
ceiling (the dVAE's reconstructions of those training images), so the model's number sits on a scale.

--features inception uses pytorch-fid's Inception-v3 (weights from torch's hub cache or
--inception-weights, never downloaded); --features reranker uses the project's reranker instead: quick, no
download, and not comparable with published FIDs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dalle import cli
from dalle.cli import add_sampling_flags, add_threads_flag, apply_threads, resolve_device
from dalle.data.transforms import EvalTransform, to_rgb
from dalle.evaluation.fid import (
    INCEPTION_WEIGHTS,
    InceptionExtractor,
    RerankerExtractor,
    features_by_radius,
    floor_and_ceiling,
    frechet_distance,
    inception_score,
    statistics,
)
from dalle.generation import sample_images
from dalle.pipeline import DEFAULT_MODEL, load_pipeline, score
from dalle.reranker.score import best


def load_pairs(args: argparse.Namespace, image_size: int, path: str | None = None,
               random_sample: bool = False) -> list[tuple[str, object]]:
    """The first N (caption, loader) pairs of args.path (or `path`); loader() -> uint8 (3, S, S) real image.
    With `random_sample` (folder and webdataset), N drawn at random with --seed instead: a folder's first
    files in sorted order are no sample of it (Twemoji: the flags come first)."""
    tf = EvalTransform(image_size)
    path = args.path if path is None else path

    def from_pil(img: Image.Image) -> torch.Tensor:
        return (tf(to_rgb(img, args.background)) * 255).round().to(torch.uint8)

    if args.source == "shapes":
        from dalle.data.shapes import make_sample

        samples = [make_sample(i, args.split, args.seed, image_size) for i in range(args.n)]
        return [(s.caption, lambda s=s: from_pil(s.image)) for s in samples]
    if args.source == "coco":
        data = json.loads(Path(args.captions).read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first: dict[int, str] = {}
        for a in sorted(data["annotations"], key=lambda a: a["id"]):
            first.setdefault(a["image_id"], a["caption"].strip())
        ids = sorted(first)[: args.n]
        return [(first[i], lambda i=i: from_pil(Image.open(Path(path) / files[i]))) for i in ids]
    from dalle.data.readers import ImageTextFolder, webdataset_pairs

    # A shuffle buffer of 10 N (and shuffled shards) stands for a random sample of a stream.
    shuffle = max(1000, 10 * args.n) if random_sample else 0
    ds = (ImageTextFolder(path, tf, require_captions=True, seed=args.seed, background=args.background)
          if args.source == "folder" else webdataset_pairs(path, tf, shuffle=shuffle, seed=args.seed,
                                                          require_captions=True, background=args.background))
    pairs = []
    if args.source == "folder":
        order = list(range(len(ds)))
        if random_sample:
            random.Random(args.seed).shuffle(order)
        items = (ds[i] for i in order)
    else:
        items = iter(ds)
    for item in items:
        if item is None:
            continue
        image = (item["image"] * 255).round().to(torch.uint8)
        pairs.append((item["caption"], lambda im=image: im))
        if len(pairs) == args.n:
            break
    return pairs


def write_png(image: torch.Tensor, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written image that a restart would trust


MADE_BY = "made-by.json"


def drawn_by(pipe, captions: list[str], args: argparse.Namespace) -> dict:
    """What decides the images of OUT/images: the model (and the reranker that picks among candidates), the
    captions and the sampling settings."""
    return {"model": pipe.model_id, "reranker": pipe.reranker_id if args.candidates > 1 else None,
            "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16], "n": len(captions),
            **{k: getattr(args, k) for k in ("seed", "candidates", "temperature", "top_k", "top_p", "cond_scale")}}


def claim_image_dir(image_dir: Path, made_by: dict, *, overwrite: bool) -> None:
    """Resume only images drawn the same way: another model's or other settings' images are refused (or,
    with --overwrite, removed), so a reused --out never mixes two models in one FID."""
    record = image_dir / MADE_BY
    earlier = json.loads(record.read_text()) if record.is_file() else None
    images = sorted(image_dir.glob("[0-9]*.png")) if image_dir.is_dir() else []
    if images and earlier != made_by:
        if not overwrite:
            why = (f"with no record of what drew them ({MADE_BY})" if earlier is None else
                   "drawn by another model or with other settings "
                   f"({', '.join(sorted(k for k in made_by if earlier.get(k) != made_by[k]))} differ)")
            raise SystemExit(f"--out {image_dir.parent} holds {len(images)} images {why}: choose another --out, or "
                             "pass --overwrite to draw them again")
        for f in images:
            f.unlink()
    image_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made_by, indent=1) + "\n")


def generate_missing(pipe, captions: list[str], image_dir: Path, args: argparse.Namespace) -> None:
    todo = [i for i in range(len(captions)) if not (image_dir / f"{i:06d}.png").is_file()]
    if len(todo) < len(captions):
        print(f"{len(captions) - len(todo)} images already in {image_dir}; making the other {len(todo)}")
    k = args.candidates
    bar = tqdm(total=len(todo) * k, unit="img", desc="generating", disable=args.no_progress)
    per_batch = max(1, args.batch_size // k)
    for start in range(0, len(todo), per_batch):
        idx = todo[start : start + per_batch]
        prompts = [captions[i] for i in idx for _ in range(k)]
        seeds = [args.seed + i * k + c for i in idx for c in range(k)]  # unique per (caption, candidate)
        images = sample_images(pipe, prompts, seeds, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, cond_scale=args.cond_scale).view(len(idx), k, 3, *pipe_size(pipe))
        for row, i in enumerate(idx):
            pick = int(best(score(pipe, captions[i], images[row]), 1)[0]) if k > 1 else 0
            write_png(images[row, pick].clamp(0, 1).mul(255).round().to(torch.uint8), image_dir / f"{i:06d}.png")
        bar.update(len(idx) * k)
    bar.close()


def pipe_size(pipe) -> tuple[int, int]:
    s = pipe.dvae.config.image_size
    return s, s


def real_statistics(pairs, extractor, args: argparse.Namespace, key_base: dict) -> dict[float, tuple]:
    cache = Path(args.stats_cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    files = {r: cache / (hashlib.sha256(json.dumps({**key_base, "blur": r}, sort_keys=True).encode())
                         .hexdigest()[:20] + ".safetensors") for r in args.blur}
    stats = {r: _read_cached(f) for r, f in files.items() if f.is_file()}
    missing = [r for r in files if r not in stats or stats[r] is None]
    if missing:
        feats, _ = features_by_radius((load() for _, load in pairs), extractor, missing, args.batch_size,
                                      "real-image features", args.no_progress)
        for r in missing:
            mu, sigma = statistics(feats[r])
            save_file({"mu": mu, "sigma": sigma}, str(files[r]), metadata={"key": json.dumps({**key_base, "blur": r})})
            stats[r] = (mu, sigma)
    return stats


def _read_cached(path: Path) -> tuple | None:
    """A cached (mu, sigma), or None, with a warning, when the file is damaged: it is only a cache, so it
    is computed again and replaced."""
    try:
        s = load_file(str(path))
        return s["mu"], s["sigma"]
    except (OSError, SafetensorError, KeyError) as e:
        print(f"warning: the statistics cache {path} is not readable ({e}); computing it again", file=sys.stderr)
        return None


def reference_distances(pipe, pairs, extractor, real: dict, args: argparse.Namespace) -> dict[str, dict[float, float]]:
    """The floor (training images) and ceiling (their dVAE reconstructions) of the FID, as many as held-out."""
    if args.source == "shapes":  # another split of the same world; its scenes are independent draws
        train = load_pairs(argparse.Namespace(**{**vars(args), "split": args.reference_split}),
                           pipe.dvae.config.image_size)
    else:
        train = load_pairs(args, pipe.dvae.config.image_size, path=args.reference_path, random_sample=True)
    train = train[: len(pairs)]
    if len(train) < 2:
        where = f"--reference-split {args.reference_split}" if args.source == "shapes" else \
            f"--reference-path {args.reference_path}"
        raise SystemExit(f"found {len(train)} readable pairs in {where}; need 2+")
    if len(train) < len(pairs):
        print(f"note: the floor uses {len(train)} training images against {len(pairs)} held-out ones")
    return floor_and_ceiling(extractor, real, torch.stack([load() for _, load in train]), pipe.dvae,
                             batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="transformer model or run directory (default: the shipped model)")
    p.add_argument("--reranker", default=None, help="reranker directory (default: the model's reranker/ folder)")
    p.add_argument("--source", default="shapes", choices=["shapes", "folder", "webdataset", "coco"],
                   help="where the held-out captions and their real images come from")
    p.add_argument("--path", default="", help="folder, shard pattern, or (coco) the image folder")
    p.add_argument("--captions", default="", help="coco: the captions JSON (e.g. captions_val2014.json)")
    p.add_argument("--reference-path", default="",
                   help="the training split, read like --path: also report the FID floor (N real training images "
                        "against the held-out ones) and the stage-1 ceiling (the dVAE's reconstructions of those "
                        "training images); N training images drawn at random with --seed; folder and webdataset")
    p.add_argument("--reference-split", default="", choices=["", "train", "val", "zeroshot"],
                   help="shapes: the split whose scenes give the floor and ceiling, as --reference-path does for a "
                        "folder (train beside --split val)")
    cli.add_background_flag(p)
    p.add_argument("--split", default="zeroshot", choices=["train", "val", "zeroshot"], help="shapes split")
    p.add_argument("--n", type=cli.int_range(2), default=2000,
                   help="captions, >= 2 for a covariance (the paper: 30,000)")
    p.add_argument("--features", default="inception", choices=["inception", "reranker"],
                   help="inception (comparable with published FIDs) or reranker (the project's reranker: quick, "
                        "no download)")
    p.add_argument("--inception-weights", default="",
                   help=f"path of {INCEPTION_WEIGHTS} (default: torch's hub cache, checkpoints/ folder)")
    p.add_argument("--blur", type=cli.non_negative_float, nargs="+", default=[0, 1, 2, 4, 8],
                   help="Gaussian blur radii applied to both sets (paper Fig. 9a); 0 is plain FID")
    p.add_argument("--candidates", type=cli.positive_int, default=1,
                   help="images sampled per caption; the reranker keeps one")
    p.add_argument("--cond-scale", type=cli.finite_float, default=1.0, help="classifier-free guidance scale")
    add_sampling_flags(p)
    p.add_argument("--seed", type=cli.seed_int, default=0, help="data seed and base sampling seed")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per sampling and feature batch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_threads_flag(p)
    p.add_argument("--stats-cache", default="~/.cache/dalle-repro/fid-stats", help="real-image statistics cache")
    p.add_argument("--out", required=True, help="directory for images/, fid.json and fid.md")
    cli.add_overwrite_flag(p, "a finished evaluation in --out, and images drawn another way")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.source != "shapes" and not args.path:
        p.error(f"--source {args.source} needs --path")
    if args.reference_path and args.source not in ("folder", "webdataset"):
        p.error("--reference-path needs --source folder or webdataset (for shapes: --reference-split train)")
    if args.reference_split and args.source != "shapes":
        p.error("--reference-split is for --source shapes; pass --reference-path for folders and shards")
    if args.reference_split and args.reference_split == args.split:
        p.error(f"--reference-split {args.split} is the evaluated split: pick another (train beside --split val)")
    if args.source == "coco" and not args.captions:
        p.error("--source coco needs --captions (the captions JSON)")
    if 0 not in args.blur:
        args.blur = [0.0, *args.blur]  # the IS and the headline FID are unblurred
    device = resolve_device(args.device)
    try:
        pipe = load_pipeline(args.model, reranker_dir=args.reranker, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load the model: {e}") from None
    if args.candidates > 1 and pipe.reranker is None:
        raise SystemExit(f"--candidates {args.candidates} needs a reranker: {args.model} has none; pass --reranker DIR")
    pairs = load_pairs(args, pipe.dvae.config.image_size)
    if len(pairs) < 2:
        raise SystemExit(f"found {len(pairs)} readable (caption, image) pairs in the {args.source} source; need 2+")
    captions = [c for c, _ in pairs]
    if args.features == "reranker":
        if pipe.reranker is None:
            raise SystemExit("--features reranker needs a reranker: the model has no reranker/ folder; pass "
                             "--reranker DIR")
        extractor, feat_id = RerankerExtractor(pipe.reranker, pipe.reranker_tokenizer, captions), pipe.reranker_id
    else:
        try:
            extractor, feat_id = InceptionExtractor(args.inception_weights or None, device), "pytorch-fid inception"
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    out = Path(args.out)
    cli.refuse_existing("--out", out, ("fid.json", "fid.md"), overwrite=args.overwrite)
    image_dir = out / "images"
    claim_image_dir(image_dir, drawn_by(pipe, captions, args), overwrite=args.overwrite)
    generate_missing(pipe, captions, image_dir, args)
    key = {"source": args.source, "path": args.path, "captions": args.captions, "split": args.split, "n": len(pairs),
           "seed": args.seed, "size": pipe.dvae.config.image_size, "features": feat_id,
           **({"background": list(args.background)} if args.background != (255, 255, 255) else {})}
    real = real_statistics(pairs, extractor, args, key)
    fake_images = (torch.from_numpy(np.asarray(Image.open(image_dir / f"{i:06d}.png").convert("RGB")).copy())
                   .permute(2, 0, 1) for i in range(len(pairs)))
    feats, probs = features_by_radius(fake_images, extractor, args.blur, args.batch_size, "generated features",
                                      args.no_progress)
    fid = {r: frechet_distance(*statistics(feats[r]), *real[r]) for r in args.blur}
    is_mean, is_std = inception_score(probs)
    with_refs = args.reference_path or args.reference_split
    refs = reference_distances(pipe, pairs, extractor, real, args) if with_refs else {}
    clip_score = None
    if pipe.reranker is not None:
        clip_score = float(np.mean([float(score(pipe, c, torch.from_numpy(np.asarray(Image.open(
            image_dir / f"{i:06d}.png").convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255)[0])
            for i, c in enumerate(captions)]))
    result = {"model": pipe.model_id, "features": args.features, "feature_extractor": feat_id, "n": len(pairs),
              "fid": {f"{r:g}": v for r, v in fid.items()}, "is": [is_mean, is_std], "clip_score": clip_score,
              **{name: {f"{r:g}": v for r, v in d.items()} for name, d in refs.items()},
              "settings": {k: v for k, v in vars(args).items() if k not in ("no_progress", "out", "overwrite")}}
    (out / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
    note = "" if args.features == "inception" else " (Reranker features: not comparable with published FIDs)"
    lines = [f"Model {pipe.model_id}, {len(pairs)} captions of {args.source}"
             f"{' ' + args.split if args.source == 'shapes' else ''}, {args.features} features{note}", "",
             "| blur radius | " + " | ".join(f"{r:g}" for r in args.blur) + " |",
             "|---|" + "---|" * len(args.blur),
             "| FID | " + " | ".join(f"{fid[r]:.4g}" for r in args.blur) + " |",
             *(f"| {label} | " + " | ".join(f"{refs[name][r]:.4g}" for r in args.blur) + " |"
               for name, label in (("floor", "floor: train vs held-out"),
                                   ("ceiling", "ceiling: dVAE reconstructions")) if name in refs), "",
             f"IS {is_mean:.2f} +- {is_std:.2f}" + (f", CLIP score {clip_score:.4f}" if clip_score is not None else "")]
    (out / "fid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    cli.run(main)
