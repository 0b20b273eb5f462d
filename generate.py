"""Generate images from text prompts with a trained DALL-E model.

    python generate.py "a red circle above a blue square" --model runs/dalle-shapes --num-images 8 --grid

Writes OUT/<prompt>-<i>.png and a JSON sidecar for each image (prompt, seed, settings, model id), so any
image can be made again exactly: `generate.py PROMPT --seed SEED --num-images 1` with the sidecar's
settings. With --grid, also one grid PNG per prompt.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from dalle.cli import resolve_device
from dalle.data.transforms import EvalTransform, to_rgb
from dalle.pipeline import generate, load_pipeline, prime_codes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", nargs="*", help="one or more prompts (quote each)")
    p.add_argument("--prompts", dest="prompt_file", default="", help="file with one prompt per line")
    p.add_argument("--model", required=True, help="transformer model directory or training run directory")
    p.add_argument("--dvae", default=None, help="dVAE directory (default: the one the model names)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together")
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed SEED + i")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--cond-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1.0: off; 3.0 is a common choice)")
    p.add_argument("--prime-image", default="", help="image whose top rows of codes are kept (image-to-image)")
    p.add_argument("--prime-rows", type=int, default=0, help="rows of the code grid taken from --prime-image")
    p.add_argument("--out", default="outputs", help="output directory")
    p.add_argument("--grid", action="store_true", help="also write one grid PNG per prompt")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and compute dtype")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.prompt_file:
        try:
            args.prompts += [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            p.error(f"cannot read --prompts {args.prompt_file}: {e.strerror}")
    if not args.prompts:
        p.error("give at least one prompt, or --prompts FILE")
    if args.num_images < 1 or args.batch_size < 1:
        p.error("--num-images and --batch-size must be at least 1")
    if bool(args.prime_image) != bool(args.prime_rows):
        p.error("--prime-image and --prime-rows go together")
    return args


def slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise SystemExit(f"cannot write to --out {out}: {e.strerror}") from None
    pipe = load_pipeline(args.model, dvae_dir=args.dvae, device=resolve_device(args.device),
                         dtype=DTYPES[args.dtype])
    prime = None
    if args.prime_image:
        image = EvalTransform(pipe.dvae.config.image_size)(to_rgb(Image.open(args.prime_image)), None)
        prime = prime_codes(pipe, image, args.prime_rows)
    settings = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "cond_scale", "prime_image",
                                              "prime_rows", "dtype")}
    jobs = [(p, args.seed + i, i) for p in args.prompts for i in range(args.num_images)]
    per_image = pipe.model.config.image_seq_len - (0 if prime is None else len(prime))
    bar = tqdm(total=len(jobs) * per_image, unit="tok", desc="sampling", disable=args.no_progress)
    results: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        rows = len(chunk)
        images = generate(pipe, [j[0] for j in chunk], [j[1] for j in chunk], temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale, prime=prime,
                          on_token=lambda _k: bar.update(rows))  # noqa: B023 (called within this iteration)
        for (prompt, seed, i), image in zip(chunk, images):
            name = f"{slug(prompt)}-{i}"
            save_image(image, out / f"{name}.png")
            meta = {"prompt": prompt, "seed": seed, "index": i, "model": pipe.model_id, **settings}
            (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
            results.setdefault(prompt, []).append(image)
    bar.close()
    for prompt, images in results.items() if args.grid else ():
        grid = make_grid(torch.stack(images), nrow=min(len(images), 8), padding=2)
        save_image(grid, out / f"{slug(prompt)}-grid.png")
    print(f"wrote {len(jobs)} images for {len(results)} prompt(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
