"""How well a reward model predicts held-out comparisons, beside two references (Stiennon et al. 2020, sec. 4.3):

    reward accuracy      share of the held-out decided judgements whose winner the reward model scores higher
    reranker accuracy    the same for the raw reranker's cosine similarity of image and prompt (the baseline)
    noise ceiling        how often the training rater agrees with a reference rater (the noiseless simulated
                         one) on the same held-out pairs: a reward model that knew the truth would score that

Each accuracy is also given against the reference rater's labels. With `--by-cause` (shapes stores), each is
split by what decided a pair for the detector, beside the accuracy of a scorer that knows correctness exactly.
With `--sampled-by MODEL_ID`, only the pairs of that model's samples count: after fine-tuning, the reward model's
accuracy on the policy's own samples (sampled into the store, rated) says whether it still ranks what the policy
draws, which Stiennon et al. retrained it for in each round.
The held-out pairs are those of training (the same `val_fraction` and `split_seed`, read from the reward run's
run.json unless given).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dalle.feedback.data import (
    Selection,
    agreement,
    images_of,
    load_samples,
    pairwise_accuracy,
    png_rgb,
    select,
)
from dalle.feedback.store import Judgement, Store


@torch.no_grad()
def reward_scores(model: Any, store: Store, tokenizer: Any, ids: list[int], batch_size: int = 64) -> dict[int, float]:
    """Normalised rewards of samples `ids` under a RewardModel."""
    cfg, device = model.config, next(model.parameters()).device
    table = load_samples(store, ids, tokenizer, cfg.text_seq_len, pixels=cfg.reads_pixels)
    rows = torch.tensor([table.row[s] for s in ids], dtype=torch.long)
    out = []
    for chunk in rows.split(batch_size):
        image = images_of(table, chunk, pixels=cfg.reads_pixels).to(device)
        if cfg.reads_pixels and image.shape[-1] != cfg.reranker.image_size:
            s = cfg.reranker.image_size
            image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        out += model(table.text[chunk].to(device), image).float().tolist()
    return dict(zip(ids, out))


@torch.no_grad()
def reranker_scores(reranker: Any, tokenizer: Any, store: Store, ids: list[int], batch_size: int = 64
                    ) -> dict[int, float]:
    """The raw reranker's cosine similarity of each sample's image with its prompt."""
    from dalle.reranker.score import rerank

    table = load_samples(store, ids, tokenizer, reranker.config.text_seq_len, pixels=True)
    out: dict[int, float] = {}
    for prompt in sorted(set(table.prompts)):
        mine = [s for s in ids if table.prompts[table.row[s]] == prompt]
        images = images_of(table, torch.tensor([table.row[s] for s in mine]), pixels=True)
        out.update(zip(mine, rerank(reranker, tokenizer, prompt, images, batch_size=batch_size).tolist()))
    return out


def figures(val: list[Judgement], reference: list[Judgement], scores: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Accuracy of each scorer on `val` (and against `reference`), and the noise ceiling."""
    out: dict[str, Any] = {"held_out_decided": sum(not j.tie for j in val)}
    for name, s in scores.items():
        out[f"{name}_accuracy"] = pairwise_accuracy(s, val)[0]
        if reference:
            out[f"{name}_accuracy_vs_reference"] = pairwise_accuracy(s, reference)[0]
    if reference:
        out["noise_ceiling"], out["ceiling_pairs"] = agreement(val, reference)
    return out


