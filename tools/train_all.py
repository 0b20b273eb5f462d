"""Train every stage on a folder or webdataset of captioned images, sized to the data and a time budget.

    python tools/train_all.py --data data/mine --out runs/mine --budget 1h --prompt "a red heart"
    python tools/train_all.py --data shapes --recipe shapes --out runs/default --dtype fp16   # the default model

Stages (docs/own-data.md), each recorded in RUN/state.json when it completes and skipped when the command
runs again; an interrupted training stage resumes from its last checkpoint:

  split        RUN/data/train, RUN/data/val: a held-out tenth (8 to 1000 images) picked by a hash of each key
               (the shapes world has its own `val` split: nothing to copy)
  bpe          RUN/tokenizer.json from the training captions
  plan         RUN/configs/{dvae,dalle,reranker}.yaml: the recipe sized to the data and the budget, or the
               named configs (--recipe shapes: configs/*/shapes.yaml) with this run's paths filled in
  dvae         RUN/dvae            (tools/train_dvae.py)
  pretokenize  RUN/tok-train, RUN/tok-val (tools/pretokenize.py)
  dalle        RUN/dalle           (tools/train_dalle.py)
  reranker     RUN/reranker        (tools/train_reranker.py)
  bundle       RUN/model: generate.py --model RUN/model
  evaluate     RUN/eval: reconstruction PSNR, FID with its floor and ceiling, sample grids (and, on the
               shapes world, compositional accuracy by tools/eval_shapes.py)
  report       RUN/report.md and its images

The recipe is planned once, on the first run; later runs keep it, so a resumed run finishes the same plan.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.cli import add_threads_flag, apply_threads

STAGES = ("split", "bpe", "plan", "dvae", "pretokenize", "dalle", "reranker", "bundle", "evaluate", "report")
# Shares of the budget each stage is planned to take (the three trainings' shares are dalle.train.recipe's).
PLANNED = {"split": 0.01, "bpe": 0.01, "plan": 0.02, "dvae": 0.40, "pretokenize": 0.02, "dalle": 0.36,
           "reranker": 0.12, "bundle": 0.0, "evaluate": 0.06, "report": 0.0}
MIN_IMAGES = 20  # 8 are held out; fewer leaves too little to train on
SHAPES_SCENES = 40_000  # training scenes of `--data shapes`: the default model's


def shapes_scenes(data: str) -> int | None:
    """`shapes` or `shapes:N` -> N training scenes of the built-in shapes world; None for anything else."""
    if data == "shapes":
        return SHAPES_SCENES
    if data.startswith("shapes:"):
        n = data.split(":", 1)[1]
        if not n.isdigit() or int(n) < MIN_IMAGES:
            raise SystemExit(f"--data {data}: write shapes:N with N >= {MIN_IMAGES} training scenes, e.g. shapes:40000")
        return int(n)
    return None


def fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def data_source(data: str) -> str:
    """folder or webdataset (`shapes` is told apart before), or a one-line error saying what --data should be."""
    if Path(data).is_dir():
        return "folder"
    if ".tar" in data:
        from dalle.data.readers import expand_shard_urls

        try:
            urls = expand_shard_urls(data)
        except ValueError as e:
            raise SystemExit(f"--data {data}: {e}") from None
        missing = [u for u in urls if not Path(u).is_file()]
        if not missing:
            return "webdataset"
        raise SystemExit(f"--data {data}: shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing)")
    raise SystemExit(f"--data {data}: no such folder; pass a folder of name.jpg + name.txt pairs, a shard "
                     "pattern such as 'shards/shard-{000000..000009}.tar', or shapes (the built-in world)")


class Run:
    """RUN/state.json: what the command was given, what each stage measured, how long each took."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.dir, self.file = out, out / "state.json"
        data = args.data if args.shapes_scenes is not None else os.path.abspath(args.data)
        if self.file.is_file():
            self.state = json.loads(self.file.read_text())
            if self.state["data"] != data:
                raise SystemExit(f"{out} was started on {self.state['data']}: run it with that --data, "
                                 "or pick a new --out")
        elif out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} exists and is not a train_all run (no state.json): pick a new --out")
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.state = {"data": data, "budget": args.budget, "recipe": args.recipe, "stages": {}}
            self.save()

    def save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        os.replace(tmp, self.file)

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def elapsed(self) -> float:
        return sum(s["seconds"] for s in self.state["stages"].values())

    def left(self, budget_s: float) -> float:
        planned = {k: v * budget_s for k, v in PLANNED.items()} | self.state.get("planned_seconds", {})
        return sum(planned[s] for s in STAGES if not self.done(s))

    def finish(self, stage: str, seconds: float, **info: object) -> None:
        self.state["stages"][stage] = {"seconds": round(seconds, 1), **info}
        self.save()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from dalle.data.transforms import PREPROCESS_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--data", required=True,
                   help="a folder of name.jpg|png|webp + name.txt pairs (recursive), a webdataset shard pattern, or "
                        f"shapes[:N] (the built-in shapes world: N training scenes pre-tokenised for the transformer, "
                        f"{SHAPES_SCENES} by default, the dVAE and reranker drawing as many as their configs say; "
                        "write ./shapes for a folder of that name)")
    p.add_argument("--out", required=True, help="run directory: every stage's output, state.json and report.md")
    p.add_argument("--budget", default="1h",
                   help="time for the whole run (45m, 1h, 1h30m, 600s): sizes the image size, models and steps")
    p.add_argument("--recipe", default="sized",
                   help="sized: plan the models and steps from the data and --budget; or the name of config files "
                        "to train as they are (shapes: configs/{dvae,dalle,reranker}/shapes.yaml), --budget unused")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the bundled weights in RUN/model (fp16 halves the size, as in the shipped model)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a free prompt for the report's sample grid (repeatable)")
    p.add_argument("--preprocess", default="paper", choices=PREPROCESS_MODES,
                   help="paper: random crops by the paper's listings in training; center: the centre square "
                        "resized, never cut (icons, logos, whole-frame images)")
    p.add_argument("--background", default="white",
                   help="colour transparent images are composited over (a name or #rrggbb)")
    p.add_argument("--max-steps", type=cli.non_negative_int, default=0,
                   help="cap each training stage's steps (0: as the budget allows); for a quick trial")
    p.add_argument("--until", choices=STAGES, default="report", help="stop after this stage")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the held-out split and of the samples")
    p.add_argument("--no-progress", action="store_true", help="hide the stages' progress bars")
    add_threads_flag(p)
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    from dalle.data.transforms import parse_background
    from dalle.train.recipe import parse_budget

    try:
        args.budget_s = parse_budget(args.budget)
        parse_background(args.background)
    except ValueError as e:
        p.error(str(e))
    if args.recipe != "sized":
        from dalle.train.recipe import named_recipe_files

        try:
            missing = [str(f) for f in named_recipe_files(args.recipe) if not f.is_file()]
        except ValueError as e:
            p.error(str(e))
        if missing:
            p.error(f"--recipe {args.recipe}: {missing[0]} does not exist; use sized or a name with a config file "
                    "for each of dvae, dalle and reranker under configs/")
    return args


