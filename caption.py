"""Caption images, or answer a question about them, with a DALL-E model trained in both directions.

    python caption.py docs/samples/a-red-circle-0.png
    python caption.py IMG.png --question "how many objects?"

Prints each image's caption(s) (or answers), each with the model's log-probability of it (natural log, its
end-of-text token included). Decoding is greedy by default, beam search with --beam N, or sampling with
--sample (--num texts per image, --seed, --temperature, --top-k, --top-p). A model that also draws writes
--candidates captions and keeps the one under which it finds the image most likely. With --json, also writes
IMAGE.caption.json beside each image (never replacing one without --overwrite). The model must have been
trained with the caption (and, for --question, qa) layout: configs/dalle/shapes.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dalle.captioning import DRAWN_CANDIDATES, DRAWN_PRIOR_SCALE
from dalle.cli import (
    DTYPES,
    SEED_MAX,
    HelpFormatter,
    add_debug_flag,
    add_sampling_flags,
    add_threads_flag,
    apply_threads,
    non_negative_float,
    positive_int,
    resolve_device,
    run,
    seed_int,
)
from dalle.data.transforms import EvalTransform, to_rgb
from dalle.pipeline import DEFAULT_MODEL, Pipeline, load_pipeline
from dalle.transformer.layouts import CAPTION, QA, T2I

PRIOR_SCALE, CANDIDATES = DRAWN_PRIOR_SCALE, DRAWN_CANDIDATES  # the defaults when the model also draws


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files (any size: centre-cropped and resized for the dVAE)")
    p.add_argument("--question", action="append", default=[],
                   help="answer this question about each image instead of captioning it (repeat for several)")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="transformer model directory or training run directory (default: the shipped model)")
    p.add_argument("--dvae", default=None, help="dVAE directory (default: the one the model names)")
    p.add_argument("--num", type=positive_int, default=1, help="texts printed per image and question (>= 1)")
    p.add_argument("--beam", type=positive_int, default=1,
                   help="beam width (1: greedy; raised to --num when smaller); not with --sample")
    p.add_argument("--sample", action="store_true", help="sample --num texts per image instead of searching")
    p.add_argument("--seed", type=seed_int, default=0,
                   help=f"with --sample: the k-th text written of the run uses seed SEED + k (0..{SEED_MAX})")
    add_sampling_flags(p)
    p.add_argument("--prior-scale", type=non_negative_float, default=None,
                   help="captions: weigh each word against the model's own caption prior, choosing by "
                        "(1 + s) log p(word | image) - s log p(word) among the plausible words; helps on what "
                        f"training captions never described, such as an unseen colour/shape pair (default: "
                        f"{PRIOR_SCALE:g} for a model that also draws, else 0 (off); docs/evaluation.md)")
    p.add_argument("--candidates", type=positive_int, default=None,
                   help="captions: write this many per image (beam search, or --sample) and print the --num with "
                        "the highest log p(caption | image) + log p(image | caption), the second by the model's "
                        "own text-to-image stream; finds which object is where when greedy reading does not "
                        f"(default: {CANDIDATES} for a model that also draws, else 1 (off); docs/evaluation.md)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images read and written together (>= 1); results print as each batch ends")
    p.add_argument("--json", action="store_true", help="also write IMAGE.caption.json beside each image")
    p.add_argument("--overwrite", action="store_true", help="with --json: replace existing IMAGE.caption.json files")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_threads_flag(p)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and compute dtype")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown for several batches)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.sample and args.beam > 1:
        p.error("--beam and --sample exclude each other: search or sample")
    if not args.sample and (args.temperature, args.top_k, args.top_p) != (1.0, 0, 1.0):
        p.error("--temperature, --top-k and --top-p shape sampling: add --sample")
    if any(not q.strip() for q in args.question):
        p.error("--question is empty: give a question such as \"how many objects?\", or leave the flag out to caption")
    if args.prior_scale is not None and args.question:
        p.error("--prior-scale guides captions; answers have no caption prior: leave it out with --question")
    if args.candidates is not None and args.question:
        p.error("--candidates reranks captions by the image's likelihood; answers have no such score: leave it out "
                "with --question")
    per_image = args.num if args.question else max(args.num, args.candidates or CANDIDATES)  # seeds each uses
    if args.seed + len(args.images) * max(1, len(args.question)) * per_image > SEED_MAX + 1:
        p.error(f"--seed {args.seed}: the seeds of this run's texts must stay <= {SEED_MAX}; choose a smaller seed")
    return args


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".caption.json") if not path.suffix else path.with_suffix(".caption.json")


def printable(text: str) -> str:
    """Text as a terminal shows it safely: control characters (which a barely trained model may write)
    escaped, so they can neither move the cursor nor split a line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def load_images(paths: list[str], size: int) -> torch.Tensor:
    transform = EvalTransform(size)
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(transform(to_rgb(im), None))
        except (OSError, Image.DecompressionBombError) as e:
            raise SystemExit(f"cannot read image {path}: {e}") from None
    return torch.stack(images)


