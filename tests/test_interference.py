"""dalle.evaluation.interference: the joint recipe against text to image only, with the runs' spread."""

import pytest

from dalle.evaluation.interference import AHEAD, BEHIND, UNKNOWN, WITHIN, compare, markdown, recorded_rows


def rows(first: float, best: float, split: str = "zeroshot") -> list[dict]:
    return [{"split": split, "cond_scale": 1.0, "candidates": 1, "all_correct": first},
            {"split": split, "cond_scale": 1.0, "candidates": 8, "all_correct": best}]


def test_the_spread_is_the_larger_recipe_range_and_decides_the_verdict():
    got = compare([rows(0.50, 0.80), rows(0.40, 0.70)], [rows(0.60, 0.70), rows(0.56, 0.74)])
    assert got["columns"] == [["zeroshot", 1.0, 1], ["zeroshot", 1.0, 8]]
    assert got["mean"]["joint"] == pytest.approx([0.45, 0.75]) and got["mean"]["t2i"] == pytest.approx([0.58, 0.72])
    assert got["spread"] == pytest.approx([0.10, 0.10])  # joint's range in both columns; t2i's is 0.04
    assert got["difference"] == pytest.approx([-0.13, 0.03])
    assert got["verdict"] == [BEHIND, AHEAD]
    assert compare([rows(0.50, 0.80), rows(0.40, 0.70)], [rows(0.52, 0.80)])["verdict"] == [WITHIN, WITHIN]


def test_one_run_each_leaves_the_verdict_open_unless_joint_is_ahead():
    got = compare([rows(0.50, 0.80)], [rows(0.60, 0.70)])
    assert got["spread"] == [None, None] and got["verdict"] == [UNKNOWN, AHEAD]


def test_only_the_columns_every_run_has_are_compared():
    joint = [rows(0.5, 0.8) + rows(0.9, 0.9, split="train")]
    got = compare(joint, [rows(0.6, 0.7)])
    assert got["columns"] == [["zeroshot", 1.0, 1], ["zeroshot", 1.0, 8]]
    with pytest.raises(ValueError, match="share no"):
        compare([rows(0.5, 0.8, split="train")], [rows(0.6, 0.7)])
    with pytest.raises(ValueError, match="at least one joint run"):
        compare([], [rows(0.6, 0.7)])


def test_a_recorded_comparison_gives_back_the_rows_it_compared():
    joint, t2i = [rows(0.50, 0.80), rows(0.40, 0.70)], [rows(0.60, 0.70)]
    got = compare(joint, t2i)
    assert recorded_rows(got, "joint") == [[{k: r[k] for k in ("split", "cond_scale", "candidates", "all_correct")}
                                            for r in run] for run in joint]
    assert compare(recorded_rows(got, "joint"), recorded_rows(got, "t2i")) == got


def test_the_table_has_a_row_per_run_and_the_summary_rows():
    got = compare([rows(0.50, 0.80), rows(0.40, 0.70)], [rows(0.60, 0.70)])
    text = markdown(got, {"joint": ["j0", "j1"], "t2i": ["t0"]})
    lines = text.splitlines()
    assert lines[0] == "| run | recipe | zeroshot: first, cs 1 | zeroshot: best of 8, cs 1 |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| j0", "| j1", "| t0", "| mean", "| mean", "| spread (largest max - min of a recipe)",
        "| difference (joint - text to image only)", "| verdict"]
    assert lines[-1].endswith(f"| {BEHIND} | {AHEAD} |")
