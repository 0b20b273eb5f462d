"""How fast could this machine draw 64 candidates at bench-small? A floor for `gen:candidates`, not a benchmark.

The speed issue asks for the whole 64-candidate generation at 40% of the fp32 matmul peak, counting the
transformer's FLOPs. Each decoding step must also read every row's cached keys and values, which no product
shares between rows. So the generation can take no less than

    (transformer FLOPs + dVAE decode and reranker FLOPs) / peak  +  bytes of cache the steps read / bandwidth

with every product at the peak and the cache streamed as fast as `torch.sum` streams buffers of the cache's
size, one after the other (a step cannot attend before its projections, nor project before it attends). The
probe measures the peak, the bandwidth and today's generation on this machine in one process, sets the floor
beside the time 40% allows, and repeats it for a cache whose text keys are read once for all rows
(benchmarks/shared_prefix_probe.py) and for one in bf16 (half the bytes). docs/performance.md records runs.

    python benchmarks/candidates_floor.py [--threads 2] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dalle.transformer.attention import image_keys, layer_kinds  # noqa: E402
from dalle.transformer.model import DALLEConfig  # noqa: E402

TARGET_SHARE = 0.40


def step_keys(cfg: DALLEConfig) -> tuple[int, int]:
    """(keys, text keys) the decoding steps of one image read, summed over steps and layers: each step after
    the prompt pass reads, per layer, every cached key (a full layer) or the text keys plus its image key set,
    as `KVCache.attend` does (tests/test_bench.py counts them there)."""
    t, n = cfg.text_seq_len, cfg.image_seq_len
    geometry = (t, cfg.image_grid_size, cfg.conv_kernel)
    keys = 0
    for kind in layer_kinds(cfg.n_layer, cfg.attn_schedule):
        if kind == "full":
            keys += sum(t + s + 1 for s in range(1, n))
        else:
            keys += sum(t + len(idx) for idx in image_keys(kind, *geometry)[1:])
    return keys, cfg.n_layer * t * (n - 1)


def cache_bytes(cfg: DALLEConfig, rows: int, element: int = 4, text_once: bool = False) -> int:
    """Bytes of keys and values the decoding steps of `rows` images read: a key and a value of n_embd
    elements per key read (all heads). text_once: the text keys read once a step for all rows."""
    keys, text = step_keys(cfg)
    per_row = keys - text if text_once else keys
    shared = text if text_once else 0
    return (rows * per_row + shared) * 2 * cfg.n_embd * element


def stream_gbps(cfg: DALLEConfig, rows: int, runs: int) -> float:
    """The best rate of `torch.sum` over one cache's buffers (a key and a value buffer per layer, fp32, every
    slot), in GB/s: reading the cache can go no faster than streaming it whole."""
    shape = (rows, cfg.n_head, cfg.text_seq_len + cfg.image_seq_len, cfg.n_embd // cfg.n_head)
    buffers = [torch.randn(shape) for _ in range(2 * cfg.n_layer)]
    total = sum(b.numel() * b.element_size() for b in buffers)
    best = float("inf")
    for _ in range(runs + 1):
        t = time.perf_counter()
        for b in buffers:
            b.sum()
        best = min(best, time.perf_counter() - t)
    return total / best / 1e9


def other_flops(pipe, rows: int) -> float:
    """FLOPs of what generate does after sampling: the dVAE decode of `rows` code grids and their reranking,
    counted by torch's FlopCounterMode (convolutions and products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dalle.pipeline import score

    cfg = pipe.model.config
    codes = torch.randint(cfg.image_vocab_size, (rows, cfg.image_grid_size, cfg.image_grid_size))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        images = pipe.dvae.decode(codes).float()
        score(pipe, "a red circle above a blue square", images)
    return float(counter.get_total_flops())


def floor(flops: float, peak_gflops: float, read: int, gbps: float) -> dict[str, float]:
    """The floor of a generation that does `flops` at the peak and reads `read` bytes of cache at `gbps`."""
    s = flops / peak_gflops / 1e9 + read / gbps / 1e9
    return {"cache_gb": read / 1e9, "floor_s": s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as tools/bench.py)")
    p.add_argument("--runs", type=int, default=3, help="timed generations after one warm-up (default 3)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file (refused if it exists)")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        p.error(f"{args.json} exists; name another file or delete it")
    torch.set_num_threads(args.threads)

    from dalle.transformer.decoding import sampling_flops
    from tools import bench_cases

    r = bench_cases.case_candidates(warmup=1, runs=args.runs)
    pipe = bench_cases._pipeline()
    cfg = pipe.model.config
    rows = r["candidates"]
    flops = rows * sampling_flops(cfg)
    peak = r["peak_fp32_gflops"]
    gbps = stream_gbps(cfg, rows, runs=5)
    other = other_flops(pipe, rows)
    out: dict[str, Any] = {
        "machine": bench_cases.bench.machine(),
        "threads": args.threads, "candidates": rows, "gflop": flops / 1e9, "peak_fp32_gflops": peak,
        "stream_gbps": gbps, "measured_s": r["median_s"], "measured_share": r["whole_peak_share"],
        "sampling_s": r["sampling_s"], "other_s": r["median_s"] - r["sampling_s"], "other_gflop": other / 1e9,
        "allowed_s": flops / (TARGET_SHARE * peak * 1e9), "arithmetic_s": (flops + other) / peak / 1e9}
    for name, read in (("fp32", cache_bytes(cfg, rows)), ("fp32_text_once", cache_bytes(cfg, rows, text_once=True)),
                       ("bf16_cache", cache_bytes(cfg, rows, element=2))):
        f = floor(flops + other, peak, read, gbps)
        out[name] = {**f, "best_share": flops / f["floor_s"] / peak / 1e9}
    print(f"64 candidates at bench-small: {out['gflop']:.1f} GFLOP in the transformer, {other / 1e9:.1f} in the dVAE "
          f"and reranker; fp32 peak {peak:.0f} GFLOP/s; the cache streams at {gbps:.1f} GB/s")
    print(f"measured {out['measured_s']:.2f} s ({out['measured_share']:.0%} of the peak, {out['other_s']:.2f} s of it "
          f"after sampling); all products at the peak take {out['arithmetic_s']:.3f} s; "
          f"{TARGET_SHARE:.0%} of the peak allows {out['allowed_s']:.3f} s")
    print("| cache | bytes read, GB | floor, s | best share of the peak |\n|---|---|---|---|")
    for name in ("fp32", "fp32_text_once", "bf16_cache"):
        f = out[name]
        print(f"| {name} | {f['cache_gb']:.1f} | {f['floor_s']:.3f} | {f['best_share']:.0%} |")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
