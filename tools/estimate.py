"""Build a transformer config on the `meta` device (no memory used) and print its size: parameters by
part, and the memory its weights, gradients and AdamW state need, so a user can plan hardware.

    python tools/estimate.py --config configs/dalle/paper-12b.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dalle.config import apply_overrides, from_dict, load_yaml
from dalle.model import DALLE, DALLEConfig

GIB = 2**30


def parameter_counts(model: DALLE) -> dict[str, int]:
    parts = {"embeddings": 0, "transformer blocks": 0, "output heads": 0}
    for name, p in model.named_parameters():
        key = "transformer blocks" if name.startswith("blocks.") else (
            "output heads" if name.endswith("_head.weight") else "embeddings")
        parts[key] += p.numel()
    return parts


def memory_table(n: int) -> list[tuple[str, float]]:
    """Bytes per parameter for the usual recipes: weights, gradients and AdamW's two moments."""
    return [
        ("fp32 weights", 4 * n),
        ("bf16 weights (inference)", 2 * n),
        ("fp32 training: weights + grads + AdamW moments", 16 * n),
        ("bf16 mixed precision: bf16 weights + grads, fp32 master + moments", 16 * n),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="a transformer config (its model section is read)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a model value, e.g. --set model.n_layer=32")
    args = p.parse_args(argv)
    data = apply_overrides(load_yaml(args.config), args.overrides)
    cfg = from_dict(DALLEConfig, data.get("model"), where=f"{args.config} [model]")
    if cfg.text_vocab_size == 0:
        cfg = DALLEConfig(**{**cfg.to_dict(), "text_vocab_size": 16384})
        print("text_vocab_size 0 (taken from the tokenizer) counted as 16384")
    with torch.device("meta"):
        model = DALLE(cfg)
    parts = parameter_counts(model)
    n = sum(parts.values())
    print(f"{args.config}: {cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} heads, "
          f"stream {cfg.text_seq_len} text + {cfg.image_seq_len} image tokens")
    for name, count in parts.items():
        print(f"  {name:<20} {count / 1e6:12,.1f} M")
    print(f"  {'total':<20} {n / 1e6:12,.1f} M  ({n / 1e9:.2f} B)")
    print("memory, before activations:")
    for what, size in memory_table(n):
        print(f"  {what:<66} {size / GIB:10,.1f} GiB")
    flops = 6 * n * cfg.seq_len
    print(f"training FLOPs per sequence (6 N L, dense-equivalent): {flops:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
