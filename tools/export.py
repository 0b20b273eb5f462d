"""Turn a training checkpoint into a model directory that generate.py and the eval tools load.

    python tools/export.py runs/dalle/checkpoints/step-0010000 --out models/dalle
    python tools/export.py runs/dalle --out models/dalle          # the run's latest checkpoint

Works for DeepSpeed checkpoints of every ZeRO stage (the fp32 master weights are gathered from every
rank's shard, on the CPU, with no launcher or GPU) and for plain ones. The result is config.json +
model.safetensors, plus the tokenizer.json / dvae.json the checkpoint carries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dalle import cli
from dalle.checkpoint import resolve_model_dir
from dalle.train.checkpoints import export

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory (step-N), or a run directory for its latest")
    p.add_argument("--out", required=True, help="model directory to write (must not exist)")
    p.add_argument("--live", action="store_true",
                   help="export the trained weights even when the run kept an EMA (default: the EMA's, "
                        "as plain checkpoints hold)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of the written weights")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {out} already exists; choose a new directory")
    source = resolve_model_dir(args.checkpoint)
    try:
        path = export(source, out, live=args.live, dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot export {args.checkpoint}: {e}") from None
    print(f"exported {source} -> {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
