"""The last two stages of tools/train_all.py: evaluate the trained models on the held-out split, and write
RUN/report.md with the figures, the time each stage took and the images (RUN/eval/*.png)."""

from __future__ import annotations

import json
import os
import platform
import random
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from dalle.captioning import DRAWN_CANDIDATES
from dalle.data.sources import DataConfig, build_dataset, eval_batches

GRID_CAPTIONS = 6  # held-out captions in the sample grid
KEEP, CANDIDATES = 4, 16  # images shown per caption, chosen by the reranker among this many samples


def _tool(name: str):
    import importlib

    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


def fid_features() -> str:
    """inception when its weights are on disk (comparable with published FIDs), else the reranker's."""
    from dalle.evaluation.fid import inception_weights_path

    try:
        inception_weights_path()
        return "inception"
    except FileNotFoundError:
        return "reranker"


def held_out_pairs(run, args, image_size: int, n: int) -> list[tuple[str, torch.Tensor]]:
    """n (caption, image) pairs of the held-out split, drawn with --seed."""
    s = run.state["split"]
    cfg = DataConfig(source=s["source"], path=s["train"], val_path=s["val"], background=args.background,
                     seed=args.seed, val_size=s["n_val"])
    pairs = [(c, im) for b in eval_batches(build_dataset(cfg, "val", image_size, "eval"), 256)
             for c, im in zip(b["caption"], b["image"])]
    return random.Random(args.seed).sample(pairs, min(n, len(pairs)))


def sample_grid(pipe, captions: list[str], path: Path, seed: int, real: list[torch.Tensor] | None = None) -> None:
    """One row per caption: (its real image, then) the reranker's KEEP best of CANDIDATES samples."""
    from dalle.generation import generate_many

    candidates = CANDIDATES if pipe.reranker is not None else KEEP
    kept = generate_many(pipe, captions, keep=KEEP, candidates=candidates, seed=seed, batch_size=16)
    tiles = []
    for i, row in enumerate(kept):
        if real is not None:
            tiles.append(real[i].float())
        tiles.extend(g.image.float().clamp(0, 1) for g in row)
    save_image(make_grid(torch.stack(tiles), nrow=KEEP + (real is not None), padding=2, pad_value=1.0), path)


def evaluate(run, args, p: dict, common) -> dict:
    from dalle.pipeline import load_pipeline

    s = run.state["split"]
    out = Path(p["eval"])
    out.mkdir(parents=True, exist_ok=True)
    n_val, shapes = s["n_val"], s["source"] == "shapes"
    # The shapes world's held-out scenes are its `val` split, and its detector can read reconstructions.
    where = ["--source", "shapes"] if shapes else ["--source", s["source"], "--path", s["val"]]
    _tool("eval_dvae").main(["--model", p["dvae"], *where, "--n", str(n_val),
                             "--grid", str(out / "reconstructions.png"), "--grid-images", str(min(16, n_val)),
                             "--grid-seed", str(args.seed), "--json", str(out / "dvae.json"), "--overwrite",
                             *(["--detector", str(min(500, n_val))] if shapes else []),
                             "--background", args.background, *common(args)])
    features = fid_features()
    reference = ["--split", "val", "--reference-split", "train"] if shapes else ["--reference-path", s["train"]]
    _tool("eval_fid").main(["--model", p["model"], *where, *reference, "--n", str(min(n_val, 500)),
                            "--features", features, "--blur", "0", "--out", str(out / "fid"), "--overwrite",
                            "--stats-cache", str(out / "fid-stats"),
                            "--background", args.background, "--seed", str(args.seed), *common(args, "fid")])
    if shapes:  # compositional accuracy, as docs/evaluation.md reports it for the shipped model
        _tool("eval_shapes").main(["--model", p["model"], "--split", "train", "zeroshot", "--n", str(min(100, n_val)),
                                   "--candidates", "1", "8", "32", "--cond-scale", "1", "3", "--seed", str(args.seed),
                                   "--out", str(out / "shapes"), "--overwrite", *common(args, "fid")])
    pipe = load_pipeline(p["model"])
    if shapes and "caption" in pipe.model.config.layouts:  # a model that reads: docs/evaluation.md's reading table
        _tool("eval_captions").main(["--model", p["model"], "--split", "train", "zeroshot",
                                     "--n", str(min(100, n_val)), "--prior-scale", "0", "2",
                                     "--caption-candidates", "1", str(DRAWN_CANDIDATES), "--candidates", "1", "8", "32",
                                     "--seed", str(args.seed), "--out", str(out / "captions"), "--overwrite",
                                     *common(args, "fid")])
    held = held_out_pairs(run, args, pipe.dvae.config.image_size, GRID_CAPTIONS)
    sample_grid(pipe, [c for c, _ in held], out / "samples-held-out.png", args.seed, real=[im for _, im in held])
    if args.prompt:
        sample_grid(pipe, args.prompt, out / "samples-prompts.png", args.seed)
    samples = {"held_out_captions": [c for c, _ in held], "prompts": args.prompt, "keep": KEEP,
               "candidates": CANDIDATES if pipe.reranker is not None else KEEP}
    (out / "samples.json").write_text(json.dumps(samples, indent=1) + "\n")
    return {"fid_features": features}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}"


