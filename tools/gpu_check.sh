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
# Figures (tokens/s, MFU, peak memory, the scaler's record) are appended to docs/performance.md with
# the date and the card's name. Exit status 1 when a run fails or fp16 does not skip and recover.
#
#   tools/gpu_check.sh                # env: PYTHON, STEPS (30), OUT_DIR (a temporary directory); --help: this
set -euo pipefail
case "$*" in  # settings come from the environment; --help must not start a run on the GPU
    "") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh takes no arguments (got: $*): set PYTHON, STEPS or OUT_DIR in the environment" >&2; exit 2 ;;
esac
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
"$PY" tools/gpu_report.py "$OUT" --steps "$STEPS" --append docs/performance.md