def stage_functions() -> dict:
    """tools/train_all_stages.py, as a package module (installed: dalle_tools) or beside this script."""
    if __package__:
        return importlib.import_module(f"{__package__}.train_all_stages").STAGE_FUNCTIONS
    import train_all_stages

    return train_all_stages.STAGE_FUNCTIONS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    functions = stage_functions()
    apply_threads(args.threads)
    args.shapes_scenes = shapes_scenes(args.data)
    source = "shapes" if args.shapes_scenes is not None else data_source(args.data)
    run = Run(Path(args.out), args)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python tools/train_all.py", *map(shlex.quote, given)])
    commands = run.state.setdefault("commands", [])
    if not commands or commands[-1] != command:  # the same command again is a resume, not news
        commands.append(command)
    run.save()
    if run.state.get("recipe", "sized") != args.recipe and run.done("plan"):
        raise SystemExit(f"{args.out} was planned with --recipe {run.state.get('recipe', 'sized')}: run it with that "
                         "recipe, or pick a new --out")
    if run.state["budget"] != args.budget and run.done("plan") and args.recipe == "sized":
        print(f"note: {args.out} was planned for a {run.state['budget']} budget; the plan is kept "
              f"(delete {args.out} to plan again)")
    t_start = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        if i > STAGES.index(args.until) + 1:
            break
        if run.done(stage):
            continue
        left = f", about {fmt(run.left(args.budget_s))} left" if args.recipe == "sized" else ""
        print(f"[{i}/{len(STAGES)} {stage}] elapsed {fmt(run.elapsed())}{left}", flush=True)
        t0 = time.perf_counter()
        info = functions[stage](run, args, source) or {}
        run.finish(stage, time.perf_counter() - t0 + info.pop("earlier_seconds", 0.0), **info)
    print(f"done in {fmt(time.perf_counter() - t_start)} this time ({fmt(run.elapsed())} in all): "
          + (f"see {Path(args.out) / 'report.md'}" if run.done("report") else f"stopped after {args.until}"))
    return 0


if __name__ == "__main__":
    cli.run(main)
