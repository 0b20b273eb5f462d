"""Would candidates of one prompt decode faster if they shared its text keys? A probe, not the library's path.

Every candidate of one prompt caches the same text keys and values, and each decoding step reads them once per
row. This probe replaces the step's attention (`KVCache.attend`) with one that keeps the text keys once
for all rows: the scores against them are one (rows x text) product per head, the image keys are read per row
as before, and one softmax spans both. It times whole samplings of N candidates of one prompt, alternating the
library's step and the probe's, and checks that they draw the same tokens. docs/performance.md records a run.

    python benchmarks/shared_prefix_probe.py [--threads 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.transformer import decoding
from dalle.transformer.model import DALLE, DALLEConfig
from dalle.transformer.sampling import sample

BENCH_SMALL = dict(text_vocab_size=1024, text_seq_len=32, image_vocab_size=1024, image_grid_size=16, n_embd=256,
                   n_layer=6, n_head=8)
PAPER = dict(text_vocab_size=1024, text_seq_len=256, image_vocab_size=1024, image_grid_size=32, n_embd=128,
             n_layer=6, n_head=4)  # tools/bench_cases.py's paper geometry
# (name, model, schedule, candidates)
CASES = [("bench-small", BENCH_SMALL, "full", 64),
         ("bench-small, 256 text tokens", {**BENCH_SMALL, "text_seq_len": 256}, "full", 64),
         ("paper geometry", PAPER, "paper", 16), ("paper geometry", PAPER, "full", 16)]
# Rows of the text product are padded to this many, so that a row's bits do not depend on how many shared it
MIN_ROWS = 16


def attend_shared(q: Tensor, kt: Tensor, vt: Tensor, ki: Tensor, vi: Tensor) -> Tensor:
    """q (B, H, 1, D); text keys and values (1, H, T, D) shared by every row; image keys and values (B, H, Li, D)."""
    b, h, _, d = q.shape
    t, li, m = kt.shape[2], ki.shape[2], max(b, MIN_ROWS)
    qt = F.pad(q.reshape(b, h, d).transpose(0, 1), (0, 0, 0, m - b))  # (H, m, D)
    st = torch.bmm(qt, kt[0].transpose(1, 2))[:, :b].transpose(0, 1).reshape(b * h, 1, t)
    si = torch.bmm(q.reshape(b * h, 1, d), ki.reshape(b * h, li, d).transpose(1, 2))
    p = torch.cat([st, si], dim=-1).mul_(d**-0.5).softmax(dim=-1)  # (B*H, 1, T + Li)
    pt = F.pad(p[..., :t].reshape(b, h, t).transpose(0, 1), (0, 0, 0, m - b))  # (H, m, T)
    ot = torch.bmm(pt, vt[0])[:, :b].transpose(0, 1).reshape(b, h, 1, d)
    return torch.bmm(p[..., t:], vi.reshape(b * h, li, d)).view(b, h, 1, d) + ot


def shared_attend(self: decoding.KVCache, q: Tensor, layer: int) -> Tensor:
    """`KVCache.attend` with the text keys read once: the library's windows, minus their text slots."""
    t, n = self.text_len, self.length + 1
    if not hasattr(self, "text_k"):  # the prompt pass filled every row's text slots alike; keep row 0's
        self.text_k = [k[:1, :, :t].contiguous() for k in self.k]
        self.text_v = [v[:1, :, :t].contiguous() for v in self.v]
    if ring := self.ring[layer]:
        end = t + min(n - t, ring)
        self.window_k[layer][:, :, t + (self.length - t) % ring] = self.k[layer][:, :, self.length]
        self.window_v[layer][:, :, t + (self.length - t) % ring] = self.v[layer][:, :, self.length]
        ki, vi = self.window_k[layer][:, :, t:end], self.window_v[layer][:, :, t:end]
    elif self.keys[layer] is not None:
        index = self.keys[layer][self.length - t]
        ki, vi = self.window_k[layer][:, :, t : t + len(index)], self.window_v[layer][:, :, t : t + len(index)]
        torch.index_select(self.k[layer], 2, index, out=ki)
        torch.index_select(self.v[layer], 2, index, out=vi)
    else:
        ki, vi = self.k[layer][:, :, t:n], self.v[layer][:, :, t:n]
    return attend_shared(q, self.text_k[layer], self.text_v[layer], ki, vi)


def run_case(model_kw: dict[str, Any], schedule: str, candidates: int, runs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DALLE(DALLEConfig(**model_kw, attn_schedule=schedule)).eval()
    cfg = model.config
    text = torch.randint(cfg.text_vocab_size, (1, cfg.text_seq_len)).expand(candidates, -1).clone()
    top_k = max(1, cfg.image_vocab_size // 16)
    library = decoding.KVCache.attend
    times: dict[str, list[float]] = {"library": [], "shared": []}
    tokens = {}
    for i in range(runs + 1):  # the first round warms up
        for name in times:
            decoding.KVCache.attend = shared_attend if name == "shared" else library
            try:
                gens = [torch.Generator().manual_seed(c) for c in range(candidates)]
                start = time.perf_counter()
                tokens[name] = sample(model, text, top_k=top_k, generator=gens)
                if i:
                    times[name].append(time.perf_counter() - start)
            finally:
                decoding.KVCache.attend = library
    same = (tokens["library"] == tokens["shared"]).float().mean().item()
    return {name: statistics.median(t) for name, t in times.items()} | {"runs": times, "same_tokens": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--runs", type=int, default=3, help="timed samplings of each kind per case, after one warm-up")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | schedule | candidates | library s (runs) | shared text s (runs) | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, model_kw, schedule, candidates in CASES:
        r = run_case(model_kw, schedule, candidates, args.runs)
        runs = {k: ", ".join(f"{s:.2f}" for s in v) for k, v in r["runs"].items()}
        print(f"| {name} | {schedule} | {candidates} | {r['library']:.2f} ({runs['library']}) | {r['shared']:.2f} "
              f"({runs['shared']}) | {r['library'] / r['shared']:.2f}x | {r['same_tokens']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
