"""tools/eval_captions.py: captions, answers, the cycle and self-reranking, judged without the model."""

import json

import pytest
from tiny import save_joint_model

from dalle.captioning import Text
from dalle.data.qa import shapes_qa
from dalle.evaluation.compositional import shapes_prompts
from dalle_tools import eval_captions


@pytest.fixture(scope="module")
def joint(tiny_parts, tmp_path_factory):
    """An untrained transformer with every layout, on tiny_parts' tokenizer and dVAE."""
    return save_joint_model(tiny_parts / "model", tmp_path_factory.mktemp("joint-eval") / "model")


def test_the_tool_writes_every_table_and_keeps_an_earlier_one(joint, tiny_parts, tmp_path):
    out = tmp_path / "eval"
    args = ["--model", str(joint), "--reranker", str(tiny_parts / "reranker"), "--split", "train", "zeroshot",
            "--n", "3", "--candidates", "1", "2", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert eval_captions.main(args) == 0
    result = json.loads((out / "captions-eval.json").read_text())
    assert [r["split"] for r in result["captions"]] == ["train", "zeroshot"] == [r["split"] for r in result["cycle"]]
    assert all(0 <= r["all_correct"] <= 1 and r["n"] == 3 for r in result["captions"])
    assert all(r["questions"] >= 3 and 0 <= r["all"] <= 1 for r in result["answers"])
    splits = ("train", "zeroshot")
    assert {(r["split"], r["candidates"], r["rerank"]) for r in result["rerank"]} == {
        (s, 1, "-") for s in splits} | {(s, 2, k) for s in splits for k in ("self", "clip")}
    text = (out / "captions-eval.md").read_text()
    assert "## Captions of renders" in text and "## Reranking, judged by the detector" in text
    with pytest.raises(SystemExit, match="already holds an evaluation"):
        eval_captions.main(args)


def test_true_captions_and_answers_score_full_marks(joint, tmp_path, monkeypatch):
    """The judging, not the model: the scenes' own captions and answers must come out all correct."""
    prompts = shapes_prompts("zeroshot", 6, 0, 32)

    def truth_captions(pipe, images, **kw):
        return [[Text(p.caption, 0.0)] for p in prompts[: len(images)]]

    def truth_answers(pipe, images, questions, **kw):
        expected = [a for p in prompts for _, a, _ in shapes_qa(p.sample.scene)]
        assert len(expected) == len(questions)
        return [[Text(a.upper() + ".", 0.0)] for a in expected]

    monkeypatch.setattr(eval_captions, "caption", truth_captions)
    monkeypatch.setattr(eval_captions, "answer", truth_answers)
    out = tmp_path / "truth"
    assert eval_captions.main(["--model", str(joint), "--split", "zeroshot", "--n", "6", "--parts", "captions",
                               "answers", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    result = json.loads((out / "captions-eval.json").read_text())
    (cap,), (ans,) = result["captions"], result["answers"]
    assert cap["all_correct"] == 1.0 and cap["colour"] == 1.0 and cap["parsed"] == 1.0
    assert ans["all"] == 1.0 and ans["count"] == 1.0


def test_one_captions_row_per_prior_scale_and_candidates(joint, tmp_path, monkeypatch):
    settings = []

    def recording_caption(pipe, images, **kw):
        settings.append((kw["prior_scale"], kw["candidates"]))
        return [[Text("a red circle", 0.0)] for _ in images]

    monkeypatch.setattr(eval_captions, "caption", recording_caption)
    out = tmp_path / "scales"
    assert eval_captions.main(["--model", str(joint), "--split", "train", "--n", "2", "--parts", "captions",
                               "--prior-scale", "0", "1.5", "--caption-candidates", "1", "4", "--out", str(out),
                               "--no-progress", "--device", "cpu"]) == 0
    result = json.loads((out / "captions-eval.json").read_text())
    assert settings == [(0.0, 1), (0.0, 4), (1.5, 1), (1.5, 4)] == [(r["prior_scale"], r["candidates"])
                                                                     for r in result["captions"]]
    assert "| prior scale | candidates |" in (out / "captions-eval.md").read_text()


def test_a_text_to_image_model_is_refused_in_one_line(tiny_parts, tmp_path):
    with pytest.raises(SystemExit, match="cannot evaluate .*text-to-image only"):
        eval_captions.main(["--model", str(tiny_parts / "model"), "--out", str(tmp_path / "e")])


def test_interference_compares_the_recipes_runs_in_one_table(joint, tiny_parts, tmp_path):
    """--t2i-only adds the drawing comparison: every run evaluated alike (eval_shapes into OUT/interference/),
    the recipes' means, the spread and a verdict per column, in the JSON and the Markdown."""
    out = tmp_path / "interference"
    args = ["--model", str(joint), "--joint-runs", str(joint), "--t2i-only", str(tiny_parts / "model"),
            "--reranker", str(tiny_parts / "reranker"), "--parts", "answers", "--split", "zeroshot", "--n", "2",
            "--interference-candidates", "1", "2", "--interference-cond-scale", "1", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert eval_captions.main(args) == 0
    result = json.loads((out / "captions-eval.json").read_text())
    got = result["interference"]
    assert got["runs"] == {"joint": [str(joint)] * 2, "t2i": [str(tiny_parts / "model")]}
    assert got["columns"] == [["zeroshot", 1.0, 1], ["zeroshot", 1.0, 2]]
    assert len(got["joint"]) == 2 and len(got["t2i"]) == 1 and len(got["verdict"]) == 2
    assert got["joint"][0] == got["joint"][1] and got["spread"] == [0.0, 0.0]  # the same weights, the same images
    for group, i in (("joint", 0), ("joint", 1), ("t2i", 0)):
        rows = json.loads((out / "interference" / f"{group}-{i}" / "shapes-eval.json").read_text())["rows"]
        assert [r["all_correct"] for r in rows] == got[group][i]
    assert result["answers"] and not result["captions"]  # --parts as given, interference added to them
    assert "## Interference" in (out / "captions-eval.md").read_text()

    # The text-to-image-only run as this evaluation recorded it: not drawn again, the same comparison
    again = tmp_path / "again"
    assert eval_captions.main(["--model", str(joint), "--t2i-recorded", str(out / "captions-eval.json"),
                               "--reranker", str(tiny_parts / "reranker"), "--parts", "interference", "--split",
                               "zeroshot", "--n", "2", "--interference-candidates", "1", "2",
                               "--interference-cond-scale", "1", "--out", str(again), "--no-progress",
                               "--device", "cpu"]) == 0
    recorded = json.loads((again / "captions-eval.json").read_text())["interference"]
    assert recorded["runs"]["t2i"] == [f"{tiny_parts / 'model'} (recorded in {out / 'captions-eval.json'})"]
    assert recorded["t2i"] == got["t2i"] and recorded["joint"] == got["joint"][:1]
    assert not (again / "interference" / "t2i-0").exists()


def test_a_recorded_evaluation_must_have_drawn_the_same_prompts(joint, tmp_path, capsys):
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({
        "settings": {"split": ["zeroshot"], "n": 2, "seed": 0},
        "interference": {"runs": {"t2i": ["t2i-a"]}, "columns": [["zeroshot", 1.0, 1]], "t2i": [[0.5]]}}))
    (tmp_path / "broken.json").write_text("{")
    base = ["--model", str(joint), "--split", "zeroshot", "--interference-candidates", "1",
            "--interference-cond-scale", "1", "--out", str(tmp_path / "e")]
    for extra, message in ((["--n", "3", "--t2i-recorded", str(recorded)], "drawn with --n 2, this evaluation with 3"),
                           (["--n", "2", "--interference-candidates", "1", "8", "--t2i-recorded", str(recorded)],
                            "no zeroshot row at cond scale 1 with best of 8"),
                           (["--n", "2", "--t2i-recorded", str(tmp_path / "broken.json")],
                            "not the output of an interference evaluation"),
                           (["--n", "2", "--t2i-recorded", str(tmp_path / "nowhere.json")], "nowhere.json")):
        with pytest.raises(SystemExit):
            eval_captions.main([*base, *extra])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("extra, message", [
    (["--joint-runs", "{joint}"], "add --t2i-only"),
    (["--parts", "interference"], "name them with --t2i-only"),
    (["--t2i-only", "{missing}"], "no such model or run directory"),
])
def test_interference_flags_are_checked_before_any_work(joint, tmp_path, capsys, extra, message):
    extra = [a.format(joint=joint, missing=tmp_path / "nowhere") for a in extra]
    with pytest.raises(SystemExit):
        eval_captions.main(["--model", str(joint), *extra, "--out", str(tmp_path / "e")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
