"""Schedules of dVAE training (paper appendix A.2): all pure functions of the step, so a resumed run
needs nothing but the step to continue exactly where it stopped."""

from __future__ import annotations

import math


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """Cosine interpolation from `start` at step 0 to `end` at `steps`, then held at `end`."""
    if steps <= 0 or step >= steps:
        return end
    t = max(step, 0) / steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def temperature(step: int, start: float = 1.0, end: float = 1 / 16, steps: int = 150_000) -> float:
    """Gumbel-softmax temperature: 1 -> 1/16 over the first 150k updates in the paper."""
    return cosine(step, start, end, steps)


def kl_weight(step: int, start: float = 0.0, end: float = 6.6, steps: int = 5_000) -> float:
    """KL weight beta: 0 -> 6.6 over the first 5k updates in the paper; the early low weight lets
    the codebook spread out before the prior pulls the posteriors together."""
    return cosine(step, start, end, steps)
