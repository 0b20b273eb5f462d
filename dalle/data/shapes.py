"""Deterministic synthetic "shapes" captioned images for tests, the default model and zero-shot benchmarks.

This module owns the scene vocabulary, the scene sampler, the renderer, the caption templates, the
train/val/zeroshot split definition and a torch ``Dataset`` over it. It does no file I/O
(``tools/make_shapes.py`` writes files).

Scenes hold one or two objects (shape x colour x size) on a uniform background. Single objects have a
``position`` in :data:`POSITIONS`; two-object scenes have a ``relation`` of ``objects[0]`` to
``objects[1]`` in :data:`RELATIONS`. Every :class:`Sample` keeps its structured :class:`Scene` plus
``mentions`` (which attributes of each object the caption states), so metrics never parse captions.
Two-object captions always state the relation.

Held-out combinations (never in ``train``/``val``; ``zeroshot`` scenes contain exactly one of them):

* :data:`HELDOUT_PAIRS` -- 8 (colour, shape) pairs, each colour once and circle/triangle twice, so every
  colour and every shape still occurs in train with other partners::

      red square, orange star, yellow circle, green triangle,
      cyan cross, blue diamond, purple circle, pink triangle

* :data:`HELDOUT_TRIPLES` -- 4 (shape, relation, shape) layouts. A triple and its converse describe the
  same image ("circle left of square" == "square right of circle"), so both forms are held out::

      circle left of square, triangle above star, diamond right of cross, star below circle

A ``zeroshot`` scene is either pair-novel (one object uses a held-out pair; its layout is a train layout)
or triple-novel (held-out layout, all colour/shape pairs seen in train), so failures can be attributed;
:func:`heldout_kinds` says which. Sample ``i`` of split ``s`` with seed ``S`` is a pure function of
``(S, s, i)``: the rng seed is an integer mix of the three, never Python's salted ``hash()``.
"""

from __future__ import annotations

import json
import operator
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (245, 130, 15),
    "yellow": (240, 220, 20),
    "green": (30, 180, 40),
    "cyan": (20, 200, 220),
    "blue": (30, 60, 230),
    "purple": (140, 40, 210),
    "pink": (245, 80, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Bounding-box side as a fraction of the image side; 2 * 0.42 leaves room for a gap and margins.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.42}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "val", "zeroshot")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "square"),
    ("orange", "star"),
    ("yellow", "circle"),
    ("green", "triangle"),
    ("cyan", "cross"),
    ("blue", "diamond"),
    ("purple", "circle"),
    ("pink", "triangle"),
)
HELDOUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("circle", "left of", "square"),
    ("triangle", "above", "star"),
    ("diamond", "right of", "cross"),
    ("star", "below", "circle"),
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS
)

CONVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_HELDOUT_PAIR_SET = frozenset(HELDOUT_PAIRS)
_HELDOUT_TRIPLE_SET = frozenset(HELDOUT_TRIPLES) | {(b, CONVERSE[r], a) for a, r, b in HELDOUT_TRIPLES}
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_SUPERSAMPLE = 4
_MASK64 = (1 << 64) - 1

