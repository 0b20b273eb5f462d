"""The accuracy-against-KL figure (dalle/feedback/plot.py, tools/plot_feedback.py) from evaluation records of
the shape tools/eval_feedback.py writes, made by hand here so that every point's place is known."""

import json

import pytest
from PIL import Image

from dalle.feedback.plot import points, series_of
from dalle_tools import plot_feedback


def _row(name, split, kl, first, reward, mean=None, two=None):
    row = {"name": name, "split": split, "kl": kl, "reward": reward, "accuracy": {"all_correct": first},
           "two_objects": {"all_correct": two if two is not None else first / 2}}
    if mean is not None:
        row["mean"] = {"draws": 8, "all_correct": mean, "two_objects_all_correct": mean / 2}
    return row


def _record(rows, sft="model@abc", sft_reward=-1.0):
    rows = [_row("sft", s, 0.0, 0.5, sft_reward, mean=0.55) for s in ("train", "zeroshot")] + rows
    return {"sft": sft, "reward": "runs/reward", "rows": rows}


ROWS = [_row("sft best of 4", "train", 0.64, 0.8, 1.0, mean=0.78),
        _row("sft best of 16", "train", 1.84, 0.9, 1.5),  # no mean: one draw a prompt
        _row("sft at temperature 0.7", "train", 4.2, 0.7, 0.2, mean=0.72),
        _row("sft at temperature 0.9", "train", 0.5, 0.6, 0.0, mean=0.62),
        _row("grpo-s200", "train", 1.2, 0.75, 0.9, mean=0.7),
        _row("grpo-s100", "train", 0.8, 0.65, 0.5, mean=0.66),
        _row("dpo", "train", 0.3, 0.6, 0.2, mean=0.58)]


def test_lines_start_at_the_supervised_model_and_run_in_order():
    assert series_of("grpo-lr2-s150") == ("grpo-lr2", 150.0)
    assert series_of("sft at temperature 0.5") == ("temperature", 2.0)
    lines = points(_record(ROWS)["rows"], "train")
    assert list(lines) == ["sft", "best of N", "temperature", "grpo", "dpo"]
    names = {line: [p.name for p in ps] for line, ps in lines.items()}
    assert names["best of N"] == ["sft", "sft best of 4", "sft best of 16"]
    assert names["temperature"] == ["sft", "sft at temperature 0.9", "sft at temperature 0.7"]  # colder further on
    assert names["grpo"] == ["sft", "grpo-s100", "grpo-s200"]  # by step, not by the order of the rows
    assert names["dpo"] == ["sft", "dpo"]
    best = {p.name: p for p in lines["best of N"]}
    assert (best["sft best of 4"].accuracy, best["sft best of 4"].draws) == (0.78, 8)  # the mean where there is one
    assert (best["sft best of 16"].accuracy, best["sft best of 16"].draws) == (0.9, 1)  # else the first sample
    two = {p.name: p for p in points(_record(ROWS)["rows"], "train", two_objects=True)["best of N"]}
    assert two["sft best of 4"].accuracy == 0.39 and two["sft best of 16"].accuracy == 0.45
    assert lines["grpo"][2].kl == 1.2 and lines["grpo"][2].reward == 0.9
    with pytest.raises(ValueError, match="no 'sft' row on split 'val'"):
        points(ROWS, "val")


def test_the_tool_draws_several_evaluations_on_one_axis(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "policy-eval.json").write_text(json.dumps(_record(ROWS[:4])))
    (tmp_path / "many.json").write_text(json.dumps({"description": "runs", "eval_grpo": _record(ROWS[4:])}))
    out = tmp_path / "fig" / "curve.png"
    assert plot_feedback.main([str(tmp_path / "a"), f"{tmp_path / 'many.json'}:eval_grpo", "--out", str(out),
                               "--label", "grpo=GRPO", "--two-objects"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height  # two split columns side by side
    assert f"wrote {out}" in capsys.readouterr().out
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="exists: choose another name or pass --overwrite"):
        plot_feedback.main([str(tmp_path / "a"), "--out", str(out)])
    assert out.read_bytes() == before  # nothing lost
    assert plot_feedback.main([str(tmp_path / "a"), "--out", str(out), "--overwrite", "--split", "train"]) == 0


def test_the_tool_refuses_what_does_not_share_an_axis(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_record(ROWS)))
    (tmp_path / "other-reward.json").write_text(json.dumps(_record(ROWS, sft_reward=-2.0)))
    (tmp_path / "other-sft.json").write_text(json.dumps(_record(ROWS, sft="model@def")))
    (tmp_path / "not-eval.json").write_text(json.dumps({"rows": 3}))
    (tmp_path / "broken.json").write_text("{")
    out = str(tmp_path / "x.png")
    cases = {"other-reward.json": "scores the supervised model's images otherwise",
             "other-sft.json": "has other supervised model than",
             "not-eval.json": "is not an evaluation of tools/eval_feedback.py",
             "broken.json": "broken.json is not JSON",
             "a.json:nokey": "has no key 'nokey'",
             "absent.json": "absent.json: no such file"}
    for name, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            plot_feedback.main([str(tmp_path / "a.json"), str(tmp_path / name), "--out", out])
    with pytest.raises(SystemExit, match="--split val: not in the evaluations"):
        plot_feedback.main([str(tmp_path / "a.json"), "--out", out, "--split", "val"])
    with pytest.raises(SystemExit, match="cannot plot: no line named nothing"):
        plot_feedback.main([str(tmp_path / "a.json"), "--out", out, "--label", "nothing=x"])
    with pytest.raises(SystemExit, match="name a .png, .svg or .pdf"):
        plot_feedback.main([str(tmp_path / "a.json"), "--out", str(tmp_path / "x.txt")])
    assert not (tmp_path / "x.png").exists()
