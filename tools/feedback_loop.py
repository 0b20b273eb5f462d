"""The whole feedback loop on shapes prompts in one command, with the simulated rater in place of people.

    python tools/feedback_loop.py --out runs/loop --prompts 50 --pairs-per-prompt 2 --threads 1 \
        --set dpo.train.steps=40 --set grpo.train.steps=20

Stages, each the existing command run in this process, each skipped once its output is complete (a marker
in OUT/done/), so re-running the same command after a crash continues where it stopped (the training
stages resume from their last checkpoint, as the engine does; one that finished is refused if its config or
--set values have changed since):

    sample     pairs of the model's samples of the first --prompts shapes train captions  OUT/fb.db
    simulate   the simulated rater (--noise of decided labels flipped) judges every pair   rater "sim"
    reward     a reward model on those judgements (--reward-config)                        OUT/reward
    dpo, grpo  fine-tuning of the model (--dpo-config, --grpo-config; --methods)           OUT/dpo, OUT/grpo
    bon        best-of-N distillation (only with --methods bon; --bon-config; online DPO   OUT/bon
               with --bon-config configs/feedback/bon-online-dpo-shapes.yaml)
    round R    with --rounds > 1, DPO again: pairs of the same prompts sampled from the     OUT/fb-rR.db
               previous round's model, rated by the same rater, DPO from that model (its    OUT/dpo-rR
               reference), for R = 2 .. --rounds
    evaluate   tools/eval_feedback.py on held-out prompts (not in the store)               OUT/eval
               and its curve of accuracy and reward against KL (tools/plot_feedback.py)    OUT/eval/accuracy-kl.png

Config values of a training stage are changed with --set STAGE.SECTION.KEY=VALUE (e.g.
--set reward.train.steps=50); the loop itself sets each stage's inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.cli import add_debug_flag, add_threads_flag, apply_threads

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "feedback"
METHODS = ("dpo", "grpo", "bon")
DEFAULT_METHODS = ("dpo", "grpo")  # bon samples n images per prompt in every step: asked for by name
# What the store is made from: a run started with other values cannot continue with these.
DATA_SETTINGS = ("model", "prompts", "pairs_per_prompt", "noise", "seed")


class _Formatter(cli.HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flags' help, and the epilog's table of stages as written."""


def _override(text: str) -> tuple[str, str]:
    stage, _, rest = text.partition(".")
    if stage not in ("reward", *METHODS) or "=" not in rest or "." not in rest.split("=")[0]:
        raise argparse.ArgumentTypeError(f"expected STAGE.SECTION.KEY=VALUE with STAGE reward, dpo, grpo or bon, "
                                         f"got {text!r}")
    return stage, rest


def parser() -> argparse.ArgumentParser:
    from dalle.pipeline import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=_Formatter)
    p.add_argument("--out", required=True, help="run directory: the store, each stage's run, the evaluation")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="the supervised transformer the loop starts from (default: the shipped model)")
    p.add_argument("--reranker", default=None,
                   help="reranker the reward model starts from (default: the model's reranker/ folder); with "
                        "--set reward.model.body=transformer or reader it starts from --model instead")
    p.add_argument("--prompts", type=cli.positive_int, default=50, help="shapes train captions sampled")
    p.add_argument("--pairs-per-prompt", type=cli.positive_int, default=2, help="pairs sampled for each prompt")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="images sampled together")
    p.add_argument("--noise", type=cli.float_range(0.0, 0.5), default=0.25,
                   help="share of the simulated rater's decided labels flipped (0.25: human agreement)")
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="fine-tuning methods run")
    p.add_argument("--rounds", type=cli.positive_int, default=1,
                   help="DPO rounds: each after the first learns from pairs sampled from the previous round's model "
                        "(on-policy), with that model as its reference; every round is evaluated")
    for stage in ("reward", *METHODS):
        p.add_argument(f"--{stage}-config", default=str(CONFIGS / f"{stage}-shapes.yaml"),
                       help=f"config of the {stage} stage (default: configs/feedback/{stage}-shapes.yaml)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="STAGE.SECTION.KEY=VALUE", help="change one config value of a training stage (repeatable)")
    p.add_argument("--eval-n", type=cli.positive_int, default=20, help="held-out prompts per split evaluated")
    p.add_argument("--best-of", type=cli.positive_int, nargs="*", default=[4, 16, 64], help="N of best-of-N rows")
    p.add_argument("--diversity", type=cli.non_negative_int, default=16, help="samples per prompt for diversity")
    p.add_argument("--judged", type=cli.positive_int, default=1,
                   help="draws per prompt the evaluation's detector judges for its averaged columns (1: first only)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the samples and of the rater's noise")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_debug_flag(p)
    return p


def _settings(args: argparse.Namespace, out: Path) -> None:
    """Record the data settings; refuse to continue a run made with others."""
    mine = {k: getattr(args, k) for k in DATA_SETTINGS}
    path = out / "loop.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in DATA_SETTINGS if before.get(k) != mine[k])
        if changed:
            raise SystemExit(f"{out} was started with other {', '.join(changed)}: use another --out, or the same "
                             "values")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2) + "\n")


def _stage(out: Path, name: str, run, key: str = "", trained: bool = False) -> None:
    """Run a stage unless its marker says it completed with the same `key` (what its output depends on). A
    training stage (`trained`) that completed with another key is refused: run again, the engine would resume
    its finished run and change nothing, leaving the old model under the new settings' name."""
    marker = out / "done" / name
    done = marker.read_text() if marker.is_file() else None
    if done == key or (trained and done == ""):  # "": a marker from before training stages had keys
        print(f"[{name}] done before, skipped", flush=True)
        return
    if trained and done is not None:
        raise SystemExit(f"stage {name} finished with another config or --set: use another --out, or delete "
                         f"{marker} to continue its run from the last checkpoint with the new settings (and "
                         f"{out / name} as well to train it anew)")
    print(f"[{name}]", flush=True)
    code = run()
    if code:
        raise SystemExit(f"stage {name} failed (exit code {code})")
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(key)


