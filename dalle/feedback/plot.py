"""The curve of true accuracy against KL (Stiennon et al. 2020, fig. 7): from the rows of one or more policy
evaluations (dalle/feedback/policy_eval.py), each policy's all-correct by the shapes detector and the reward
model's score of its images, both against its KL from the supervised model. Selection by the reward model (best
of N), sampling colder or with guidance, and each fine-tuning run's checkpoints are lines from the supervised
model's point, so a run whose reward climbs while its accuracy falls (over-optimisation) shows as the two panels
parting. Pure: builds a matplotlib Figure and writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CHECKPOINT = re.compile(r"^(?P<run>.+)-s(?P<step>\d+)$")  # "grpo-s100": run "grpo", step 100


@dataclass(frozen=True)
class Point:
    name: str  # the evaluation row's name
    kl: float
    accuracy: float
    reward: float
    draws: int  # images a prompt behind `accuracy` (1: the first sample only)


def series_of(name: str) -> tuple[str, float]:
    """The line a row belongs to and its place along it: best of N, temperature and guidance rows are lines
    through the supervised model ("sft"), checkpoints NAME-sSTEP of one run a line from it; any other model is a
    line of its own."""
    if name == "sft":
        return "sft", 0.0
    if m := re.fullmatch(r"sft best of (\d+)", name):
        return "best of N", float(m[1])
    if m := re.fullmatch(r"sft at temperature ([\d.e+-]+)", name):
        return "temperature", 1 / float(m[1])  # colder is further along
    if m := re.fullmatch(r"sft cond scale ([\d.e+-]+)", name):
        return "guidance", float(m[1])
    if m := _CHECKPOINT.match(name):
        return m["run"], float(m["step"])
    return name, 1.0


def points(rows: Sequence[dict[str, Any]], split: str, two_objects: bool = False) -> dict[str, list[Point]]:
    """Each line's points on one split, ordered along it, every line but "sft" starting at the supervised
    model's point. Accuracy is the mean over the row's draws where it has them, else its first sample."""
    found: dict[str, tuple[float, Point]] = {}
    for r in rows:
        if r["split"] != split or r["name"] in found:  # several evaluations repeat the sft rows
            continue
        mean = r.get("mean") or {}
        key = "two_objects_all_correct" if two_objects else "all_correct"
        first = (r["two_objects"] if two_objects else r["accuracy"]).get("all_correct")
        value, draws = (mean[key], mean["draws"]) if mean.get(key) is not None else (first, 1)
        if value is None:  # no two-object prompts in this split
            continue
        found[r["name"]] = (series_of(r["name"])[1], Point(r["name"], r["kl"], value, r["reward"], draws))
    if "sft" not in found:
        raise ValueError(f"no 'sft' row on split {split!r}: every line starts at the supervised model")
    lines: dict[str, list[tuple[float, Point]]] = {}
    for name, (place, point) in found.items():
        if name != "sft":
            lines.setdefault(series_of(name)[0], []).append((place, point))
    out = {"sft": [found["sft"][1]]}
    for line, ps in lines.items():
        out[line] = [found["sft"][1]] + [p for _, p in sorted(ps, key=lambda x: x[0])]
    return out


def accuracy_kl_figure(rows: Sequence[dict[str, Any]], splits: Sequence[str], two_objects: bool = False,
                       title: str = "", labels: dict[str, str] | None = None) -> Figure:
    """One column per split: all-correct against KL above, the reward model's score against KL below. labels:
    legend text for lines (by the names `series_of` gives them, "sft" for the start); a label for no line is an
    error."""
    labels = labels or {}
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(splits), 7.2), layout="constrained")
    axes = fig.subplots(2, len(splits), sharex="col", squeeze=False)
    unknown = set(labels) - {series_of(r["name"])[0] for r in rows}
    if unknown:
        raise ValueError(f"no line named {', '.join(sorted(unknown))} to label")
    what = "two-object prompts" if two_objects else "all prompts"
    # one colour per line across the columns, even where a split lacks a line
    order = list(dict.fromkeys(series_of(r["name"])[0] for r in rows if r["name"] != "sft"))
    for col, split in enumerate(splits):
        lines = points(rows, split, two_objects)
        top, bottom = axes[0][col], axes[1][col]
        for line, ps in lines.items():
            if line == "sft":
                continue
            style = {"color": f"C{order.index(line) % 10}", "label": labels.get(line, line)}
            kl = [p.kl for p in ps]
            top.plot(kl, [p.accuracy for p in ps], "-", **style)
            bottom.plot(kl, [p.reward for p in ps], "--", **style)
            for p in ps[1:]:  # hollow: one draw a prompt, a noisier figure than the mean of several
                face = style["color"] if p.draws > 1 else "none"
                top.plot(p.kl, p.accuracy, "o", color=style["color"], markerfacecolor=face)
                bottom.plot(p.kl, p.reward, "o", color=style["color"], markerfacecolor="none")
        sft = lines["sft"][0]
        top.plot(sft.kl, sft.accuracy, "ks", label=labels.get("sft", "supervised"))
        bottom.plot(sft.kl, sft.reward, "ks")
        top.set_title(f"{split}: {what}")
        top.set_ylabel("all correct (shapes detector)")
        bottom.set_ylabel("reward model's score, all prompts")  # rows hold no two-object mean of it
        bottom.set_xlabel(f"KL from {labels.get('sft', 'the supervised model')} (nats)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()  # every column has the same lines
    fig.legend(handles, names, loc="outside lower center", ncol=min(3, len(names)), fontsize="small",
               title_fontsize="small", title="filled: all-correct averaged over several draws a prompt; hollow: the "
                                              "first sample only (rewards: the first sample)")
    if title:
        fig.suptitle(title)
    return fig
