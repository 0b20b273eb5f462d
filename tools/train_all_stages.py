"""The stages of tools/train_all.py: each calls the stage's own tool (its `main(argv)`) or the library,
and returns what it measured for RUN/state.json. Writing the report is in tools/train_all_report.py."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import yaml
from PIL import Image

from dalle.train import recipe as recipes

MIN_IMAGES = 20


def _tool(name: str):
    import importlib

    package = __package__ or ""
    return importlib.import_module(f"{package}.{name}" if package else name)


def _common(args, stage_name: str | None = None) -> list[str]:
    flags = ["--threads", str(args.threads)]
    return flags + (["--no-progress"] if args.no_progress and stage_name in ("train", "fid") else [])


def _paths(run) -> dict:
    d = run.dir
    return {"train": run.state["split"]["train"], "val": run.state["split"]["val"],
            "tokenizer": str(d / "tokenizer.json"), "dvae": str(d / "dvae"), "tok_train": str(d / "tok-train"),
            "tok_val": str(d / "tok-val"), "dalle": str(d / "dalle"), "reranker": str(d / "reranker"),
            "model": str(d / "model"), "eval": str(d / "eval")}


def split(run, args, source) -> dict:
    from dalle.data.split import split_folder, split_shards

    if source == "shapes":  # generated on the fly: its `train` and `val` splits are disjoint by construction
        n_train = args.shapes_scenes
        n_val = min(1024, max(8, n_train // 10))
        run.state["split"] = {"source": "shapes", "train": "", "val": "", "captions": "", "n_train": n_train,
                              "n_val": n_val, "skipped": 0, "side": 64}
        print(f"shapes world: {n_train} training scenes and {n_val} held-out ones (its `val` split)")
        return {"n_train": n_train, "n_val": n_val}

    out = run.dir / "data"
    if out.exists():  # an interrupted split: make it again, it only links or re-packs
        shutil.rmtree(out)
    try:
        record = (split_folder(args.data, out, args.seed) if source == "folder"
                  else split_shards(args.data, out, args.seed))
    except ValueError as e:
        raise SystemExit(f"--data {args.data}: {e}") from None
    n_train, n_val = len(record["train_keys"]), len(record["val_keys"])
    if n_train + n_val < MIN_IMAGES:
        shutil.rmtree(out)
        raise SystemExit(f"--data {args.data}: found {n_train + n_val} captioned images; train_all needs at "
                         f"least {MIN_IMAGES} (8 are held out)")
    (run.dir / "split.json").write_text(json.dumps(record, indent=1) + "\n")
    side = _typical_side(record, source)
    run.state["split"] = {"source": source, "train": record["train"], "val": record["val"],
                          "captions": record.get("captions", ""), "n_train": n_train, "n_val": n_val,
                          "skipped": record["skipped"], "side": side}
    print(f"{n_train} training and {n_val} held-out images (recorded in {run.dir / 'split.json'}); "
          f"typical shorter side {side} pixels")
    return {"n_train": n_train, "n_val": n_val}


def _typical_side(record: dict, source: str, n: int = 256) -> int:
    """The median shorter side of up to n training images (headers only for a folder)."""
    sides = []
    if source == "folder":
        root = Path(record["train"])
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[:n]:
            with Image.open(path) as im:
                sides.append(min(im.size))
    else:
        import io

        from dalle.data.readers import IMAGE_EXTENSIONS, expand_shard_urls
        from dalle.data.split import shard_samples

        for sample in shard_samples(expand_shard_urls(record["train"])):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    sides.append(min(im.size))
            if len(sides) >= n:
                break
    return int(statistics.median(sides)) if sides else 32


def _shapes_bpe_captions(n_train: int) -> int:
    """Captions the shapes BPE learns from: the default model's 100,000 at 40,000 scenes, fewer for a trial."""
    return min(100_000, max(2_000, 5 * n_train // 2))


def _caption_lines(run) -> list[str]:
    s = run.state["split"]
    if s["source"] == "shapes":
        from dalle.data.shapes import make_sample

        return [make_sample(i, "train", 0, 64).caption for i in range(min(2_000, s["n_train"]))]
    if s["source"] == "folder":
        files = sorted(Path(s["train"]).rglob("*.txt"))
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    else:
        text = Path(s["captions"]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def bpe(run, args, source) -> dict:
    s, p = run.state["split"], _paths(run)
    images = s["n_train"] + s["n_val"]
    vocab = 1024 if images < 10_000 else 4096 if images < 100_000 else 16384
    Path(p["tokenizer"]).unlink(missing_ok=True)
    if s["source"] == "shapes":  # the default model's tokenizer: shapes captions and questions, room for any vocabulary
        _tool("train_bpe").main(["--shapes", str(_shapes_bpe_captions(s["n_train"])), "--questions", "--vocab",
                                 "16384", "--out", p["tokenizer"], "--overwrite"])
        return {"vocab": 16384}
    where = ["--folder", s["train"]] if s["source"] == "folder" else ["--captions", s["captions"]]
    _tool("train_bpe").main([*where, "--vocab", str(vocab), "--out", p["tokenizer"], "--overwrite"])
    return {"vocab": vocab}


def plan(run, args, source) -> dict:
    from dalle.tokenizer import TextTokenizer

    s, p = run.state["split"], _paths(run)
    tok = TextTokenizer.from_file(p["tokenizer"])
    lengths = [len(tok.encode(c)) for c in _caption_lines(run)]
    data = {"source": s["source"], "train": s["train"], "val": s["val"], "tokenizer": p["tokenizer"],
            "dvae": p["dvae"], "tok_train": p["tok_train"], "tok_val": p["tok_val"], "prompts": args.prompt[:6],
            "background": args.background, "preprocess": args.preprocess}
    if args.recipe != "sized":
        return _plan_named(run, args, recipes.named(args.recipe, data), lengths)
    cfgs = recipes.plan(images=s["n_train"] + s["n_val"], n_train=s["n_train"], n_val=s["n_val"], side=s["side"],
                        caption_lengths=lengths, budget_s=args.budget_s, data=data)
    print("timing a few training steps of each model on this machine ...", flush=True)
    step_s = {"dvae": recipes.probe_dvae(cfgs["dvae"]),
              "dalle": recipes.probe_dalle(cfgs["dalle"], tok.vocab_size),
              "reranker": recipes.probe_reranker(cfgs["reranker"], tok.vocab_size)}
    steps = {}
    for kind, cfg in cfgs.items():
        steps[kind] = recipes.steps_for(recipes.SHARES[kind] * args.budget_s, step_s[kind])
        if args.max_steps:
            steps[kind] = min(steps[kind], args.max_steps)
        # The dVAE keeps its best reconstruction anyway; the other two stop when held-out loss stops falling.
        recipes.set_steps(cfg, steps[kind], early_stop=0 if kind == "dvae" else 3)
        # The steps are what the measured speed allows; a machine that gets busier stops at the time share.
        cfg["train"]["time_limit_minutes"] = round(recipes.SHARES[kind] * args.budget_s / 60, 2)
    folder = run.dir / "configs"
    folder.mkdir(exist_ok=True)
    for kind, cfg in cfgs.items():
        header = (f"# planned by tools/train_all.py for {s['n_train']} training images, a typical side of "
                  f"{s['side']} px and a {args.budget} budget: {step_s[kind]:.3f} s a step measured here\n")
        (folder / f"{kind}.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    run.state["planned_seconds"] = {k: steps[k] * step_s[k] for k in cfgs}
    d, m = cfgs["dvae"]["model"], cfgs["dalle"]["model"]
    print(f"recipe: {d['image_size']} px images, {d['image_size'] // d['downsample']}x"
          f"{d['image_size'] // d['downsample']} grid of {d['vocab_size']} codes, {m['text_seq_len']} text tokens, "
          f"transformer {m['n_layer']}x{m['n_embd']}; steps dVAE {steps['dvae']}, transformer {steps['dalle']}, "
          f"reranker {steps['reranker']} (configs in {folder})")
    return {"step_seconds": step_s, "steps": steps, "image_size": d["image_size"],
            "grid": d["image_size"] // d["downsample"], "codes": d["vocab_size"], "text_seq_len": m["text_seq_len"],
            "caption_tokens_max": max(lengths, default=0)}


def _plan_named(run, args, cfgs: dict, lengths: list[int]) -> dict:
    """Write the named configs with this run's paths; the report's figures come from the configs."""
    folder = run.dir / "configs"
    folder.mkdir(exist_ok=True)
    for kind, cfg in cfgs.items():
        if args.max_steps:
            recipes.set_steps(cfg, min(cfg["train"]["steps"], args.max_steps), early_stop=0)
        header = f"# configs/{kind}/{args.recipe}.yaml with the paths of this tools/train_all.py run\n"
        (folder / f"{kind}.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    d, m = cfgs["dvae"]["model"], cfgs["dalle"]["model"]
    steps = {k: cfg["train"]["steps"] for k, cfg in cfgs.items()}
    grid = d["image_size"] // d["downsample"]
    print(f"recipe {args.recipe}: {d['image_size']} px images, {grid}x{grid} grid of {d['vocab_size']} codes, "
          f"{m['text_seq_len']} text tokens, transformer {m['n_layer']}x{m['n_embd']}; steps dVAE {steps['dvae']}, "
          f"transformer {steps['dalle']}, reranker {steps['reranker']} (configs in {folder})")
    return {"recipe": args.recipe, "step_seconds": None, "steps": steps, "image_size": d["image_size"],
            "grid": grid, "codes": d["vocab_size"], "text_seq_len": m["text_seq_len"],
            "caption_tokens_max": max(lengths, default=0)}


def _train(tool: str, kind: str):
    def stage(run, args, source) -> dict:
        p = _paths(run)
        _tool(tool).main(["--config", str(run.dir / "configs" / f"{kind}.yaml"), "--out", p[kind],
                          *_common(args, "train")])
        return {"earlier_seconds": earlier_seconds(Path(p[kind]))}
    return stage


def earlier_seconds(run_dir: Path) -> float:
    """The training seconds that earlier processes left in the checkpoint this process resumed from (0 for a
    run that started here): a stage resumed after a crash then counts the work it kept."""
    log = run_dir / "log.jsonl"
    starts = [e for e in map(json.loads, log.read_text().splitlines()) if e.get("event") == "start"] \
        if log.is_file() else []
    return float(starts[-1].get("seconds_before", 0.0)) if starts else 0.0


def pretokenize(run, args, source) -> dict:
    s, p = run.state["split"], _paths(run)
    for part, out in (("train", p["tok_train"]), ("val", p["tok_val"])):
        if Path(out).exists():  # an interrupted encoding: encoding again is quicker than checking it
            shutil.rmtree(out)
        if s["source"] == "shapes":
            _tool("pretokenize").main(["--dvae", p["dvae"], "--source", "shapes", "--split", part,
                                       "--n", str(s[f"n_{part}"]), "--out", out, *_common(args)])
            continue
        _tool("pretokenize").main(["--dvae", p["dvae"], "--source", s["source"], "--path", s[part], "--out", out,
                                   "--background", args.background, *_common(args)])
    return {}


def bundle(run, args, source) -> dict:
    p = _paths(run)
    _tool("bundle").main(["--dalle", p["dalle"], "--reranker", p["reranker"], "--out", p["model"], "--overwrite",
                          "--dtype", args.dtype])
    return {}


def evaluate(run, args, source) -> dict:
    return _tool("train_all_report").evaluate(run, args, _paths(run), _common)


def report(run, args, source) -> dict:
    return _tool("train_all_report").write_report(run, args, _paths(run))


STAGE_FUNCTIONS = {"split": split, "bpe": bpe, "plan": plan, "dvae": _train("train_dvae", "dvae"),
                   "pretokenize": pretokenize, "dalle": _train("train_dalle", "dalle"),
                   "reranker": _train("train_reranker", "reranker"), "bundle": bundle, "evaluate": evaluate,
                   "report": report}


if __name__ == "__main__":  # a part of another command, not one itself
    raise SystemExit("tools/train_all_stages.py holds stages of tools/train_all.py: "
                     "run python tools/train_all.py --help")
