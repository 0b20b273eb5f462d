"""Questions and answers about an image, for the transformer's question-answering layout.

Two sources, tried in this order for each sample (`qa_for_sample`):

* the sample's own pairs: a `qa` list in the sample (pre-tokenised shards keep it), or in the image's
  `name.json` / `key.json` side file: `{"qa": [{"question": "...", "answer": "..."}, ...]}` (a pair may
  also be a two-item list `["question", "answer"]`);
* a shapes scene (the `scene` of `ShapesDataset` items, or a side file that holds one, as
  tools/make_shapes.py writes them): questions generated from the scene's structure by `shapes_qa`.

Generated questions only describe the scene they come from, so a `zeroshot` scene's questions stay in that
split: the held-out colour/shape pairs and layouts never reach a training question.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dalle.data.shapes import CONVERSE, Scene

log = logging.getLogger("dalle.data")

QUESTION_KINDS = ("count", "colour", "size", "where", "which")
_RELATION = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "centre": "in the centre"}
_NUMBERS = {1: "one", 2: "two"}


def shapes_qa(scene: Scene) -> list[tuple[str, str, str]]:
    """Every (question, answer, kind) the scene answers; kinds from QUESTION_KINDS. An object is named by its
    shape alone when no other object has that shape, else by colour and shape (objects of a scene differ)."""
    objects = scene.objects
    shapes = [o.shape for o in objects]

    def name(i: int) -> str:
        o = objects[i]
        return o.shape if shapes.count(o.shape) == 1 else f"{o.colour} {o.shape}"

    out = [("how many objects?", _NUMBERS.get(len(objects), str(len(objects))), "count")]
    for i, o in enumerate(objects):
        out.append((f"what colour is the {name(i)}?", o.colour, "colour"))
        out.append((f"is the {name(i)} large?", "yes" if o.size == "large" else "no", "size"))
        if o.position is not None:
            out.append((f"where is the {o.colour} {o.shape}?", _POSITION[o.position], "where"))
    if len(objects) == 2 and scene.relation in _RELATION:
        a, b = objects
        for first, rel, second in ((a, scene.relation, b), (b, CONVERSE[scene.relation], a)):
            out.append((f"where is the {first.colour} {first.shape}?",
                        f"{_RELATION[rel]} the {second.colour} {second.shape}", "where"))
            out.append((f"which shape is {_RELATION[rel]} the {second.colour} {second.shape}?",
                        f"{first.colour} {first.shape}", "which"))
    return out


def parse_qa(value: Any, where: str) -> list[tuple[str, str]]:
    """A `qa` field's pairs; ValueError naming `where` and the expected form when it is malformed."""
    form = 'a list of {"question": ..., "answer": ...} objects or ["question", "answer"] pairs'
    if not isinstance(value, list):
        raise ValueError(f"{where}: qa must be {form}, got {type(value).__name__}")
    pairs = []
    for item in value:
        if isinstance(item, dict) and set(item) >= {"question", "answer"}:
            q, a = item["question"], item["answer"]
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            q, a = item
        else:
            raise ValueError(f"{where}: qa must be {form}, got the item {item!r}")
        if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
            raise ValueError(f"{where}: a question and its answer must be non-empty strings, got {item!r}")
        pairs.append((q.strip(), a.strip()))
    return pairs


def qa_for_sample(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """The sample's question-answer pairs (see the module docstring); [] when it has none. A malformed
    side file is warned about and yields none, as a bad image is skipped rather than stopping a run."""
    where = f"sample {sample.get('key')!r}"
    try:
        if sample.get("qa") is not None:
            return parse_qa(sample["qa"], where)
        for field in ("meta", "scene"):
            text = sample.get(field)
            if not text:
                continue
            record = json.loads(text)
            if isinstance(record, dict) and "qa" in record:
                return parse_qa(record["qa"], f"{where} ({field})")
            if isinstance(record, dict) and "objects" in record:
                return [(q, a) for q, a, _ in shapes_qa(Scene.from_dict(record))]
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the questions of %s: %s", where, e)
    return []