def _sample(args: argparse.Namespace, store: Path, model: str, seed: int) -> int:
    from dalle_tools import feedback

    for leftover in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):  # an interrupted sampling: start again
        leftover.unlink(missing_ok=True)
    return feedback.main(["sample", "--store", str(store), "--shapes", "train", "--n", str(args.prompts),
                          "--pairs-per-prompt", str(args.pairs_per_prompt), "--model", model, "--seed",
                          str(seed), "--batch-size", str(args.batch_size), "--device", args.device,
                          "--threads", str(args.threads)]
                         + (["--no-progress"] if args.no_progress else []))


def _simulate(args: argparse.Namespace, store: Path, seed: int) -> int:
    from dalle_tools import feedback

    return feedback.main(["simulate", "--store", str(store), "--rater", "sim", "--noise", str(args.noise),
                          "--seed", str(seed)])


def _train(args: argparse.Namespace, out: Path, stage: str, sets: dict[str, object], run: str = "") -> None:
    """A training stage (its run and marker named `run`, by default `stage`) through `_stage`, keyed by its config
    file's text and every value set on it."""
    from dalle_tools import train_feedback

    sets = [f"{k}={v}" for k, v in sets.items()] + [v for s, v in args.overrides if s == stage]
    config = getattr(args, f"{stage}_config")
    try:
        text = Path(config).read_text()
    except OSError as e:
        raise SystemExit(f"cannot read the {stage} stage's config {config}: {e.strerror}") from None
    run = run or stage
    argv = [stage, "--config", config, "--out", str(out / run),
            "--device", args.device, "--threads", str(args.threads)] + [x for s in sets for x in ("--set", s)]
    argv += ["--no-progress"] if args.no_progress else []
    _stage(out, run, lambda: train_feedback.main(argv), key=json.dumps({"config": text, "set": sets}), trained=True)


def _reward_init(args: argparse.Namespace, reranker: str) -> str:
    """What the reward stage starts from: the reranker for its reranker body, else (transformer, reader) --model."""
    from dalle.train.config import apply_overrides, load_yaml

    try:
        cfg = apply_overrides(load_yaml(args.reward_config), [v for s, v in args.overrides if s == "reward"])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot read the reward stage's config: {e}") from None
    return reranker if (cfg.get("model") or {}).get("body", "reranker") == "reranker" else args.model


def main(argv: list[str] | None = None) -> int:
    from dalle_tools import eval_feedback, plot_feedback

    args = parser().parse_args(argv)
    if args.rounds > 1 and "dpo" not in args.methods:
        raise SystemExit(f"--rounds {args.rounds} repeats DPO, but --methods leaves it out: add dpo, or drop --rounds")
    apply_threads(args.threads)
    out = Path(args.out)
    _settings(args, out)
    store = out / "fb.db"
    reranker = args.reranker or str(Path(args.model) / "reranker")
    _stage(out, "sample", lambda: _sample(args, store, args.model, args.seed))
    _stage(out, "simulate", lambda: _simulate(args, store, args.seed))
    _train(args, out, "reward", {"inputs.store": store, "inputs.init": _reward_init(args, reranker),
                                 "objective.rater": "sim"})
    for method in args.methods:
        sets = {"inputs.store": store, "inputs.init": args.model}
        sets |= {"inputs.reward": out / "reward"} if method != "dpo" else {"objective.rater": "sim"}
        _train(args, out, method, sets)
    dpo_runs = ["dpo"] + [f"dpo-r{r}" for r in range(2, args.rounds + 1)]
    for r, (before, run) in enumerate(zip(dpo_runs, dpo_runs[1:]), start=2):
        store_r, seed = out / f"fb-r{r}.db", args.seed + 1000 * (r - 1)  # new seeds as well as a new model
        _stage(out, f"sample-r{r}", partial(_sample, args, store_r, str(out / before), seed))
        _stage(out, f"simulate-r{r}", partial(_simulate, args, store_r, seed))
        sets = {"inputs.store": store_r, "inputs.init": out / before, "objective.rater": "sim"}
        _train(args, out, "dpo", sets, run)
    tuned = [run for m in args.methods for run in (dpo_runs if m == "dpo" else [m])]
    models = [x for m in tuned for x in ("--model", f"{m}={out / m}")]
    evaluation = ["--sft", args.model, "--reward", str(out / "reward"), *models, "--exclude-store", str(store),
                  "--n", str(args.eval_n), "--best-of", *map(str, args.best_of), "--diversity", str(args.diversity),
                  "--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads),
                  "--out", str(out / "eval"), "--overwrite"] + (["--no-progress"] if args.no_progress else []) \
        + (["--judged", str(args.judged)] if args.judged > 1 else [])  # absent at 1: earlier runs' stage keys hold
    _stage(out, "evaluate", lambda: eval_feedback.main(evaluation), key=json.dumps(evaluation))
    print(f"table: {out / 'eval' / 'policy-eval.md'}")
    figure = out / "eval" / "accuracy-kl.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"figure: not drawn, matplotlib is not installed (pip install -e \".[feedback]\", then python "
              f"tools/plot_feedback.py {out / 'eval'} --out {figure})")
    else:
        plot_feedback.main([str(out / "eval"), "--out", str(figure), "--overwrite"])
    return 0


if __name__ == "__main__":
    cli.run(main)
