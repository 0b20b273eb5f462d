"""Captions judged against their scenes with the shapes caption grammar, and answers by exact match."""

import pytest

from dalle.data.shapes import make_sample
from dalle.evaluation.captions import answer_correct, judge_caption, parse_caption


@pytest.mark.parametrize("split", ["train", "zeroshot"])
def test_every_caption_the_data_writes_is_all_correct_for_its_own_scene(split):
    for i in range(300):
        s = make_sample(i, split, image_size=32)
        verdict = judge_caption(s.caption, s.scene)
        assert verdict.all_correct, (s.caption, verdict)


def test_wrong_attributes_are_caught_one_by_one():
    one = next(s for i in range(200) if len((s := make_sample(i, "train", image_size=32)).scene.objects) == 1
               and s.scene.objects[0].position is not None)
    o = one.scene.objects[0]
    colour = "red" if o.colour != "red" else "blue"
    size = "small" if o.size == "large" else "large"
    position = "on the left" if o.position != "left" else "on the right"
    article = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
    v = judge_caption(f"{article(colour)} {colour} {o.shape}", one.scene)
    assert v.attributes["colour"] is False and v.attributes["shape"] is True and not v.all_correct
    v = judge_caption(f"a {size} {o.colour} {o.shape} {position}", one.scene)
    assert v.attributes["size"] is False and v.attributes["position"] is False and v.attributes["colour"]
    v = judge_caption(f"{article(o.colour)} {o.colour} {o.shape}", one.scene)  # says less, still all correct
    assert v.all_correct and v.attributes["size"] is None
    assert not judge_caption("a red circle above a blue square", one.scene).count  # two objects named, one drawn
    assert not judge_caption("red circles everywhere", one.scene).parsed


def test_two_object_captions_may_name_either_object_first():
    two = next(s for i in range(200) if len((s := make_sample(i, "train", image_size=32)).scene.objects) == 2)
    a, b = two.scene.objects
    rel = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
    conv = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    art = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
    forward = f"{art(a.colour)} {a.colour} {a.shape} {rel[two.scene.relation]} {art(b.colour)} {b.colour} {b.shape}"
    backward = (f"{art(b.colour)} {b.colour} {b.shape} {rel[conv[two.scene.relation]]} "
                f"{art(a.colour)} {a.colour} {a.shape}")
    wrong = f"{art(a.colour)} {a.colour} {a.shape} {rel[conv[two.scene.relation]]} {art(b.colour)} {b.colour} {b.shape}"
    assert judge_caption(forward, two.scene).all_correct and judge_caption(backward, two.scene).all_correct
    v = judge_caption(wrong, two.scene)
    assert v.attributes["relation"] is False and v.attributes["colour"] is True and not v.all_correct
    assert parse_caption(forward.upper() + ".").relation == two.scene.relation


def test_answers_match_exactly_up_to_case_and_a_full_stop():
    assert answer_correct("Red.", "red") and answer_correct(" two ", "two")
    assert not answer_correct("dark red", "red") and not answer_correct("", "red")
