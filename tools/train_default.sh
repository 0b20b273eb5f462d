#!/usr/bin/env bash
# Rebuild the default model that ships in dalle/default_model/ from nothing but this repository, with the
# same machinery a user runs on their own images (tools/train_all.py) and the shapes recipe
# (configs/{dvae,dalle,reranker}/shapes.yaml): shapes tokenizer (captions and questions) -> dVAE ->
# pre-tokenised codes -> transformer (draws, captions, answers) -> reranker -> fp16 bundle -> evaluation and report.
#
#     bash tools/train_default.sh            # WORK=runs/default OUT=dalle/default_model THREADS=0 (auto)
#
# Every stage is skipped when its output is complete and resumes from its last checkpoint when it is not,
# so running the script again after a crash continues where it stopped. The bundle replaces OUT only when
# every stage has finished. docs/default-model.md has the time each stage took on a 2-core CPU
# (THREADS=2) and WORK/report.md the build's own figures.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-0}
WORK=${WORK:-runs/default}
OUT=${OUT:-dalle/default_model}
SECONDS=0

python tools/train_all.py --data shapes --recipe shapes --out "$WORK" --dtype fp16 --threads "$THREADS" \
    --prompt "a red circle above a blue square" --prompt "a small green star" \
    --prompt "a yellow triangle to the right of a purple cross"

rm -rf "$OUT.new"
cp -r "$WORK/model" "$OUT.new"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
printf '\n%s now holds the bundle of %s (report: %s/report.md); done in %d min %d s\n' \
    "$OUT" "$WORK" "$WORK" $((SECONDS / 60)) $((SECONDS % 60))
