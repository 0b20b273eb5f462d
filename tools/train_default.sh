#!/usr/bin/env bash
# Rebuild the default model that ships in dalle/default_model/ from nothing but this repository, with the
# same machinery a user runs on their own images (tools/train_all.py) and the shapes recipe
# (configs/{dvae,dalle,reranker}/shapes.yaml): shapes tokenizer (captions and questions) -> dVAE ->
# pre-tokenised codes -> transformer (draws, captions, answers) -> reranker -> fp16 bundle -> evaluation and
# report; then learning from feedback (tools/feedback_loop.py, docs/feedback.md): the supervised bundle's
# samples compared by the noiseless simulated rater -> a reward model that starts from the transformer's own
# reading -> GRPO against it -> the shipped bundle, with the GRPO transformer in place of the supervised one ->
# its evaluation.
#
#     bash tools/train_default.sh            # WORK=runs/default OUT=dalle/default_model THREADS=0 (auto)
#     SUPERVISED=DIR bash tools/train_default.sh   # skip the supervised build: start the feedback from DIR
#
# Every stage is skipped when its output is complete and resumes from its last checkpoint when it is not,
# so running the script again after a crash continues where it stopped. The bundle replaces OUT only when
# every stage has finished. docs/default-model.md has the time each stage took on a 2-core CPU
# (THREADS=2), WORK/report.md the supervised build's figures and WORK/feedback/eval and WORK/eval-shipped
# the shipped model's.
set -euo pipefail
case "$*" in  # settings come from the environment only: an argument is a question or a mistake
    "") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "train_default.sh takes no arguments (got: $*): set WORK, OUT, THREADS or SUPERVISED in the" \
            "environment (--help says more)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
THREADS=${THREADS:-0}
WORK=${WORK:-runs/default}
OUT=${OUT:-dalle/default_model}
SUPERVISED=${SUPERVISED:-}
SECONDS=0

if [ -z "$SUPERVISED" ]; then
    python tools/train_all.py --data shapes --recipe shapes --out "$WORK" --dtype fp16 --threads "$THREADS" \
        --prompt "a red circle above a blue square" --prompt "a small green star" \
        --prompt "a yellow triangle to the right of a purple cross"
    SUPERVISED="$WORK/model"
fi

# 2,000 train captions x 2 pairs; the reward model starts from the supervised transformer's own reading,
# w * log p(prompt | image) (reward-reader-shapes.yaml), and GRPO fine-tunes the transformer against it with the
# per-token KL penalty (grpo-reader-shapes.yaml); the evaluation (150 held-out prompts a split) compares the
# GRPO model with the supervised one and its best of 4 and 16, each also averaged over 8 draws a prompt (one
# image a prompt moves by 5 points).
python tools/feedback_loop.py --model "$SUPERVISED" --out "$WORK/feedback" --prompts 2000 --pairs-per-prompt 2 \
    --noise 0 --methods grpo --reward-config configs/feedback/reward-reader-shapes.yaml \
    --grpo-config configs/feedback/grpo-reader-shapes.yaml --eval-n 150 --best-of 4 16 --diversity 16 --judged 8 \
    --threads "$THREADS"

# The run's last checkpoint, not its checkpoints/best: the held-out reward that picks best moves between
# evaluations by more than the checkpoints differ (docs/feedback-experiments.md).
python tools/bundle.py --dalle "$WORK/feedback/grpo/checkpoints/step-0000200" --dvae "$SUPERVISED/dvae" \
    --reranker "$SUPERVISED/reranker" --out "$WORK/model-feedback" --overwrite
python tools/eval_feedback.py --sft "$SUPERVISED" --reward "$WORK/feedback/reward" --model "shipped=$WORK/model-feedback" \
    --exclude-store "$WORK/feedback/fb.db" --n 150 --best-of --diversity 16 --judged 8 --seed 0 --threads "$THREADS" \
    --out "$WORK/eval-shipped/feedback" --overwrite
python tools/eval_shapes.py --model "$WORK/model-feedback" --split train zeroshot --n 100 --candidates 1 8 32 \
    --cond-scale 1 3 --seed 0 --out "$WORK/eval-shipped/shapes" --overwrite --threads "$THREADS"
python tools/eval_captions.py --model "$WORK/model-feedback" --split train zeroshot --n 100 --prior-scale 0 2 \
    --caption-candidates 1 2 --candidates 1 8 32 --seed 0 --out "$WORK/eval-shipped/captions" --overwrite \
    --threads "$THREADS"

rm -rf "$OUT.new"
cp -r "$WORK/model-feedback" "$OUT.new"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
printf '\n%s now holds the bundle of %s (reports: %s/report.md, %s/feedback/eval, %s/eval-shipped); done in %d min %d s\n' \
    "$OUT" "$WORK" "$WORK" "$WORK" "$WORK" $((SECONDS / 60)) $((SECONDS % 60))
