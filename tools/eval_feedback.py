"""Evaluate policies tuned from feedback against the supervised model, judged by the shapes detector.

    python tools/eval_feedback.py --reward runs/reward --model dpo=runs/dpo --model grpo=runs/grpo \
        --exclude-store runs/fb.db --n 50 --out runs/eval-feedback

Rows: the supervised model's first sample, its best of N by the reward model (--best-of), its first sample
with classifier-free guidance (--sft-guided) or at another temperature (--sft-temperature), and each --model's
first sample; columns: KL from the supervised model (analytic for best-of-N, Monte Carlo for the rest), the
reward model's mean score of the kept images, all-correct per split (and on two-object prompts), and diversity
among --diversity samples per prompt. Writes OUT/policy-eval.md and OUT/policy-eval.json
(dalle/feedback/policy_eval.py says how each figure is made).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm

from dalle import cli
from dalle.cli import add_debug_flag, add_threads_flag, apply_threads, resolve_device


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or name.startswith("sft"):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR with a NAME not starting with 'sft', got {text!r}")
    return name, path


def parser() -> argparse.ArgumentParser:
    from dalle.pipeline import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--sft", default=str(DEFAULT_MODEL),
                   help="the supervised transformer, the KL reference (default: the shipped model)")
    p.add_argument("--reward", required=True, help="reward model (model or run directory) for best-of-N and scores")
    p.add_argument("--model", type=_named, action="append", default=[], metavar="NAME=DIR",
                   help="a fine-tuned transformer to evaluate (repeatable), e.g. dpo=runs/dpo")
    p.add_argument("--split", nargs="+", default=["train", "zeroshot"], choices=["train", "val", "zeroshot"],
                   help="shapes splits whose captions are the prompts")
    p.add_argument("--n", type=cli.positive_int, default=50, help="prompts per split")
    p.add_argument("--exclude-store", default=None,
                   help="a feedback store whose prompts are left out, so the prompts are held out from tuning")
    p.add_argument("--exclude-prompts", default=None,
                   help="a prompt file (one a line) left out too: the inputs.prompts a model was fine-tuned on")
    p.add_argument("--best-of", type=cli.positive_int, nargs="*", default=[4, 16, 64],
                   help="N of the best-of-N rows (none: no such rows)")
    p.add_argument("--diversity", type=cli.non_negative_int, default=16,
                   help="samples per prompt for diversity and the Monte-Carlo KL (0 or 1: no diversity)")
    p.add_argument("--judged", type=cli.positive_int, default=1,
                   help="draws per prompt the detector judges for the 'mean' columns: the first sample's accuracy "
                        "(and best of N's, over disjoint groups of N) averaged over this many draws, far less noisy "
                        "than one image a prompt (1: first sample only; the draws come from the --diversity and "
                        "--best-of samples, more are drawn if needed)")
    p.add_argument("--guided", type=cli.float_range(0.0), default=0.0, metavar="COND_SCALE",
                   help="also judge each first-sample row's --judged draws sampled with classifier-free guidance at "
                        "this cond scale, as generate.py --cond-scale does (0: no such column)")
    p.add_argument("--sft-guided", type=cli.float_range(0.0), nargs="*", default=[], metavar="COND_SCALE",
                   help="rows of the supervised model sampled with classifier-free guidance at these cond scales "
                        "(not 1), as policies on the same KL axis: their KL from the plain supervised model by Monte "
                        "Carlo with the exact guided log-probabilities (none: no such rows)")
    p.add_argument("--sft-temperature", type=cli.positive_float, nargs="*", default=[], metavar="T",
                   help="rows of the supervised model sampled at these temperatures (not 1), as policies on the same "
                        "KL axis, their KL by Monte Carlo as --sft-guided's; a fine-tuned model can be exactly such a "
                        "policy, so they show what one parameter buys (none: no such rows)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="candidate c of each prompt uses seed SEED + c")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="images sampled together")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_threads_flag(p)
    p.add_argument("--out", required=True, help="directory for policy-eval.md and policy-eval.json")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_debug_flag(p)
    return p


def _load(path: str, device: str):
    from dalle.pipeline import load_pipeline

    try:
        return load_pipeline(path, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load {path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    from dalle.checkpoint import load_pretrained, resolve_model_dir
    from dalle.feedback.policy_eval import EvalSettings, evaluate, held_out_prompts, markdown, reward_scorer, summary
    from dalle.tokenizer import TextTokenizer

    args = parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise SystemExit(f"--out {out} exists and is not empty: choose another or pass --overwrite")
    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        raise SystemExit(f"--model names must differ, got {names}")
    if 1.0 in args.sft_guided or 0.0 in args.sft_guided:
        raise SystemExit(f"--sft-guided scales must be above 0 and other than 1 (the plain sft row is always there), "
                         f"got {args.sft_guided}")
    if 1.0 in args.sft_temperature:
        raise SystemExit(f"--sft-temperature values must be other than 1 (the plain sft row is always "
                         f"there), got {args.sft_temperature}")
    apply_threads(args.threads)
    device = resolve_device(args.device)
    exclude: list[str] = []
    if args.exclude_store:
        from dalle.feedback.store import Store

        if not Path(args.exclude_store).is_file():
            raise SystemExit(f"--exclude-store {args.exclude_store} does not exist")
        store = Store(args.exclude_store)
        exclude = [r[0] for r in store.db.execute("SELECT text FROM prompts")]
        store.close()
    if args.exclude_prompts:
        try:
            exclude += cli.read_prompt_file(args.exclude_prompts, "--exclude-prompts")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    sft = _load(args.sft, device)
    try:
        reward_model = load_pretrained(args.reward, expect="reward", map_location=device).eval()
        tokenizer = TextTokenizer.from_file(resolve_model_dir(args.reward) / "tokenizer.json")
        prompts = {s: held_out_prompts(s, args.n, exclude, image_size=sft.dvae.config.image_size) for s in args.split}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot evaluate: {e}") from None
    settings = EvalSettings(best_of=tuple(args.best_of), diversity=args.diversity, seed=args.seed,
                            batch_size=args.batch_size, judged=args.judged, guided=args.guided,
                            sft_guided=tuple(args.sft_guided), sft_temperature=tuple(args.sft_temperature))
    bars: list[tqdm] = []

    def bar(desc: str, total: int):
        if bars:
            bars[-1].close()
        bars.append(tqdm(total=total, desc=desc, unit="prompt", disable=args.no_progress))
        return bars[-1].update

    policies = ((name, _load(path, device)) for name, path in args.model)  # one loaded at a time
    rows = evaluate(sft, policies, prompts, reward_scorer(reward_model, tokenizer), settings, bar)
    if bars:
        bars[-1].close()
    table = markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    record = {"sft": sft.model_id, "reward": str(args.reward), "models": dict(args.model),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "no_progress",
                                                                           "model", "debug")},
              "summary": summary(rows), "rows": rows,
              "prompts": {split: [p.caption for p in ps] for split, ps in prompts.items()}}
    (out / "policy-eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "policy-eval.md").write_text(f"Supervised model: {sft.model_id}, {args.n} prompts per split\n\n{table}")
    print(table, end="")
    return 0


if __name__ == "__main__":
    cli.run(main)
