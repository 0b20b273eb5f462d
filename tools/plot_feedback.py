"""Plot true accuracy and the reward model's score against KL from evaluations of policies tuned from feedback.

    python tools/plot_feedback.py runs/eval-fb/policy-eval.json runs/eval-more/policy-eval.json --out curve.png
    python tools/plot_feedback.py docs/eval/feedback-kl-penalty.json:eval_exact --two-objects --out curve.png

Each input is a tools/eval_feedback.py output (OUT/policy-eval.json, or OUT itself), or FILE:KEY for an
evaluation kept under KEY of a larger JSON (as docs/eval/ keeps several runs in one file). All inputs must share
the supervised model, the reward model and the prompts, so that their KL, scores and accuracies are on one axis.
Lines: best of N by the reward model, the supervised model sampled colder or with guidance, and each fine-tuning
run's checkpoints (models named RUN-sSTEP, e.g. grpo-s100) from the supervised model's point; the reward
panel under each accuracy panel shows over-optimisation as the two parting (dalle/feedback/plot.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.cli import add_debug_flag


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("evals", nargs="+", metavar="EVAL",
                   help="policy-eval.json of tools/eval_feedback.py, its --out directory, or FILE:KEY")
    p.add_argument("--split", nargs="+", default=None,
                   help="splits to plot, one column each (default: every split of the evaluations)")
    p.add_argument("--two-objects", action="store_true", help="all-correct on two-object prompts, not all prompts")
    p.add_argument("--label", action="append", default=[], metavar="LINE=TEXT",
                   help="name a line in the legend (repeatable): LINE is a run (the RUN of RUN-sSTEP), a model's name, "
                        "'best of N', 'temperature', 'guidance' or 'sft' (the start, 'supervised' unless named)")
    p.add_argument("--title", default="", help="a title over the figure")
    p.add_argument("--out", required=True, help="the figure to write (.png, .svg or .pdf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_debug_flag(p)
    return p


def read_eval(spec: str) -> dict[str, Any]:
    """One evaluation record from PATH, PATH/policy-eval.json or FILE:KEY, checked to be one."""
    path, key = Path(spec), None
    if not path.exists() and ":" in spec:
        head, _, key = spec.rpartition(":")
        path = Path(head)
    if path.is_dir():
        path = path / "policy-eval.json"
    if not path.is_file():
        raise SystemExit(f"{spec}: no such file (give a policy-eval.json, its directory, or FILE:KEY)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path} is not JSON ({e}): give a policy-eval.json of tools/eval_feedback.py") from None
    if key is not None:
        if not isinstance(record, dict) or key not in record:
            keys = sorted(k for k, v in record.items() if isinstance(v, dict) and "rows" in v) \
                if isinstance(record, dict) else []
            raise SystemExit(f"{path} has no key {key!r}; the evaluations in it: {', '.join(keys) or 'none'}")
        record = record[key]
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or "sft" not in record:
        raise SystemExit(f"{spec} is not an evaluation of tools/eval_feedback.py (no 'sft' and 'rows')")
    return record


def _sft_rewards(record: dict[str, Any]) -> dict[str, float]:
    return {row["split"]: round(row["reward"], 5) for row in record["rows"] if row["name"] == "sft"}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise SystemExit(f"--out {out}: name a .png, .svg or .pdf file")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"--out {out} exists: choose another name or pass --overwrite")
    try:
        import matplotlib  # noqa: F401

        from dalle.feedback.plot import accuracy_kl_figure
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install -e \".[feedback]\"") from None
    records = [read_eval(s) for s in args.evals]
    first = records[0]
    for spec, r in zip(args.evals[1:], records[1:]):
        if r["sft"] != first["sft"] or ("prompts" in r and "prompts" in first and r["prompts"] != first["prompts"]):
            what = "supervised model" if r["sft"] != first["sft"] else "prompts"
            raise SystemExit(f"{spec} has other {what} than {args.evals[0]}: only evaluations of one supervised "
                             f"model and prompt set share an axis")
        # The same images scored the same (evaluations before 2026-12-07 did not record their prompts): else another
        # reward model, seed or prompt set.
        if _sft_rewards(r) != _sft_rewards(first):
            raise SystemExit(f"{spec} scores the supervised model's images otherwise than {args.evals[0]}: only "
                             f"evaluations with one reward model and seed share an axis")
    rows = [row for r in records for row in r["rows"]]
    present = list(dict.fromkeys(row["split"] for row in rows))
    splits = args.split or present
    missing = [s for s in splits if s not in present]
    if missing:
        raise SystemExit(f"--split {' '.join(missing)}: not in the evaluations (they have {', '.join(present)})")
    labels = {}
    for text in args.label:
        line, sep, name = text.partition("=")
        if not sep or not line or not name:
            raise SystemExit(f"--label expects LINE=TEXT, got {text!r}")
        labels[line] = name
    try:
        fig = accuracy_kl_figure(rows, splits, args.two_objects, args.title, labels)
    except ValueError as e:
        raise SystemExit(f"cannot plot: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
