"""Pack a trained transformer, its dVAE and a reranker into one self-contained model directory.

    python tools/bundle.py --dalle runs/dalle-shapes --reranker runs/reranker-shapes --out dalle/default_model \
        --overwrite

The result is what generate.py --model reads, with no pointer outside itself:

    OUT/config.json, model.safetensors, tokenizer.json     the transformer and its tokenizer
    OUT/dvae/config.json, model.safetensors                 the dVAE it was trained with
    OUT/reranker/config.json, model.safetensors, tokenizer.json the reranker (optional)
    OUT/bundle.json                                         where each part came from

Weights are stored in --dtype (fp16 by default: half the bytes, and the models are computed in fp32 or
bf16 after loading, so sampling is unchanged beyond fp16 rounding of the weights). The directory is
written atomically: a crash leaves the previous bundle in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dalle import cli
from dalle.checkpoint import atomic_dir, model_dir_contents, resolve_model_dir, write_json
from dalle.pipeline import find_dvae, load_pipeline

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _portable(path: Path) -> str:
    """Where a part came from, relative to the working directory (the checkout that ran the build), so the
    record says the same on every machine; a part from outside it is named by its last three components."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*path.parts[-3:]))


def bundle(dalle_dir: str | Path, out: str | Path, *, reranker_dir: str | Path | None = None,
           dvae_dir: str | Path | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the bundle; the parts are checked to fit together (as generate.py loads them) first."""
    pipe = load_pipeline(dalle_dir, dvae_dir=dvae_dir, reranker_dir=reranker_dir)
    dalle_dir = resolve_model_dir(dalle_dir)
    sources = {"dalle": _portable(dalle_dir), "dvae": _portable(resolve_model_dir(find_dvae(dalle_dir, dvae_dir)))}

    def fill(tmp: Path) -> None:
        model_dir_contents(pipe.model, tmp, dtype=dtype)
        pipe.tokenizer.save(tmp / "tokenizer.json")
        (tmp / "dvae").mkdir()
        model_dir_contents(pipe.dvae, tmp / "dvae", dtype=dtype)
        if pipe.reranker is not None:
            (tmp / "reranker").mkdir()
            model_dir_contents(pipe.reranker, tmp / "reranker", dtype=dtype)
            pipe.reranker_tokenizer.save(tmp / "reranker" / "tokenizer.json")
            sources["reranker"] = _portable(resolve_model_dir(reranker_dir) if reranker_dir else dalle_dir / "reranker")
        write_json(tmp / "bundle.json", {"sources": sources, "dtype": str(dtype).removeprefix("torch."),
                                         "ids": {"dalle": pipe.model_id, "reranker": pipe.reranker_id}})

    return atomic_dir(Path(out), fill)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--dalle", required=True, help="transformer run or model directory (tools/train_dalle.py)")
    p.add_argument("--dvae", default=None, help="dVAE directory (default: the one the transformer names)")
    p.add_argument("--reranker", default=None, help="reranker run or model directory (tools/train_reranker.py)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    cli.add_overwrite_flag(p, "an existing --out (written anew beside it, then swapped in)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="dtype the weights are stored in")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    cli.refuse_existing("--out", args.out, overwrite=args.overwrite)
    try:
        out = bundle(args.dalle, args.out, reranker_dir=args.reranker, dvae_dir=args.dvae, dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot bundle: {e}") from None
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    cli.run(main)
