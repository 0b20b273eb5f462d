"""Judging generated text against a shapes scene: captions by the caption grammar, answers by exact match.

A caption is read back with the grammar `dalle.data.shapes.make_caption` writes ("a large red circle on
the left", "a blue square above an orange star"), then compared with the scene it describes: every
attribute it states must be true, and it must name every object with its colour and shape. A caption
outside the grammar is wrong on every count. A two-object caption may name the objects in either order
("a circle above a star" and "a star below a circle" are the same picture).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dalle.data.shapes import _POSITION_PHRASES, _RELATION_PHRASES, CONVERSE, OBJECT_PATTERN, Scene

CAPTION_ATTRIBUTES = ("colour", "shape", "size", "position", "relation")

_POSITIONS = {phrase: pos for pos, phrase in _POSITION_PHRASES.items()}
_RELATIONS = {phrase: rel for rel, phrase in _RELATION_PHRASES.items()}
_ONE = re.compile(rf"{OBJECT_PATTERN}(?: ({'|'.join(_POSITIONS)}))?")
_TWO = re.compile(rf"{OBJECT_PATTERN} ({'|'.join(_RELATIONS)}) {OBJECT_PATTERN}")


@dataclass(frozen=True)
class Stated:
    """One object as a caption states it; None where the caption does not say."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Parsed:
    objects: tuple[Stated, ...]
    relation: str | None = None  # of objects[0] to objects[1], in shapes.RELATIONS


def parse_caption(text: str) -> Parsed | None:
    """The objects and relation a caption states, or None when it is outside the shapes grammar."""
    text = " ".join(text.lower().replace(".", " ").split())
    if m := _ONE.fullmatch(text):
        size, colour, shape, where = m.groups()
        return Parsed((Stated(colour, shape, size, _POSITIONS.get(where or "")),))
    if m := _TWO.fullmatch(text):
        s1, c1, h1, rel, s2, c2, h2 = m.groups()
        return Parsed((Stated(c1, h1, s1), Stated(c2, h2, s2)), _RELATIONS[rel])
    return None


@dataclass(frozen=True)
class CaptionVerdict:
    """Per attribute: True or False where the caption states it, None where it does not."""

    parsed: bool
    count: bool  # it names as many objects as the scene holds
    attributes: dict[str, bool | None]

    @property
    def all_correct(self) -> bool:
        return self.parsed and self.count and all(v is not False for v in self.attributes.values())


def _object_verdict(stated: Stated, obj: object) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {"colour": stated.colour == obj.colour, "shape": stated.shape == obj.shape}
    for a in ("size", "position"):
        value = getattr(stated, a)
        out[a] = None if value is None else value == getattr(obj, a)
    return out


def _merge(verdicts: Sequence[dict[str, bool | None]]) -> dict[str, bool | None]:
    merged: dict[str, bool | None] = {}
    for a in ("colour", "shape", "size", "position"):
        said = [v[a] for v in verdicts if v[a] is not None]
        merged[a] = all(said) if said else None
    return merged


def judge_caption(text: str, scene: Scene) -> CaptionVerdict:
    """How a caption agrees with the scene it was generated for."""
    parsed = parse_caption(text)
    wrong = {a: False for a in CAPTION_ATTRIBUTES}
    if parsed is None:
        return CaptionVerdict(False, False, wrong)
    objects = scene.objects
    if len(parsed.objects) != len(objects):
        return CaptionVerdict(True, False, wrong)
    if len(objects) == 1:
        return CaptionVerdict(True, True, {**_merge([_object_verdict(parsed.objects[0], objects[0])]),
                                           "relation": None})
    # Either order of naming; keep the reading that agrees best with the scene.
    readings = []
    for order, relation in (((0, 1), scene.relation), ((1, 0), CONVERSE[scene.relation])):
        attrs = _merge([_object_verdict(s, objects[i]) for s, i in zip(parsed.objects, order)])
        attrs["relation"] = parsed.relation == relation
        readings.append(attrs)
    best = max(readings, key=lambda r: sum(v is True for v in r.values()))
    return CaptionVerdict(True, True, best)


def normalise_answer(text: str) -> str:
    """Answers compare after case, surrounding space and a final full stop are dropped."""
    return " ".join(text.lower().strip().rstrip(".").split())


def answer_correct(answer: str, expected: str) -> bool:
    return normalise_answer(answer) == normalise_answer(expected)
