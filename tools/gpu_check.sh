#!/usr/bin/env bash
# The GPU check of the scaled-up training path, under 5 minutes on one H100 or H200:
#   1. the card's bf16 matmul peak, measured (8192^3 GEMMs), the yardstick for MFU;
#   2. bf16 training of configs/dalle/bench-300m.yaml (~300M parameters, 256 + 1024 = 1280 tokens) on
#      synthetic tokens for 30 steps with DeepSpeed ZeRO-2, through the same engine as tools/train_dalle.py;
#   3. the same in fp16 with DeepSpeed's dynamic loss scaling started at 2^24, so it must overflow, skip
#      steps, lower the scale until steps apply again, and raise it after 5 clean steps (recovery).
#   4. FlexAttention block-sparse vs dense SDPA for the row, column and conv masks at 1280 tokens
#      (forward + backward, bf16), and cached generation of 16 images at 256 + 1024 tokens with the
#      bench-300m model in bf16 (tools/bench.py, cases gpu:attention and gpu:generate).
# Figures (tokens/s, MFU, peak memory, the scaler's record) are appended to benchmarks/RESULTS.md with
# the date and the card's name. Exit status 1 when a run fails or fp16 does not skip and recover.
#
#   tools/gpu_check.sh                # env: PYTHON, STEPS (30), OUT_DIR (a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-30}
OUT=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT" benchmarks
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch-extensions}
port=$((29500 + RANDOM % 2000))

echo "== bf16 matmul peak"
"$PY" - "$OUT/peak.json" <<'PYEOF'
import json, sys, torch
n, iters = 8192, 50
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(10):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize()
start.record()
for _ in range(iters):
    a @ b
end.record()
torch.cuda.synchronize()
tflops = 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12
json.dump({"tflops": tflops, "card": torch.cuda.get_device_name()}, open(sys.argv[1], "w"))
print(f"{tflops:.0f} TFLOP/s on {torch.cuda.get_device_name()}")
PYEOF

# fp16 from a scale of 2^24 (certain to overflow), window 5 so the scale is raised again within the run.
"$PY" - "$OUT/zero2_fp16_check.json" <<'PYEOF'
import json, sys
ds = json.load(open("configs/deepspeed/zero2.json"))
ds["fp16"] = {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 24, "loss_scale_window": 5,
              "hysteresis": 1, "min_loss_scale": 1}
json.dump(ds, open(sys.argv[1], "w"), indent=2)
PYEOF

train() {  # precision, DeepSpeed JSON
    echo "== $1 training, ZeRO-2, $STEPS steps"
    port=$((port + 1))
    timeout 170 deepspeed --num_gpus 1 --master_port "$port" tools/bench_train.py \
        --config configs/dalle/bench-300m.yaml --out "$OUT/run-$1" --json "$OUT/$1.json" --no-progress \
        --deepspeed "$2" --set "train.precision=$1" --set "train.steps=$STEPS"
}
train bf16 configs/deepspeed/zero2.json
train fp16 "$OUT/zero2_fp16_check.json"

echo "== attention and generation"
timeout 240 "$PY" tools/bench.py --cases gpu:attention,gpu:generate --max-wait 0 --json "$OUT/gpu-bench.json" \
    --markdown "$OUT/gpu-bench.md"

echo "== report"
"$PY" - "$OUT" "$STEPS" <<'PYEOF'
import datetime, json, math, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
peak = json.loads((out / "peak.json").read_text())
runs = {p: json.loads((out / f"{p}.json").read_text()) for p in ("bf16", "fp16")}
fp16 = runs["fp16"]
scales = fp16["loss_scales"]
low = scales.index(min(scales)) if scales else 0
skipped_then_applied = fp16["overflow_steps"] > 0 and fp16["applied_steps"] > 0
raised_again = any(s > scales[low] for s in scales[low + 1:])
finite = all(math.isfinite(r["last_loss"] or math.nan) for r in runs.values())
ok = skipped_then_applied and raised_again and finite
lines = [f"## GPU check, {datetime.date.today()}, {peak['card']}", "",
         f"`tools/gpu_check.sh`: configs/dalle/bench-300m.yaml ({runs['bf16']['seq_len']} tokens per sample, "
         f"batch {runs['bf16']['effective_batch']}), synthetic tokens, {steps} steps, DeepSpeed ZeRO-2 on one GPU; "
         f"median over the steps after the 10th. MFU = tokens/s x {runs['bf16']['model_flops_per_token']:.3g} "
         f"model FLOPs per token / the measured bf16 matmul peak of {peak['tflops']:.0f} TFLOP/s.", "",
         "| precision | tokens/s | samples/s | MFU | peak memory | steps applied | overflow steps | loss first -> last |",
         "|---|---|---|---|---|---|---|---|"]
for name, r in runs.items():
    mfu = r["tokens_per_s"] * r["model_flops_per_token"] / (peak["tflops"] * 1e12)
    lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:.1f} | {mfu:.1%} | "
                 f"{r.get('peak_memory_gib', 0):.1f} GiB | {r['applied_steps']} | {r['overflow_steps']} | "
                 f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
lines += ["", f"fp16 loss scale per step: {' '.join(f'2^{math.log2(s):.0f}' for s in scales)}",
          f"fp16 overflow steps skipped and recovered: {'yes' if ok else 'NO'} "
          f"(skips then applied steps: {skipped_then_applied}; scale raised again after its low: {raised_again})", ""]
gpu = json.loads((out / "gpu-bench.json").read_text())["ours"]
lines += ["`tools/bench.py --cases gpu:attention,gpu:generate` (medians):", "",
          (out / "gpu-bench.md").read_text(), ""]
ok = ok and all("error" not in r for r in gpu.values())
text = "\n".join(lines)
print(text)
results = Path("benchmarks/RESULTS.md")
head = "" if results.exists() else "# Benchmarks\n\nAppended by the scripts that measure them; newest last.\n\n"
results.write_text((results.read_text() if results.exists() else head) + text + "\n")
sys.exit(0 if ok else 1)
PYEOF