def read_images(pipe: Pipeline, args: argparse.Namespace, paths: list[Path], first: int) -> list[dict]:
    """Captions or answers of one chunk of images, whose first is image `first` of the run (its seeds)."""
    from dalle.captioning import answer, caption

    images = load_images([str(p) for p in paths], pipe.dvae.config.image_size)
    decoding = dict(num=args.num, beam=max(args.beam, args.num) if not args.sample else 1, sample=args.sample,
                    batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    results: list[dict] = [{"image": str(p), "model": pipe.model_id, "texts": []} for p in paths]
    if not args.question:
        for result, texts in zip(results, caption(pipe, images, seed=args.seed + first * max(args.num, args.candidates),
                                                  prior_scale=args.prior_scale, candidates=args.candidates,
                                                  **decoding)):
            result["texts"] = [{"caption": t.text, "logprob": round(t.logprob, 4)}
                               | ({} if t.image_logprob is None else {"image_logprob": round(t.image_logprob, 2)})
                               for t in texts]
    for q, question in enumerate(args.question):
        seed = args.seed + (q * len(args.images) + first) * args.num
        for result, texts in zip(results, answer(pipe, images, [question] * len(paths), seed=seed, **decoding)):
            result["texts"] += [{"question": question, "answer": t.text, "logprob": round(t.logprob, 4)}
                                for t in texts]
    settings = {k: getattr(args, k) for k in ("beam", "sample", "seed", "temperature", "top_k", "top_p", "prior_scale",
                                              "candidates", "dtype")}
    return [{**r, "settings": settings} for r in results]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dalle.captioning import check_candidates, require_reading
    from dalle.transformer.reading import check_prior

    if not Path(args.model).exists():
        raise SystemExit(f"--model {args.model} does not exist (check the path)")
    layout = QA if args.question else CAPTION
    paths = [Path(p) for p in args.images]
    targets = [sidecar(p) for p in paths] if args.json else []
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{existing[0]} already exists" + (f" (and {len(existing) - 1} more)" if len(existing) > 1
                         else "") + ": pass --overwrite to replace, or leave out --json")
    try:
        pipe = load_pipeline(args.model, dvae_dir=args.dvae, device=resolve_device(args.device),
                             dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load the model: {e}") from None
    drawn_check = layout == CAPTION and T2I in pipe.model.config.layouts  # captions it can also draw from
    if args.prior_scale is None:
        args.prior_scale = PRIOR_SCALE if drawn_check else 0.0
    if args.candidates is None:
        args.candidates = CANDIDATES if drawn_check else 1
    try:
        require_reading(pipe, layout)
        check_prior(pipe.model, layout, args.prior_scale)
        check_candidates(pipe, args.candidates)
    except ValueError as e:  # a text-to-image model: one line saying so, and how to train one that reads
        raise SystemExit(str(e)) from None
    chunks = range(0, len(paths), args.batch_size)
    with tqdm(total=len(paths), unit="img", desc="reading", disable=args.no_progress or len(chunks) < 2) as bar:
        for start in chunks:
            results = read_images(pipe, args, paths[start : start + args.batch_size], start)
            for result in results:
                tqdm.write(result["image"])
                for t in result["texts"]:
                    said = t["caption"] if "caption" in t else f"{t['question']} -> {t['answer']}"
                    image = f", log p(image | caption) {t['image_logprob']:.1f}" if "image_logprob" in t else ""
                    tqdm.write(f"  {printable(said)}  (log p {t['logprob']:.2f}{image})")
                if args.json:
                    sidecar(Path(result["image"])).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            bar.update(len(results))
    return 0


if __name__ == "__main__":
    run(main)
