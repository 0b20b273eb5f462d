"""The report of tools/gpu_check.sh: read the check's JSON outputs, write a markdown section, and say
whether fp16 loss scaling skipped overflowing steps and recovered.

    python tools/gpu_report.py OUT_DIR --steps 30 --append docs/performance.md

OUT_DIR holds what gpu_check.sh wrote: peak.json (the card and its measured bf16 matmul peak), bf16.json
and fp16.json (tools/bench_train.py summaries), gpu-bench.json and gpu-bench.md (tools/bench.py). Exit
status 1 when fp16 did not skip and recover, a loss is not finite, or a benchmark case failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any


def fp16_recovered(fp16: dict[str, Any]) -> tuple[bool, bool]:
    """(some steps overflowed and were skipped while others applied, the scale rose again after its low)."""
    scales = fp16["loss_scales"]
    low = scales.index(min(scales)) if scales else 0
    skipped_then_applied = fp16["overflow_steps"] > 0 and fp16["applied_steps"] > 0
    return skipped_then_applied, any(s > scales[low] for s in scales[low + 1 :])


def report(out: Path, steps: int, today: datetime.date | None = None) -> tuple[str, bool]:
    peak = json.loads((out / "peak.json").read_text())
    runs = {p: json.loads((out / f"{p}.json").read_text()) for p in ("bf16", "fp16")}
    skipped_then_applied, raised_again = fp16_recovered(runs["fp16"])
    finite = all(r["last_loss"] is not None and math.isfinite(r["last_loss"]) for r in runs.values())
    b = runs["bf16"]
    lines = [f"## GPU check, {today or datetime.date.today()}, {peak['card']}", "",
             f"`tools/gpu_check.sh`: configs/dalle/bench-300m.yaml ({b['seq_len']} tokens per sample, batch "
             f"{b['effective_batch']}), synthetic tokens, {steps} steps, DeepSpeed ZeRO-2 on one GPU; median over "
             f"the steps after the 10th. MFU = tokens/s x {b['model_flops_per_token']:.3g} model FLOPs per token / "
             f"the measured bf16 matmul peak of {peak['tflops']:.0f} TFLOP/s.", "",
             "| precision | tokens/s | samples/s | MFU | peak memory | steps applied | overflow steps "
             "| loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        mfu = r["tokens_per_s"] * r["model_flops_per_token"] / (peak["tflops"] * 1e12)
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:.1f} | {mfu:.1%} | "
                     f"{r.get('peak_memory_gib', 0):.1f} GiB | {r['applied_steps']} | {r['overflow_steps']} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    scales = " ".join(f"2^{math.log2(s):.0f}" for s in runs["fp16"]["loss_scales"])
    recovered = skipped_then_applied and raised_again
    lines += ["", f"fp16 loss scale per step: {scales}",
              f"fp16 overflow steps skipped and recovered: {'yes' if recovered else 'NO'} (skips then applied "
              f"steps: {skipped_then_applied}; scale raised again after its low: {raised_again})", ""]
    cases = json.loads((out / "gpu-bench.json").read_text())["ours"]
    failed = sorted(name for name, r in cases.items() if "error" in r)
    lines += ["`tools/bench.py --cases gpu:attention,gpu:generate` (medians):", "",
              (out / "gpu-bench.md").read_text().rstrip(), ""]
    if failed:
        lines += [f"Failed benchmark cases: {', '.join(failed)}", ""]
    return "\n".join(lines), recovered and finite and not failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder gpu_check.sh wrote its JSON files to")
    p.add_argument("--steps", type=int, default=30, help="training steps each precision ran")
    p.add_argument("--append", type=Path, default=None, help="markdown file to append the report to")
    args = p.parse_args(argv)
    text, ok = report(args.out, args.steps)
    print(text)
    if args.append is not None:
        previous = args.append.read_text() if args.append.exists() else ""
        args.append.write_text(previous + ("\n" if previous and not previous.endswith("\n") else "") + text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
