"""Where the CPU's block-sparse route pays: one sparse layer's attention, forward and backward, fp32, at
several stream lengths, through `attend` with backend "auto" (block-sparse), "sdpa" (the dense mask) and
a full layer for scale. docs/performance.md records a run.

    python benchmarks/blocksparse_crossover.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dalle.transformer.attention import attend

# (batch, heads, text tokens, grid): bench-small's shape at grids 8-32, then the paper's text at 16-32
SHAPES = [(8, 8, 32, 8), (8, 8, 32, 16), (8, 8, 32, 24), (8, 8, 32, 32), (4, 4, 256, 16), (4, 4, 256, 24),
          (4, 4, 256, 32)]


def step_ms(b: int, h: int, t: int, g: int, kind: str, backend: str, runs: int = 7, d: int = 32) -> float:
    q, k, v = (torch.randn(b, h, t + g * g, d, requires_grad=True) for _ in range(3))
    times = []
    for i in range(runs + 2):  # two warm-up passes
        start = time.perf_counter()
        attend(q, k, v, kind=kind, text_len=t, grid=g, kernel=11, backend=backend).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    torch.set_num_threads(p.parse_args().threads)
    print("| batch x heads | text + grid = tokens | kind | block-sparse ms | dense mask ms | full ms |")
    print("|---|---|---|---|---|---|")
    for b, h, t, g in SHAPES:
        full = step_ms(b, h, t, g, "full", "auto")
        for kind in ("row", "column", "conv"):
            print(f"| {b} x {h} | {t} + {g}x{g} = {t + g * g} | {kind} | {step_ms(b, h, t, g, kind, 'auto'):.1f} | "
                  f"{step_ms(b, h, t, g, kind, 'sdpa'):.1f} | {full:.1f} |", flush=True)


if __name__ == "__main__":
    main()
