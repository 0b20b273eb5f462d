"""Build a transformer config on the `meta` device (no memory used) and print its size, its memory per
GPU under a ZeRO stage and its FLOPs per step, so a user can plan hardware before renting it.

    python tools/estimate.py --config configs/dalle/paper-12b.yaml
    python tools/estimate.py --config configs/dalle/paper-12b.yaml --gpus 64 --zero 3

Memory per GPU (ZeRO paper, Rajbhandari et al. 2020), N parameters over G GPUs, mixed precision (bf16/fp16):
16-bit weights 2N, 16-bit gradients 2N, fp32 master weights + AdamW moments 12N; fp32 training: 4N, 4N, 8N.
ZeRO-1 divides the optimizer state by G, ZeRO-2 also the gradients, ZeRO-3 also the weights.
Activations per GPU, micro-batch b, stream s, width h, L layers, a bytes per activation (2 in 16 bits):
17·a·s·b·h per layer (Korthikanti et al. 2022, 34·s·b·h bytes in 16 bits; no s² term because the fused
attention kernels keep no score matrix), plus the logits b·(T·(Vt+T) + N_img·Vi)·(a + 8) (the loss takes
fp32 log-softmax and its gradient). With checkpointing each block keeps only its input, a·s·b·h, and one
block is recomputed at a time: L·a·s·b·h + 17·a·s·b·h. Not counted: framework buffers, fragmentation,
communication buckets (ZeRO's reduce/prefetch buckets, a few hundred MB), the CUDA context (~0.5 GiB).
FLOPs per step: 6·N_matmul·tokens (forward 2, backward 4 per weight and token; embeddings are lookups)
plus attention, 12·h per visible (query, key) pair per layer, counted from each layer's mask; one more
forward (8·N instead of 6·N) when activations are recomputed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dalle import cli
from dalle.config import from_dict
from dalle.train.config import TrainConfig, apply_overrides, load_yaml
from dalle.transformer.model import DALLE, DALLEConfig, training_flops_per_token

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


def zero_memory(n: int, gpus: int, stage: int, mixed: bool) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer state under ZeRO `stage` over `gpus`."""
    weights, grads, optim = (2 * n, 2 * n, 12 * n) if mixed else (4 * n, 4 * n, 8 * n)
    return {"weights": weights / gpus if stage >= 3 else weights,
            "gradients": grads / gpus if stage >= 2 else grads,
            "optimizer state": optim / gpus if stage >= 1 else optim}


def activation_memory(cfg: DALLEConfig, batch: int, act_bytes: int) -> tuple[float, float]:
    """Bytes of activations per GPU for a micro-batch: (stored in full, with block checkpointing)."""
    s, h, layers = cfg.seq_len, cfg.n_embd, cfg.n_layer
    per_layer = 17 * act_bytes * s * batch * h
    logits = batch * (cfg.text_seq_len * cfg.text_vocab_total + cfg.image_seq_len * cfg.image_vocab_size)
    logits *= act_bytes + 8
    return layers * per_layer + logits, layers * act_bytes * s * batch * h + per_layer + logits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--config", required=True, help="a transformer config (its model and train sections are read)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value, e.g. --set model.n_layer=32 or --set train.batch_size=4")
    p.add_argument("--gpus", type=cli.positive_int, default=1,
                   help="data-parallel GPUs (ranks) sharing the ZeRO state (>= 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    data = apply_overrides(load_yaml(args.config), args.overrides)
    cfg = from_dict(DALLEConfig, data.get("model"), where=f"{args.config} [model]")
    train = from_dict(TrainConfig, data.get("train"), where=f"{args.config} [train]")
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

    mixed = train.precision != "fp32"
    act_bytes = 2 if mixed else 4
    per_gpu = zero_memory(n, args.gpus, args.zero, mixed)
    full, ckpt = activation_memory(cfg, train.batch_size, act_bytes)
    print(f"per GPU with ZeRO-{args.zero} over {args.gpus} GPUs, {train.precision} "
          f"(train.precision), micro-batch {train.batch_size} (train.batch_size):")
    for what, size in per_gpu.items():
        print(f"  {what:<46} {size / GIB:10,.2f} GiB")
    state = sum(per_gpu.values())
    for what, size in (("activations, stored in full", full), ("activations, block checkpointing", ckpt)):
        print(f"  {what:<46} {size / GIB:10,.2f} GiB   (with the above: {(state + size) / GIB:,.1f} GiB)")

    sequences = train.batch_size * train.grad_accum * args.gpus
    tokens = sequences * cfg.seq_len
    per_token = training_flops_per_token(cfg)
    dense, attention = per_token[0] * tokens, per_token[1] * tokens
    print(f"FLOPs per step: {sequences:,} sequences ({train.batch_size} x {train.grad_accum} accumulation x "
          f"{args.gpus} GPUs) = {tokens:,} tokens")
    for what, flops in ((f"matmuls, 6 N tokens (N = {per_token[0] / 6e6:,.1f} M matmul weights)", dense),
                        ("attention, visible pairs of each layer's mask", attention),
                        ("total", dense + attention),
                        ("total with activation recomputation", (dense + attention) * 4 / 3)):
        print(f"  {what:<58} {flops:.3e}")
    return 0


if __name__ == "__main__":
    cli.run(main)
