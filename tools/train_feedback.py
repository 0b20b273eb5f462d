"""Learn from the comparisons of a feedback store (tools/feedback.py) with the shared engine.

    python tools/train_feedback.py reward --config configs/feedback/reward-shapes.yaml --out runs/reward
    python tools/train_feedback.py dpo --config configs/feedback/dpo-shapes.yaml --out runs/dpo
    python tools/train_feedback.py grpo --config configs/feedback/grpo-shapes.yaml --out runs/grpo
    python tools/train_feedback.py bon --config configs/feedback/bon-shapes.yaml --out runs/bon
    python tools/train_feedback.py evaluate --store runs/fb.db --reward runs/reward --rater sim25 --reference-rater sim0

reward: a reward model (Bradley-Terry) initialised from a trained reranker or transformer (model.body: reranker,
        transformer, or reader = the reading transformer's own log p(prompt | image); inputs.init).
dpo: Direct Preference Optimisation of the transformer on its own compared samples, against a frozen copy of it.
grpo: policy gradient against the reward model on the store's prompts (or a prompt file: inputs.prompts), with the
      per-token KL penalty to the start.
bon: best-of-N distillation: learn the reward model's pick of N samples of the supervised model per prompt
     (objective.loss=dpo: DPO between the pick and the lowest-scored of the N).
     For grpo and bon, inputs.reward=gold:shapes puts the shapes detector's verdict in place of the reward model
     (an experiment's upper bound: the evaluation judges by the same detector).
evaluate: held-out pairwise accuracy of a reward model, of the raw reranker's similarity, and the noise ceiling
(the rater's agreement with a reference rater on the same pairs). Re-running a training command after a crash
continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.cli import add_debug_flag, apply_threads, resolve_device
from dalle.feedback.reward import RewardConfig
from dalle.train.cli import load_sections, run_training, setup_logging, training_parser
from dalle.train.config import TrainConfig
from dalle.train.tasks.bon import BoNObjective
from dalle.train.tasks.dpo import DPOInputs, DPOObjective
from dalle.train.tasks.grpo import GRPOInputs, GRPOObjective
from dalle.train.tasks.reward import RewardInputs, RewardObjective

SECTIONS = {
    "reward": {"model": RewardConfig, "objective": RewardObjective, "train": TrainConfig, "inputs": RewardInputs},
    "dpo": {"objective": DPOObjective, "train": TrainConfig, "inputs": DPOInputs},
    "grpo": {"objective": GRPOObjective, "train": TrainConfig, "inputs": GRPOInputs},
    "bon": {"objective": BoNObjective, "train": TrainConfig, "inputs": GRPOInputs},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    sub = p.add_subparsers(dest="method", required=True)
    fmt = cli.HelpFormatter
    for name, what in (("reward", "train a reward model on the store's comparisons"),
                       ("dpo", "fine-tune the transformer on its compared samples with DPO"),
                       ("grpo", "fine-tune the transformer against a reward model (per-token KL penalty)"),
                       ("bon", "fine-tune the transformer on the reward model's best of N of its samples")):
        sub.add_parser(name, parents=[training_parser(what)], add_help=False, formatter_class=fmt, help=what,
                       description=what + ". Config sections: " + ", ".join(SECTIONS[name]))
    e = sub.add_parser("evaluate", formatter_class=fmt, help="held-out accuracy: reward model, raw reranker, ceiling")
    e.add_argument("--store", required=True, help="the comparisons store the reward model was trained on")
    e.add_argument("--reward", default=None, help="reward model (model or run directory; a run's best checkpoint)")
    e.add_argument("--reranker", default=None,
                   help="reranker whose raw similarity is the baseline (default: the shipped model's)")
    e.add_argument("--rater", default="", help="the rater whose held-out labels are predicted ('': all)")
    e.add_argument("--reference-rater", default="", help="rater the noise ceiling is measured against (noiseless)")
    e.add_argument("--val-fraction", type=float, default=None,
                   help="held-out share of prompts (default: the reward run's run.json, else 0.2)")
    e.add_argument("--split-seed", type=int, default=None,
                   help="seed of the held-out split (default: the reward run's run.json, else 0)")
    e.add_argument("--by-cause", action="store_true",
                   help="shapes stores: split each accuracy by what decided a pair for the detector (all correct, "
                        "checks right, its confidence only), and give the accuracy of a scorer that knows each "
                        "image's correctness exactly but not the confidence")
    e.add_argument("--sampled-by", default="", metavar="MODEL_ID",
                   help="only held-out pairs of this model's samples (a model id as the store records it, e.g. a "
                        "fine-tuned policy's, sampled into the store and rated); '': every pair")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--threads", type=cli.non_negative_int, default=0, help="CPU threads for torch (0: auto)")
    e.add_argument("--json", default=None, help="also write the figures to this JSON file (refused if it exists)")
    return p


def _open_store(path: str):
    from dalle.feedback.store import Store

    if not path:
        raise SystemExit("inputs.store is not set: point it to the store of tools/feedback.py")
    if not Path(path).is_file():
        raise SystemExit(f"the store {path} does not exist: make one with tools/feedback.py sample")
    try:
        return Store(path)
    except Exception as e:  # sqlite3.DatabaseError (not a database), OSError
        raise SystemExit(f"cannot open the store {path}: {e}") from None


def _load(path: str, expect: str, device: str):
    from dalle.checkpoint import load_pretrained, resolve_model_dir
    from dalle.tokenizer import TextTokenizer

    try:
        model = load_pretrained(path, expect=expect, map_location=device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load {path}: {e}") from None
    folder = resolve_model_dir(path)
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"{folder} has no tokenizer.json; copy the one the model was trained with")
    return model, TextTokenizer.from_file(folder / "tokenizer.json"), folder


def _reward(args: argparse.Namespace, cfg: dict) -> int:
    from dalle.feedback.reward import RewardModel, body_field
    from dalle.train.tasks.reward import RewardTask

    inputs: RewardInputs = cfg["inputs"]
    store = _open_store(inputs.store)
    if not inputs.init:
        raise SystemExit("inputs.init is not set: a reward model starts from a trained reranker or transformer")
    body = cfg["model"].body
    expect = "reranker" if body == "reranker" else "dalle"
    init, tokenizer, _ = _load(inputs.init, expect, "cpu")
    try:
        cfg["model"] = dataclasses.replace(cfg["model"], **{body_field(body): init.config})
    except ValueError as e:
        raise SystemExit(f"inputs.init {inputs.init}: {e}") from None
    model = RewardModel(cfg["model"])
    model.load_body(init)
    try:
        task = RewardTask(model, cfg["objective"], tokenizer, store)
    except ValueError as e:
        raise SystemExit(f"cannot train the reward model: {e}") from None
    return run_training(task, cfg, args, f"reward model on the {body}: {len(task.train)} training comparisons, "
                                         f"{len(task.val_judgements)} held out")


def _dpo(args: argparse.Namespace, cfg: dict) -> int:
    from dalle.train.tasks.dpo import DPOTask

    inputs: DPOInputs = cfg["inputs"]
    store = _open_store(inputs.store)
    if not inputs.init:
        raise SystemExit("inputs.init is not set: DPO starts from the supervised transformer that made the samples")
    model, tokenizer, folder = _load(inputs.init, "dalle", "cpu")
    try:
        task = DPOTask(model.train(), cfg["objective"], tokenizer, store, _dvae(folder))
    except ValueError as e:
        raise SystemExit(f"cannot fine-tune: {e}") from None
    return run_training(task, cfg, args, f"DPO (beta {cfg['objective'].beta}) of {folder}: {len(task.train)} training "
                                         f"pairs, {len(task.val_judgements)} held out")


def _dvae(folder: Path) -> str:
    from dalle.pipeline import find_dvae

    try:
        return str(find_dvae(folder, None).resolve())
    except FileNotFoundError:
        return ""


def _prompts(inputs: GRPOInputs) -> list[str]:
    """inputs.prompts' lines where set, else the store's prompts."""
    if not inputs.prompts:
        store = _open_store(inputs.store)
        return [r[0] for r in store.db.execute("SELECT text FROM prompts ORDER BY id")]
    try:
        return list(dict.fromkeys(cli.read_prompt_file(inputs.prompts, "inputs.prompts", required=True)))  # each once
    except ValueError as e:
        raise SystemExit(str(e)) from None


GOLD = "gold:shapes"  # inputs.reward naming the shapes detector's verdict instead of a reward model


def _sampling(args: argparse.Namespace, cfg: dict) -> int:
    """GRPO and best-of-N distillation: the policy samples the store's prompts (or inputs.prompts') and a frozen
    reward model scores."""
    from dalle.checkpoint import load_pretrained
    from dalle.train.tasks.bon import BoNTask
    from dalle.train.tasks.grpo import GRPOTask

    inputs: GRPOInputs = cfg["inputs"]
    if not inputs.init or not inputs.reward:
        raise SystemExit("inputs.init and inputs.reward must be set: the supervised transformer and the reward model")
    prompts = _prompts(inputs)
    model, tokenizer, folder = _load(inputs.init, "dalle", "cpu")
    if inputs.reward == GOLD:
        from dalle.feedback.raters import ShapesGoldReward

        try:
            reward, reward_tokenizer = ShapesGoldReward(prompts), None
        except ValueError as e:
            raise SystemExit(f"inputs.reward {GOLD}: {e}") from None
    else:
        reward, reward_tokenizer, _ = _load(inputs.reward, "reward", "cpu")
    dvae_path = _dvae(folder)
    dvae = load_pretrained(dvae_path, expect="dvae") if dvae_path else None
    o = cfg["objective"]
    task_class = GRPOTask if args.method == "grpo" else BoNTask
    try:
        task = task_class(model.train(), o, tokenizer, prompts, reward, reward_tokenizer, dvae, dvae_path)
    except ValueError as e:
        raise SystemExit(f"cannot fine-tune: {e}") from None
    if args.method == "grpo":
        what = f"GRPO (beta {o.beta}, groups of {o.group_size})"
    else:
        guided = f", guided at cond scale {o.cond_scale:g}" if o.cond_scale != 1 else ""
        source = f"candidates from the {o.source}{guided}"
        pairs = "the best and worst" if o.dpo_pairs == 1 else f"the {o.dpo_pairs} best against the {o.dpo_pairs} worst"
        if o.loss == "nll":
            what = f"best-of-{o.n} distillation ({source})"
        else:
            extra = (", the rejected from n unguided draws" if o.rejected == "unguided" else "") \
                + (f", and {o.unguided_pairs} more from n unguided draws" if o.unguided_pairs else "") \
                + (f", caption-free KL weight {o.uncond_kl:g}" if o.uncond_kl else "") \
                + (f", guidance at cond scale {o.distill_cond_scale:g} distilled with weight {o.distill_guidance:g}"
                   if o.distill_guidance else "")
            what = f"DPO on {pairs} of {o.n} (dpo_beta {o.dpo_beta}, {source}{extra})"
    return run_training(task, cfg, args, f"{what} of {folder} on {len(task.train)} prompts")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.method == "evaluate":
        from dalle.feedback.evaluate import evaluate_command

        apply_threads(args.threads)
        store = _open_store(args.store)
        figures = evaluate_command(store, args, resolve_device(args.device))
        for k, v in figures.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        if args.json:
            if Path(args.json).exists():
                raise SystemExit(f"--json {args.json} exists: choose another name")
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        return 0
    setup_logging(args.log_level)
    apply_threads(args.threads)
    cfg = load_sections(args, SECTIONS[args.method])
    return {"reward": _reward, "dpo": _dpo, "grpo": _sampling, "bon": _sampling}[args.method](args, cfg)


if __name__ == "__main__":
    cli.run(main)
