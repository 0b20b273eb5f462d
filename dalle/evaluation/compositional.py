"""Compositional accuracy on shapes prompts: does each image show what its caption says?

`score_images` runs the detector on images made for shapes samples and `summarise` turns the verdicts
into the figures docs/evaluation.md reports: accuracy per attribute (over the objects whose caption
mentions it), the object count, the relation of two-object scenes, and the share of images where all
of it is right, overall and per object count. For the `zeroshot` split the held-out kind of each scene
("pair" or "triple") is broken out too, so failures can be attributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dalle.data.shapes import ATTRIBUTES, Sample, heldout_kinds, make_sample
from dalle.evaluation.detect import Verdict, compare, detect


@dataclass(frozen=True)
class Prompt:
    caption: str
    sample: Sample  # the scene the caption describes, and which attributes it mentions


def shapes_prompts(split: str, n: int, seed: int = 0, image_size: int = 64) -> list[Prompt]:
    """The captions of the first `n` samples of a shapes split, with their scenes."""
    out = []
    for i in range(n):
        s = make_sample(i, split, seed, image_size)
        out.append(Prompt(s.caption, s))
    return out


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] or (H, W, 3) uint8 -> (H, W, 3) uint8, quantised as a saved PNG is."""
    if isinstance(image, torch.Tensor):
        return (image.float().clamp(0, 1).permute(1, 2, 0).mul(255).add(0.5).floor()).to(torch.uint8).numpy()
    return np.asarray(image, dtype=np.uint8)


def score_images(prompts: Sequence[Prompt], images: Sequence[torch.Tensor | np.ndarray]) -> list[Verdict]:
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    return [compare(p.sample.scene, p.sample.mentions, detect(to_uint8(im))) for p, im in zip(prompts, images)]


def _figures(verdicts: Sequence[Verdict]) -> dict[str, float | int]:
    out: dict[str, float | int] = {"n": len(verdicts)}
    if not verdicts:
        return out
    for a in ATTRIBUTES:
        hits = [ok for v in verdicts for ok in v.attributes.get(a, [])]
        if hits:
            out[a] = float(np.mean(hits))
    relations = [v.relation for v in verdicts if v.relation is not None]
    if relations:
        out["relation"] = float(np.mean(relations))
    out["count"] = float(np.mean([v.count for v in verdicts]))
    out["all_correct"] = float(np.mean([v.all_correct for v in verdicts]))
    return out


def summarise(prompts: Sequence[Prompt], verdicts: Sequence[Verdict]) -> dict[str, dict[str, float | int]]:
    """{"all": figures, "1 object": ..., "2 objects": ..., "held-out pair": ..., "held-out layout": ...}"""
    groups: dict[str, list[Verdict]] = {"all": list(verdicts)}
    for p, v in zip(prompts, verdicts):
        k = len(p.sample.scene.objects)
        groups.setdefault(f"{k} object{'s' if k > 1 else ''}", []).append(v)
        for kind in sorted(heldout_kinds(p.sample.scene)):
            groups.setdefault({"pair": "held-out pair", "triple": "held-out layout"}[kind], []).append(v)
    return {name: _figures(vs) for name, vs in groups.items()}


def shape_accuracy_by_kind(prompts: Sequence[Prompt], verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Shape accuracy per "size shape" kind ("small star": 0.13, ...), over the objects whose caption
    mentions the shape: where a decoder loses detail, it loses it on small, pointed shapes first."""
    hits: dict[str, list[bool]] = {}
    for p, v in zip(prompts, verdicts):
        named = [o for o, m in zip(p.sample.scene.objects, p.sample.mentions) if "shape" in m]
        for o, ok in zip(named, v.attributes.get("shape", [])):
            hits.setdefault(f"{o.size} {o.shape}", []).append(ok)
    return {k: float(np.mean(hits[k])) for k in sorted(hits)}


def shape_confusion(prompts: Sequence[Prompt], verdicts: Sequence[Verdict]) -> dict[str, dict[str, int]]:
    """What each "size shape" kind was read as, over every object drawn: {"small cross": {"cross": 46,
    "diamond": 33}, ...}, most frequent first ("none": no detection). Says how a shape fails, where
    `shape_accuracy_by_kind` says how often."""
    counts: dict[str, dict[str, int]] = {}
    for p, v in zip(prompts, verdicts):
        for o, shape in zip(p.sample.scene.objects, v.read_as):
            row = counts.setdefault(f"{o.size} {o.shape}", {})
            row[shape or "none"] = row.get(shape or "none", 0) + 1
    return {k: dict(sorted(counts[k].items(), key=lambda kv: (-kv[1], kv[0]))) for k in sorted(counts)}