def by_cause(store: Store, val: list[Judgement], scores: dict[str, dict[int, float]]) -> dict[str, Any]:
    """For shapes prompts judged by the simulated rater: each scorer's accuracy on the held-out pairs split by what
    decided them for the detector (`raters.CAUSES`), and the accuracy of a scorer that knows each image's
    correctness exactly (all correct, then checks right) but not the detector's confidence, the most a reward
    model can reach from correctness alone. Against `val`'s labels; raises ValueError for a non-shapes prompt."""
    from dalle.feedback.raters import CAUSES, correctness, deciding, shapes_prompt

    found: dict[int, tuple[int, int, float]] = {}
    cause: dict[int, str | None] = {}
    for pair_id in sorted({j.pair_id for j in val}):
        pair = store.pair(pair_id)
        prompt = shapes_prompt(pair["split"], pair["prompt"])
        for s in (pair["a_id"], pair["b_id"]):
            found[s] = correctness(prompt, png_rgb(store.png(s)))
        cause[pair_id] = deciding(found[pair["a_id"]], found[pair["b_id"]])
    knows = {s: 1000.0 * c[0] + c[1] for s, c in found.items()}  # lexicographic: all correct, then checks
    out: dict[str, Any] = {"correctness_scorer_accuracy": pairwise_accuracy(knows, val)[0]}
    for c in CAUSES:
        mine = [j for j in val if cause[j.pair_id] == c and not j.tie]
        out[f"decided_by_{c}"] = len(mine)
        for name, s in scores.items():
            out[f"{name}_accuracy_{c}"] = pairwise_accuracy(s, mine)[0]
    return out


def _training_split(reward: str | None) -> dict[str, Any]:
    """The held-out split a reward run trained with (its run.json's objective), so evaluation uses the same."""
    for folder in ([Path(reward), *Path(reward).parents[:2]] if reward else []):
        if (folder / "run.json").is_file():
            objective = json.loads((folder / "run.json").read_text()).get("objective", {})
            return {k: objective[k] for k in ("val_fraction", "split_seed") if k in objective}
    return {}


def evaluate_command(store: Store, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """What `tools/train_feedback.py evaluate` prints."""
    from dalle.checkpoint import load_pretrained, resolve_model_dir
    from dalle.pipeline import DEFAULT_MODEL, load_reranker
    from dalle.tokenizer import TextTokenizer

    trained = _training_split(args.reward)
    fraction = args.val_fraction if args.val_fraction is not None else trained.get("val_fraction", 0.2)
    seed = args.split_seed if args.split_seed is not None else trained.get("split_seed", 0)
    try:
        sel = Selection(rater=args.rater, val_fraction=fraction, split_seed=seed)
    except ValueError as e:
        raise SystemExit(f"--val-fraction: {e}") from None
    try:
        _, val = select(store, sel)
    except ValueError as e:
        raise SystemExit(f"cannot evaluate: {e}") from None
    if args.sampled_by:
        try:
            mine = set(store.samples_of(args.sampled_by))
        except ValueError as e:
            raise SystemExit(f"--sampled-by: {e}") from None
        val = [j for j in val if j.winner_id in mine and j.loser_id in mine]
        if not val:
            raise SystemExit(f"--sampled-by: no held-out judgement compares two of {args.sampled_by}'s samples")
    val_pairs = {j.pair_id for j in val}
    reference = [j for j in store.judgements() if args.reference_rater and j.rater == args.reference_rater
                 and j.pair_id in val_pairs]
    if args.reference_rater and not reference:
        raise SystemExit(f"rater {args.reference_rater!r} judged none of the {len(val_pairs)} held-out pairs")
    ids = sorted({s for j in val + reference for s in (j.winner_id, j.loser_id)})
    scores: dict[str, dict[int, float]] = {}
    try:
        if args.reward:
            model = load_pretrained(args.reward, expect="reward", map_location=device)
            tokenizer = TextTokenizer.from_file(resolve_model_dir(args.reward) / "tokenizer.json")
            scores["reward"] = reward_scores(model, store, tokenizer, ids)
        reranker, tokenizer, _ = load_reranker(args.reranker or f"{DEFAULT_MODEL}/reranker", device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load a model: {e}") from None
    scores["reranker"] = reranker_scores(reranker, tokenizer, store, ids)
    out = figures(val, reference, scores)
    if args.by_cause:
        try:
            out.update(by_cause(store, val, scores))
        except ValueError as e:
            raise SystemExit(f"--by-cause: {e}") from None
    return out
