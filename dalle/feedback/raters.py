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

import numpy as np
import torch

from dalle.evaluation.compositional import Prompt, to_uint8
from dalle.evaluation.detect import compare, detect


def detect_correctness(prompt: Prompt, image: torch.Tensor | np.ndarray) -> tuple[int, int, float]:
    """(all correct, checks right, detection confidence) of one image for its prompt; larger is better."""
    found = detect(to_uint8(image))
    verdict = compare(prompt.sample.scene, prompt.sample.mentions, found)
    checks = sum(sum(v) for v in verdict.attributes.values()) + int(verdict.count) + int(bool(verdict.relation))
    objects = found[: len(prompt.sample.scene.objects)]
    confidence = float(np.mean([d.shape_iou for d in objects])) if objects else 0.0
    return int(verdict.all_correct), checks, confidence


correctness = detect_correctness  # what a rater judges by (tests may memoise it)


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