def write_report(run, args, p: dict) -> dict:
    st, s, ev = run.state, run.state["split"], Path(p["eval"])
    plan = st["stages"]["plan"]
    dvae = json.loads((ev / "dvae.json").read_text())
    fid = json.loads((ev / "fid" / "fid.json").read_text())
    samples = json.loads((ev / "samples.json").read_text())
    logs = {k: _last_eval(Path(p[k])) for k in ("dvae", "dalle", "reranker")}
    lines = [f"# train_all report: {Path(st['data']).name}", "",
             (f"Data: the built-in shapes world, {s['n_train']} training scenes and {s['n_val']} held-out ones (its "
              f"`val` split), {s['side']} px." if s["source"] == "shapes" else
              f"Data: `{st['data']}` ({s['source']}), {s['n_train']} training and {s['n_val']} held-out images "
              f"(split in `split.json`), typical shorter side {s['side']} px"
              + (f", {s['skipped']} skipped" if s["skipped"] else "") + "."),
             "Command" + ("s" if len(st["commands"]) > 1 else "") + ": "
             + ", then ".join(f"`{c}`" for c in st["commands"]),
             f"Machine: {machine()}, threads {args.threads or 'auto'}.", "",
             "## Recipe", "",
             f"{plan['image_size']} px images, {plan['grid']}x{plan['grid']} grid of {plan['codes']} dVAE codes, "
             f"{plan['text_seq_len']} text tokens (longest caption {plan['caption_tokens_max']}); configs in "
             "`configs/`" + (f", which are `configs/*/{plan['recipe']}.yaml` as they are" if plan.get("recipe")
                             else ", planned for the data and the budget") + ".", "",
             "| stage | steps planned | s/step measured before | trained to step | held-out at the end |",
             "|---|---|---|---|---|"]
    for k in ("dvae", "dalle", "reranker"):
        step, metrics = logs[k]
        measured = f"{plan['step_seconds'][k]:.3f}" if plan.get("step_seconds") else "-"
        lines.append(f"| {k} | {plan['steps'][k]} | {measured} | {step} | {metrics} |")
    lines += ["", "## Time each stage took", "", "| " + " | ".join(st["stages"]) + " | total |",
              "|" + "---|" * (len(st["stages"]) + 1),
              "| " + " | ".join(_fmt(v["seconds"]) for v in st["stages"].values()) + f" | {_fmt(run.elapsed())} |",
              "", "## Results", "",
              f"dVAE on {dvae['images']} held-out images: PSNR {dvae['psnr_db']:.2f} dB, "
              f"{100 * dvae['codes_used']:.0f}% of the codes in use, perplexity {dvae['perplexity']:.1f}"
              + (f"; the shapes detector reads colours / shapes right in {det['colour']:.1%} / {det['shape']:.1%} of "
                 f"{det['n']} reconstructed scenes" if (det := dvae.get("detector_on_reconstructions")) else "")
              + ".", "",
              f"FID ({fid['features']} features, {fid['n']} held-out captions, one sample each, no reranking):", "",
              "| model | floor: training vs held-out images | ceiling: dVAE reconstructions |", "|---|---|---|",
              f"| {fid['fid']['0']:.4g} | {fid['floor']['0']:.4g} | {fid['ceiling']['0']:.4g} |", "",
              "The floor is a second sample of real images (training images drawn at random): FID's own noise at "
              "this N, what a model that drew new images as the data's own would score. A model can score under "
              "it when captions pin much of an image down: its images are drawn for the held-out captions "
              "themselves, which a second sample of images is not. The ceiling is the dVAE's "
              "reconstructions of those images: what a transformer that drew codes exactly like the data's would "
              "score, so the model's distance above it is stage 2's to close, and the gap below it stage 1's.", "",
              "Originals (top) over their dVAE reconstructions:", "",
              "![reconstructions](eval/reconstructions.png)",
              "", f"Held-out captions: the real image, then the reranker's best {samples['keep']} of "
              f"{samples['candidates']} samples:", ""]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(samples["held_out_captions"])]
    lines += ["", "![held-out samples](eval/samples-held-out.png)", ""]
    shapes_md = ev / "shapes" / "shapes-eval.md"
    if shapes_md.is_file():
        lines += ["Compositional accuracy (`tools/eval_shapes.py`; per attribute, and all of it right; best of k "
                  "by the reranker):", "", shapes_md.read_text().split("\n\n", 1)[1].strip(), ""]
    captions_md = ev / "captions" / "captions-eval.md"
    if captions_md.is_file():
        lines += ["Reading (`tools/eval_captions.py`: captions, answers, the prompt -> image -> caption cycle, and "
                  "self-reranking against the reranker):", "", captions_md.read_text().split("\n\n", 1)[1].strip(), ""]
    if samples["prompts"]:
        lines += ["Free prompts:", ""] + [f"{i + 1}. {c}" for i, c in enumerate(samples["prompts"])]
        lines += ["", "![prompt samples](eval/samples-prompts.png)", ""]
    lines += [f"Generate more: `python generate.py \"your prompt\" --model {p['model']} --grid`"]
    (run.dir / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report written to {run.dir / 'report.md'}")
    return {}


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _last_eval(run_dir: Path) -> tuple[int | str, str]:
    """The last evaluation record of a training run's log.jsonl: (step, 'metric value, ...')."""
    log = run_dir / "log.jsonl"
    last = None
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if any(k.startswith("val_") or k in ("psnr",) for k in rec):
                last = rec
    if last is None:
        return "?", ""
    shown = ("psnr", "codes_used", "i2t_top1", "t2i_top1")
    keep = {k: v for k, v in last.items() if isinstance(v, float) and (k.startswith("val_") or k in shown)}
    return last.get("step", "?"), ", ".join(f"{k} {v:.4g}" for k, v in list(keep.items())[:3])


if __name__ == "__main__":  # a part of another command, not one itself
    raise SystemExit("tools/train_all_report.py holds stages of tools/train_all.py: "
                     "run python tools/train_all.py --help")
