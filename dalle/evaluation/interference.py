"""Interference: does learning to read cost a joint model its drawing?

The joint recipe's runs are compared with text-to-image-only runs trained the same way (same data, as many
text-to-image samples) on the compositional evaluation (`tools/eval_shapes.py` rows: all attributes right,
per split, guidance scale and best-of-k). One run of a recipe differs from the next by more than the
evaluation's own sampling noise, so the yardstick is the run-to-run spread: in each column, the larger of
the two recipes' max - min over their runs. The joint recipe passes a column when its mean is no lower than
the text-to-image-only mean by more than that spread. With a single run of each recipe the spread is
unknown and so is the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence

from dalle.evaluation.report import markdown_table

Column = tuple[str, float, int]  # (split, cond_scale, candidates)

AHEAD, WITHIN, BEHIND, UNKNOWN = "ahead", "within the spread", "behind beyond the spread", "spread unknown"


def _accuracy(rows: Sequence[dict]) -> dict[Column, float]:
    return {(r["split"], float(r["cond_scale"]), int(r["candidates"])): r["all_correct"] for r in rows}


def compare(joint: Sequence[Sequence[dict]], t2i: Sequence[Sequence[dict]]) -> dict:
    """Each argument: one list of eval_shapes rows per run. Returns the columns every run has, each run's
    all-correct in them, the recipes' means, the spread, joint - t2i, and a verdict per column."""
    if not joint or not t2i:
        raise ValueError("interference needs at least one joint run and one text-to-image-only run")
    runs = {"joint": [_accuracy(r) for r in joint], "t2i": [_accuracy(r) for r in t2i]}
    columns = sorted(set.intersection(*(set(a) for group in runs.values() for a in group)),
                     key=lambda c: (c[0], c[2], c[1]))
    if not columns:
        raise ValueError("the runs' evaluations share no (split, cond scale, candidates) setting")
    values = {g: [[a[c] for c in columns] for a in accs] for g, accs in runs.items()}
    mean = {g: [sum(col) / len(col) for col in zip(*v)] for g, v in values.items()}
    spreads = [[max(col) - min(col) for col in zip(*v)] for v in values.values() if len(v) > 1]
    spread = [max(s) for s in zip(*spreads)] if spreads else [None] * len(columns)
    difference = [j - t for j, t in zip(mean["joint"], mean["t2i"])]
    verdict = [AHEAD if d >= 0 else UNKNOWN if s is None else WITHIN if -d <= s + 1e-9 else BEHIND
               for d, s in zip(difference, spread)]
    return {"columns": [list(c) for c in columns], "joint": values["joint"], "t2i": values["t2i"], "mean": mean,
            "spread": spread, "difference": difference, "verdict": verdict}


def recorded_rows(result: dict, group: str) -> list[list[dict]]:
    """A `compare` result's runs of `group` ("joint" or "t2i") as the eval_shapes rows it read (all-correct
    only): so runs evaluated once can join a later comparison without being drawn again."""
    return [[{"split": split, "cond_scale": float(cs), "candidates": int(k), "all_correct": v}
             for (split, cs, k), v in zip(result["columns"], run)] for run in result[group]]


def label(column: Sequence) -> str:
    split, cond_scale, k = column
    return f"{split}: {'first' if k == 1 else f'best of {k}'}, cs {cond_scale:g}"


def markdown(result: dict, names: dict[str, Sequence[str]]) -> str:
    """The comparison as one table: a row per run, then the means, the spread, the difference and the verdict.
    `names`: {"joint": [...], "t2i": [...]}, one name per run."""
    rows = [[name, "joint", *vals] for name, vals in zip(names["joint"], result["joint"])]
    rows += [[name, "text to image only", *vals] for name, vals in zip(names["t2i"], result["t2i"])]
    rows += [["mean", "joint", *result["mean"]["joint"]], ["mean", "text to image only", *result["mean"]["t2i"]],
             ["spread (largest max - min of a recipe)", "", *result["spread"]],
             ["difference (joint - text to image only)", "", *result["difference"]],
             ["verdict", "", *result["verdict"]]]
    return markdown_table(["run", "recipe", *(label(c) for c in result["columns"])], rows)
