"""Simulated raters for experiments and CI: a rater that prefers the image the shapes detector judges
more correct for the prompt, with a configurable rate of flipped labels.

The detector's verdict on each image gives (everything right, number of checks right: each mentioned
attribute of each object, the count, the relation); the image with more is preferred, equal ones go to
the more confident detection (the mean template IoU of its shapes), and equal again is a tie. With
`noise` = p, each decided label is flipped with probability p, so the noisy rater agrees with the
noiseless one on a share 1 - p of the decided pairs (Stiennon et al.'s labellers agreed with each other
72-77% of the time: p = 0.25 sits inside that range).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from dalle.evaluation.compositional import Prompt, shapes_prompts, to_uint8
from dalle.evaluation.detect import compare, detect

SPLITS = ("train", "val", "zeroshot")
SEARCHED = (2000, 20000)  # prompts of a split searched for a caption's scene: most stores use the first few


def detect_correctness(prompt: Prompt, image: torch.Tensor | np.ndarray) -> tuple[int, int, float]:
    """(all correct, checks right, detection confidence) of one image for its prompt; larger is better."""
    found = detect(to_uint8(image))
    verdict = compare(prompt.sample.scene, prompt.sample.mentions, found)
    checks = sum(sum(v) for v in verdict.attributes.values()) + int(verdict.count) + int(bool(verdict.relation))
    objects = found[: len(prompt.sample.scene.objects)]
    confidence = float(np.mean([d.shape_iou for d in objects])) if objects else 0.0
    return int(verdict.all_correct), checks, confidence


correctness = detect_correctness  # what a rater judges by (tests may memoise it)

# What tells two images apart for the rater, in the order it looks: one is all correct and the other not, then
# more checks right, then only the detector's confidence (how cleanly the shapes are drawn).
CAUSES = ("all_correct", "checks", "confidence")


def deciding(a: tuple[int, int, float], b: tuple[int, int, float]) -> str | None:
    """The first of CAUSES on which two `detect_correctness` results differ; None when they are equal (a tie)."""
    return next((cause for cause, x, y in zip(CAUSES, a, b) if x != y), None)


@lru_cache(maxsize=4)
def _split_prompts(split: str, n: int) -> dict[str, Prompt]:
    out: dict[str, Prompt] = {}
    for p in shapes_prompts(split, n):
        out.setdefault(p.caption, p)
    return out


def shapes_prompt(split: str, caption: str) -> Prompt:
    """The scene behind a shapes caption of `split` (the rater needs the scene, the store keeps only the text),
    searched among the split's first 2,000 prompts, then its first 20,000 (5 s more). Raises ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not a shapes split {SPLITS}: the simulated rater judges shapes "
                         "prompts only")
    for n in SEARCHED:
        found = _split_prompts(split, n).get(caption)
        if found is not None:
            return found
    raise ValueError(f"prompt {caption!r} is not among the first {SEARCHED[-1]} of shapes {split}")


@dataclass
class SimulatedRater:
    name: str = "simulated"
    noise: float = 0.0  # probability of flipping a decided label (0.25 ~ human inter-rater agreement)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.noise <= 0.5:
            raise ValueError(f"noise must be in [0, 0.5] (above 0.5 the labels are mostly wrong), got {self.noise}")
        self._rng = random.Random(self.seed)

    def choose(self, prompt: Prompt, left: torch.Tensor | np.ndarray, right: torch.Tensor | np.ndarray) -> str:
        """"left", "right" or "tie" for the two images as shown."""
        a, b = correctness(prompt, left), correctness(prompt, right)
        if a == b:
            return "tie"
        choice = "left" if a > b else "right"
        if self._rng.random() < self.noise:
            choice = "right" if choice == "left" else "left"
        return choice


class ShapesGoldReward:
    """The shapes detector's verdict as a reward, `all_correct + 0.1 * checks right`, in place of a learned reward
    model: the gold reward of Gao et al. 2022's over-optimisation studies. A policy tuned against it and judged by
    the same detector shows what the fine-tuning method reaches when the reward is the truth, so how far a
    learned reward model holds it back; it is not a result of learning from feedback. The detector's
    confidence, which the simulated rater also weighs, is left out: the evaluation counts correctness only.

    Called with captions and decoded images (B, 3, H, W) in [0, 1]; each caption must be a shapes caption of
    one of `splits` (ValueError at construction, naming the first that is not)."""

    def __init__(self, captions: list[str], splits: tuple[str, ...] = ("train", "zeroshot")) -> None:
        self.prompts: dict[str, Prompt] = {}
        for caption in dict.fromkeys(captions):
            for split in splits:
                try:
                    self.prompts[caption] = shapes_prompt(split, caption)
                    break
                except ValueError:
                    continue
            else:
                raise ValueError(f"the gold reward judges shapes captions only: {caption!r} is not one of "
                                 f"shapes {', '.join(splits)}")

    def __call__(self, captions: list[str], images: torch.Tensor) -> torch.Tensor:
        return gold_rewards([self.prompts[caption] for caption in captions], images)


def gold_rewards(prompts: list[Prompt], images: torch.Tensor) -> torch.Tensor:
    """`ShapesGoldReward`'s score, all correct + 0.1 per check right, of images (B, 3, H, W) in [0, 1] for the
    shapes prompts whose scenes are at hand."""
    out = []
    for prompt, image in zip(prompts, images.float().cpu()):
        right, checks, _ = correctness(prompt, image)
        out.append(right + 0.1 * checks)
    return torch.tensor(out)
