#!/usr/bin/env bash
# Rebuild the default model that ships in dalle/default_model/ from nothing but this repository:
# shapes tokenizer -> dVAE -> pre-tokenised codes -> transformer -> reranker -> bundle.
#
#     bash tools/train_default.sh            # THREADS=2 and WORK=runs/default by default
#
# Every stage is skipped when its output is complete and resumes from its last checkpoint when it is
# not, so running the script again after a crash continues where it stopped. docs/default-model.md
# has the time each stage took on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
WORK=${WORK:-runs/default}
OUT=${OUT:-dalle/default_model}
mkdir -p "$WORK"
stage() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
SECONDS=0

stage "BPE tokenizer on shapes captions"
[ -f "$WORK/tokenizer.json" ] || python tools/train_bpe.py --shapes 100000 --vocab 16384 --out "$WORK/tokenizer.json"

stage "dVAE (configs/dvae/shapes.yaml)"
python tools/train_dvae.py --config configs/dvae/shapes.yaml --out "$WORK/dvae" --threads "$THREADS"

stage "pre-tokenise images with the dVAE"
[ -f "$WORK/tok-train/meta.json" ] || python tools/pretokenize.py --dvae "$WORK/dvae" --source shapes \
    --split train --n 40000 --out "$WORK/tok-train" --device cpu
[ -f "$WORK/tok-val/meta.json" ] || python tools/pretokenize.py --dvae "$WORK/dvae" --source shapes \
    --split val --n 1024 --out "$WORK/tok-val" --device cpu

stage "transformer (configs/dalle/shapes.yaml)"
python tools/train_dalle.py --config configs/dalle/shapes.yaml --out "$WORK/dalle" --threads "$THREADS" \
    --set data.path="$WORK/tok-train" --set data.val_path="$WORK/tok-val" \
    --set inputs.tokenizer="$WORK/tokenizer.json" --set inputs.dvae="$WORK/dvae"

stage "reranker (configs/reranker/shapes.yaml)"
python tools/train_reranker.py --config configs/reranker/shapes.yaml --out "$WORK/reranker" --threads "$THREADS" \
    --set inputs.tokenizer="$WORK/tokenizer.json"

stage "bundle into $OUT"
python tools/bundle.py --dalle "$WORK/dalle" --reranker "$WORK/reranker" --out "$OUT"
printf '\ndone in %d min %d s\n' $((SECONDS / 60)) $((SECONDS % 60))
