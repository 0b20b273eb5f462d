"""Candidate pairs for people to compare: samples of a model for each prompt, two at a time, into the store.

Each sample keeps its image codes (what fine-tuning trains on), its PNG (what a rater sees), its seed and
its sampling settings, so any of them can be made again. For shapes prompts a pair is marked "gold" when
the detector says exactly one of its two images shows the prompt: raters' accuracy on gold pairs is then
measurable.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from dalle.evaluation.compositional import Prompt
from dalle.feedback.raters import correctness
from dalle.feedback.store import Store
from dalle.generation import sample_codes
from dalle.pipeline import Pipeline


def png_bytes(image: torch.Tensor) -> bytes:  # (3, H, W) in [0, 1]
    array = image.float().clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def add_pairs(pipe: Pipeline, store: Store, prompts: Sequence[str | Prompt], *, split: str = "", per_prompt: int = 1,
              seed: int = 0, batch_size: int = 16, progress: Callable[[int], None] | None = None,
              **settings: Any) -> list[int]:
    """Sample 2 x per_prompt images for each prompt and store them as per_prompt pairs. Shapes prompts
    (`Prompt`) get gold answers where the detector tells their two images apart. Returns the pair ids."""
    jobs = [(i, seed + k) for i in range(len(prompts)) for k in range(2 * per_prompt)]
    texts = [p.caption if isinstance(p, Prompt) else p for p in prompts]
    samples: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        codes, images = sample_codes(pipe, [texts[i] for i, _ in chunk], [s for _, s in chunk], **settings)
        for (i, s), c, image in zip(chunk, codes, images):
            prompt_id = store.prompt(texts[i], split)
            sid = store.add_sample(prompt_id, pipe.model_id, s, settings, c.tolist(), png_bytes(image))
            samples.setdefault(i, []).append((sid, image))
        if progress is not None:
            progress(len(chunk))
    pairs = []
    for i, made in sorted(samples.items()):
        for (a, image_a), (b, image_b) in zip(made[::2], made[1::2]):
            gold = _gold(prompts[i], image_a, image_b) if isinstance(prompts[i], Prompt) else None
            pairs.append(store.add_pair(a, b, gold))
    return pairs


def _gold(prompt: Prompt, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """"a" or "b" when the detector finds exactly one of the two images all correct, else None."""
    right_a, right_b = correctness(prompt, a)[0], correctness(prompt, b)[0]
    return None if right_a == right_b else ("a" if right_a else "b")