Mentions = tuple[tuple[str, ...], ...]  # per object, attribute names (subset of ATTRIBUTES) in the caption


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str | None  # only for single-object scenes
    cx: float  # centre in output pixels; pixel i spans [i, i + 1)
    cy: float
    extent: int  # side of the square bounding box in output pixels

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        h = self.extent / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "cx": self.cx,
            "cy": self.cy,
            "extent": self.extent,
        }


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    relation: str | None  # relation of objects[0] to objects[1]; None for single-object scenes
    background: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "relation": self.relation,
            "background": list(self.background),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        # Extra keys (e.g. "mentions" in a sample record) are ignored so records parse directly.
        objects = tuple(
            ShapeObject(
                o["shape"],
                o["colour"],
                o["size"],
                o["position"],
                float(o["cx"]),
                float(o["cy"]),
                int(o["extent"]),
            )
            for o in d["objects"]
        )
        bg = tuple(int(v) for v in d["background"])
        if len(bg) != 3:
            raise ValueError(f"background must have 3 channels, got {d['background']!r}")
        return cls(objects, d["relation"], (bg[0], bg[1], bg[2]))


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    scene: Scene
    mentions: Mentions

    def to_dict(self) -> dict[str, Any]:
        """Scene record plus mentions: the ``key.json`` payload and the dataset's ``"scene"`` string."""
        return {**self.scene.to_dict(), "mentions": [list(m) for m in self.mentions]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def heldout_kinds(scene: Scene) -> frozenset[str]:
    """Which held-out combinations ``scene`` uses: a subset of {"pair", "triple"} (empty for train scenes)."""
    kinds = set()
    if any((o.colour, o.shape) in _HELDOUT_PAIR_SET for o in scene.objects):
        kinds.add("pair")
    if scene.relation is not None and len(scene.objects) == 2:
        a, b = scene.objects
        if (a.shape, scene.relation, b.shape) in _HELDOUT_TRIPLE_SET:
            kinds.add("triple")
    return frozenset(kinds)


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16 so small objects stay legible, got {image_size!r}")


def _check_background(background: tuple[int, int, int] | None, grey_range: tuple[int, int]) -> None:
    if background is not None and (len(background) != 3 or not all(0 <= int(v) <= 255 for v in background)):
        raise ValueError(f"background must be 3 ints in [0, 255], got {background!r}")
    lo, hi = grey_range
    if not 0 <= lo <= hi <= 255:
        raise ValueError(f"grey_range must satisfy 0 <= lo <= hi <= 255, got {grey_range!r}")


def _rng_for(seed: int, split: str, index: int) -> random.Random:
    # splitmix64 over (seed, split id, index): stable across processes and platforms.
    x = 0
    for v in (seed, _SPLIT_IDS[split], index):
        x = ((x ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return random.Random(x)


def _uniform_q(rng: random.Random, lo: float, hi: float) -> float:
    """Uniform on the quarter-pixel grid (the supersampling grid) within [lo, hi]."""
    a, b = int(np.ceil(lo * _SUPERSAMPLE)), int(np.floor(hi * _SUPERSAMPLE))
    if a > b:  # interval narrower than the grid: its midpoint is the only sensible choice
        return round((lo + hi) / 2 * _SUPERSAMPLE) / _SUPERSAMPLE
    return rng.randint(a, b) / _SUPERSAMPLE


def _extent(size: str, image_size: int) -> int:
    return round(SIZES[size] * image_size)


def _place_single(rng: random.Random, e: int, position: str, n: int) -> tuple[float, float]:
    m = n / 64
    lo, hi = m + e / 2, n - m - e / 2  # keeps the bounding box inside the image
    mid, jit = n / 2, 0.1 * n
    if position == "centre":
        return _uniform_q(rng, mid - 0.05 * n, mid + 0.05 * n), _uniform_q(
            rng, mid - 0.05 * n, mid + 0.05 * n
        )
    # Main axis: centre within 35% of the side from its edge, so it is clearly off-centre; other axis jittered.
    main = (
        _uniform_q(rng, lo, max(lo, 0.35 * n))
        if position in ("left", "top")
        else _uniform_q(rng, min(hi, 0.65 * n), hi)
    )
    other = _uniform_q(rng, max(lo, mid - jit), min(hi, mid + jit))
    return (main, other) if position in ("left", "right") else (other, main)


def _place_pair(
    rng: random.Random, ea: int, eb: int, relation: str, n: int
) -> tuple[tuple[float, float], ...]:
    m, gap = n / 64, n / 32
    # Along the relation axis the boxes are separated (so they never overlap); across it the offset is at
    # most a quarter of the separation, so the relation is unambiguous.
    d = _uniform_q(rng, (ea + eb) / 2 + gap, n - 2 * m - (ea + eb) / 2)
    first_is_low = relation in ("left of", "above")  # low coordinate = left / top
    e_low, e_high = (ea, eb) if first_is_low else (eb, ea)
    p_low = _uniform_q(rng, m + e_low / 2, n - m - e_high / 2 - d)
    p_high = p_low + d
    lo, hi = m + max(ea, eb) / 2, n - m - max(ea, eb) / 2
    q_low = _uniform_q(rng, lo, hi)
    q_high = _uniform_q(rng, max(m + e_high / 2, q_low - d / 4), min(n - m - e_high / 2, q_low + d / 4))
    low, high = (p_low, q_low), (p_high, q_high)
    if relation in ("above", "below"):
        low, high = (q_low, p_low), (q_high, p_high)
    return (low, high) if first_is_low else (high, low)


def _pick_pair(rng: random.Random, heldout: bool) -> tuple[str, str]:
    return rng.choice(HELDOUT_PAIRS if heldout else TRAIN_PAIRS)


def sample_scene(
    rng: random.Random,
    split: str,
    *,
    image_size: int = 64,
    background: tuple[int, int, int] | None = None,
    grey_range: tuple[int, int] = (64, 224),
) -> Scene:
    """Draw a scene for ``split``; ``background`` fixes the RGB background, else a grey from ``grey_range``."""
    _check_split(split)
    _check_image_size(image_size)
    _check_background(background, grey_range)
    n = image_size
    if background is None:
        g = rng.randint(*grey_range)
        bg = (g, g, g)
    else:
        bg = (int(background[0]), int(background[1]), int(background[2]))
    if split == "zeroshot":
        mode = rng.choice(("pair_single", "pair_double", "triple"))
    else:
        mode = rng.choice(("single", "double"))

    if mode in ("single", "pair_single"):
        colour, shape = _pick_pair(rng, heldout=mode == "pair_single")
        size, position = rng.choice(tuple(SIZES)), rng.choice(POSITIONS)
        e = _extent(size, n)
        cx, cy = _place_single(rng, e, position, n)
        return Scene((ShapeObject(shape, colour, size, position, cx, cy, e),), None, bg)

    while True:  # rejection keeps each split's distribution uniform over its allowed combinations
        if mode == "triple":
            sa, rel, sb = rng.choice(HELDOUT_TRIPLES)
            if rng.random() < 0.5:
                sa, rel, sb = sb, CONVERSE[rel], sa
            ca = rng.choice([c for c, s in TRAIN_PAIRS if s == sa])
            cb = rng.choice([c for c, s in TRAIN_PAIRS if s == sb])
        else:
            novel = rng.randrange(2) if mode == "pair_double" else -1
            ca, sa = _pick_pair(rng, heldout=novel == 0)
            cb, sb = _pick_pair(rng, heldout=novel == 1)
            rel = rng.choice(RELATIONS)
            # Distinct objects keep detector matching well defined; the layout must be a train layout.
            if (ca, sa) == (cb, sb) or (sa, rel, sb) in _HELDOUT_TRIPLE_SET:
                continue
        break
    size_a, size_b = rng.choice(tuple(SIZES)), rng.choice(tuple(SIZES))
    ea, eb = _extent(size_a, n), _extent(size_b, n)
    (ax, ay), (bx, by) = _place_pair(rng, ea, eb, rel, n)
    return Scene(
        (ShapeObject(sa, ca, size_a, None, ax, ay, ea), ShapeObject(sb, cb, size_b, None, bx, by, eb)),
        rel,
        bg,
    )


def _star(cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    # Fat 5-pointed star (inner/outer 0.5) so small stars keep a solid centre; shifted down to centre its box.
    pts = []
    shift = h * (1 - np.cos(np.pi / 5)) / 2
    for k in range(10):
        r = h if k % 2 == 0 else 0.5 * h
        a = -np.pi / 2 + k * np.pi / 5
        pts.append((cx + r * float(np.cos(a)), cy + shift + r * float(np.sin(a))))
    return pts


def _draw(draw: ImageDraw.ImageDraw, o: ShapeObject, s: int) -> None:
    cx, cy, h = o.cx * s, o.cy * s, o.extent * s / 2
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif o.shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif o.shape == "star":
        draw.polygon(_star(cx, cy, h), fill=fill)
    elif o.shape == "cross":
        t = h / 3  # arm half-thickness: arms are a third of the box wide
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; expected one of {list(SHAPES)}")


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Anti-aliased RGB rendering: drawn at 4x and box-downsampled, so interior pixels are exact palette colours."""
    _check_image_size(image_size)
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, _SUPERSAMPLE)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# An object as `_describe` writes it (size, colour and shape captured), and make_caption's two-object template
OBJECT_PATTERN = rf"an? (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_PHRASE_RELATIONS = {phrase: rel for rel, phrase in _RELATION_PHRASES.items()}
_TWO_OBJECTS = re.compile(rf"({OBJECT_PATTERN}) ({'|'.join(_PHRASE_RELATIONS)}) ({OBJECT_PATTERN})")


def _describe(o: ShapeObject, with_size: bool) -> str:
    phrase = f"{o.size} {o.colour} {o.shape}" if with_size else f"{o.colour} {o.shape}"
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase  # "an orange circle"


def make_caption(scene: Scene, rng: random.Random) -> tuple[str, Mentions]:
    """Pick a caption template; returns the caption and, per object, the attributes it mentions."""
    if len(scene.objects) == 1:
        (o,) = scene.objects
        with_size, with_pos = rng.random() < 0.5, rng.random() < 0.5
        text = _describe(o, with_size)
        if with_pos and o.position is not None:
            text += " " + _POSITION_PHRASES[o.position]
        names = {"colour", "shape"} | ({"size"} if with_size else set())
        names |= {"position"} if with_pos and o.position is not None else set()
        return text, (tuple(a for a in ATTRIBUTES if a in names),)
    if len(scene.objects) != 2 or scene.relation not in _RELATION_PHRASES:
        raise ValueError(f"scene needs 1 object, or 2 objects and a relation in {list(RELATIONS)}")
    a, b = scene.objects
    with_size = rng.random() < 0.5
    text = f"{_describe(a, with_size)} {_RELATION_PHRASES[scene.relation]} {_describe(b, with_size)}"
    m = ("colour", "shape", "size") if with_size else ("colour", "shape")
    return text, (m, m)


def converse_caption(caption: str) -> str | None:
    """A two-object caption of the shapes grammar with its objects named the other way round ("a red circle
    to the left of a blue square" -> "a blue square to the right of a red circle", the same picture); None
    for any other text."""
    m = _TWO_OBJECTS.fullmatch(caption)
    if m is None:
        return None
    first, phrase, second = m.group(1, 5, 6)  # groups 2-4 and 7-9 are each object's words
    return f"{second} {_RELATION_PHRASES[CONVERSE[_PHRASE_RELATIONS[phrase]]]} {first}"


def sample_key(index: int, split: str = "train", seed: int = 0) -> str:
    """Webdataset-safe key (no dots) naming sample ``index`` of ``split`` with ``seed``."""
    return f"shapes-{split}-s{seed}-{index:08d}"


def make_sample(
    index: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 64,
    *,
    background: tuple[int, int, int] | None = None,
    grey_range: tuple[int, int] = (64, 224),
) -> Sample:
    """Sample ``index`` of ``split``: a pure function of its arguments (same inputs, same pixels and caption)."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_split(split)
    rng = _rng_for(seed, split, index)
    scene = sample_scene(rng, split, image_size=image_size, background=background, grey_range=grey_range)
    caption, mentions = make_caption(scene, rng)
    return Sample(render(scene, image_size), caption, scene, mentions)


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``size`` samples; items use the project's reader format.

    Items: ``{"image": float (3, H, W) in [0, 1], "caption": str, "scene": Sample.to_json(), "key": str}``.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        seed: int = 0,
        image_size: int = 64,
        *,
        background: tuple[int, int, int] | None = None,
        grey_range: tuple[int, int] = (64, 224),
    ) -> None:
        _check_split(split)
        _check_image_size(image_size)
        _check_background(background, grey_range)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size (number of samples) must be a positive int, got {size!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.background, self.grey_range = background, grey_range

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)  # samplers may hand over numpy integers
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for ShapesDataset of size {self.size}")
        i %= self.size
        s = make_sample(
            i, self.split, self.seed, self.image_size, background=self.background, grey_range=self.grey_range
        )
        image = torch.from_numpy(np.asarray(s.image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return {
            "image": image,
            "caption": s.caption,
            "scene": s.to_json(),
            "key": sample_key(i, self.split, self.seed),
        }
