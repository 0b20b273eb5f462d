"""Human feedback on samples: sample pairs into a comparisons store, let people (or a simulated rater)
compare them in a local web app, and export what they chose.

    python tools/feedback.py sample --store runs/fb.db --shapes train --n 50        # pairs from the shipped model
    python tools/feedback.py serve --store runs/fb.db                                # http://127.0.0.1:8000
    python tools/feedback.py simulate --store runs/fb.db --noise 0.25 --rater sim25   # shapes prompts only
    python tools/feedback.py stats --store runs/fb.db
    python tools/feedback.py export --store runs/fb.db --out comparisons.jsonl
    python tools/feedback.py import --store other.db --file comparisons.jsonl

The store is one SQLite file (dalle/feedback/store.py). The web app binds 127.0.0.1 unless --host says
otherwise; anyone who can reach it can add comparisons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm

from dalle.cli import (
    DTYPES,
    HelpFormatter,
    add_debug_flag,
    add_sampling_flags,
    add_threads_flag,
    apply_threads,
    read_prompt_file,
    resolve_device,
    run,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_debug_flag(p)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", required=True, help="the comparisons store (an SQLite file; made if new)")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default=None, help="transformer model or run directory (default: the shipped one)")
    model.add_argument("--device", default="auto", help="cpu, cuda or auto")
    model.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and compute dtype")
    add_threads_flag(model)
    fmt = HelpFormatter
    s = sub.add_parser("sample", parents=[common, model], formatter_class=fmt, help="sample pairs into the store")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", default="", help="file with one prompt per line")
    source.add_argument("--shapes", choices=["train", "val", "zeroshot"], help="prompts of this shapes split")
    s.add_argument("--n", type=int, default=20, help="shapes prompts to take (with --shapes)")
    s.add_argument("--pairs-per-prompt", type=int, default=1, help="pairs sampled for each prompt")
    s.add_argument("--seed", type=int, default=0, help="sample k of a prompt uses seed SEED + k")
    s.add_argument("--cond-scale", type=float, default=1.0,
                   help="classifier-free guidance scale; 1 (none) samples the model's own distribution, which "
                        "DPO, GRPO and tools/eval_feedback.py all assume")
    s.add_argument("--batch-size", type=int, default=16, help="images sampled together")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_sampling_flags(s)
    v = sub.add_parser("serve", parents=[common, model], formatter_class=fmt, help="start the web app")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="TCP port")
    v.add_argument("--no-model", action="store_true", help="serve comparisons only, without the generate page")
    m = sub.add_parser("simulate", parents=[common], formatter_class=fmt,
                       help="label every pair of shapes prompts with the simulated rater")
    m.add_argument("--rater", default="simulated", help="name its comparisons are stored under")
    m.add_argument("--noise", type=float, default=0.0, help="share of decided labels flipped (0-0.5)")
    m.add_argument("--seed", type=int, default=0, help="seed of the label noise")
    sub.add_parser("stats", parents=[common], formatter_class=fmt, help="print comparisons per rater")
    e = sub.add_parser("export", parents=[common], formatter_class=fmt, help="write the comparisons as JSONL")
    e.add_argument("--out", required=True, help="JSONL file to write (refused if it exists)")
    i = sub.add_parser("import", parents=[common, model], formatter_class=fmt, help="add comparisons from JSONL")
    i.add_argument("--file", required=True, help="JSONL file of `export`")
    return p


def _pipeline(args: argparse.Namespace):
    from dalle.pipeline import DEFAULT_MODEL, load_pipeline

    apply_threads(args.threads)
    try:
        return load_pipeline(args.model or DEFAULT_MODEL, device=resolve_device(args.device), dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load the model: {e}") from None


def _sample(args: argparse.Namespace) -> None:
    """Reads the prompts and loads the model before it opens the store, so a mistake in either makes no file."""
    from dalle.evaluation.compositional import shapes_prompts
    from dalle.feedback.pairs import add_pairs

    if args.n < 1 or args.pairs_per_prompt < 1 or args.batch_size < 1:
        raise SystemExit("--n, --pairs-per-prompt and --batch-size must be at least 1")
    if args.shapes:
        prompts, split = shapes_prompts(args.shapes, args.n), args.shapes
    else:
        try:
            prompts = read_prompt_file(args.prompts, "--prompts", required=True)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        split = ""
    pipe = _pipeline(args)
    store = _open_store(args.store)
    with tqdm(total=2 * len(prompts) * args.pairs_per_prompt, unit="img", desc="sampling",
              disable=args.no_progress) as bar:
        pairs = add_pairs(pipe, store, prompts, split=split, per_prompt=args.pairs_per_prompt, seed=args.seed,
                          batch_size=args.batch_size, progress=bar.update, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale)
    print(f"added {len(pairs)} pairs for {len(prompts)} prompts to {args.store}")


def _simulate(args: argparse.Namespace, store) -> None:
    from dalle.feedback.data import png_rgb
    from dalle.feedback.raters import SimulatedRater, shapes_prompt

    rater = SimulatedRater(args.rater, args.noise, args.seed)
    made = 0
    while (pair_id := store.next_pair(rater.name)) is not None:
        pair = store.pair(pair_id)
        try:
            prompt = shapes_prompt(pair["split"], pair["prompt"])
        except ValueError as e:
            raise SystemExit(f"pair {pair_id}: {e}") from None
        left, right = (pair["a_id"], pair["b_id"]) if made % 2 == 0 else (pair["b_id"], pair["a_id"])
        store.record(pair_id, left, rater.choose(prompt, *(png_rgb(store.png(s)) for s in (left, right))), rater.name)
        made += 1
    print(f"{rater.name}: {made} comparisons added")


def _open_store(path: str):
    from dalle.feedback.store import Store

    try:
        return Store(path)
    except Exception as e:  # sqlite3.DatabaseError (not a database), OSError
        raise SystemExit(f"cannot open --store {path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sample":
        _sample(args)
        return 0
    from dalle.feedback.store import export_jsonl, import_jsonl

    store = _open_store(args.store)
    if args.command == "simulate":
        _simulate(args, store)
    elif args.command == "stats":
        counts = store.counts()
        print(", ".join(f"{v} {k}" for k, v in counts.items()))
        for name, s in store.rater_stats().items():
            print(f"{name}: {s['comparisons']} comparisons, gold accuracy {s['gold_accuracy']:.2f} on "
                  f"{s['gold_pairs']}, agreement {s['agreement']:.2f} on {s['shared_judgements']}")
    elif args.command == "export":
        if Path(args.out).exists():
            raise SystemExit(f"--out {args.out} exists: choose another name")
        print(f"wrote {export_jsonl(store, args.out)} comparisons to {args.out}")
    elif args.command == "import":
        from dalle.feedback.pairs import png_bytes

        pipe = _pipeline(args)
        g = pipe.model.config.image_grid_size

        def render(codes: list[int]) -> bytes:
            import torch

            return png_bytes(pipe.dvae.decode(torch.tensor(codes).view(1, g, g).to(pipe.device))[0].cpu())
        try:
            print(f"added {import_jsonl(store, args.file, render)} comparisons from {args.file}")
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot import {args.file}: {e}") from None
    elif args.command == "serve":
        from dalle.feedback.app import create_app

        app = create_app(args.store, pipeline=None if args.no_model else _pipeline(args))
        print(f"comparing at http://{args.host}:{args.port}/compare (Ctrl-C stops)")
        app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    run(main)
