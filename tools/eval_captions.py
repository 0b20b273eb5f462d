"""How well a joint model reads images: captions, answers, the prompt -> image -> caption cycle, and
self-reranking against the CLIP-style reranker, on shapes, judged without the model's help.

    python tools/eval_captions.py --model runs/joint --split train zeroshot --n 200 --out runs/eval-captions

- captions: renders of the first n scenes of each split, captioned (greedy, or --beam; guided by the caption
  prior per --prior-scale; reranked by log p(image | caption) per --caption-candidates); each caption is
  read back with the shapes grammar and judged against its scene (`dalle.evaluation.captions`): every
  stated attribute true and every object named with its colour and shape.
- answers: every question `dalle.data.qa.shapes_qa` asks of those scenes, exact match per question kind.
- cycle: the split's captions as prompts -> one image each (the first sample) -> its caption; how often the
  caption agrees with the prompt, beside the shapes detector's verdict on the same images.
- rerank: max(--candidates) samples per prompt, drawn once; best of the first k by the CLIP-style reranker
  and by the model's own log p(prompt | image), judged by the detector (k = 1: the first sample).
- interference (with --t2i-only): the compositional evaluation (tools/eval_shapes.py, into OUT/interference/)
  of --model and --joint-runs against text-to-image-only runs trained the same way, with each recipe's
  run-to-run spread as the yardstick (`dalle.evaluation.interference`).

    python tools/eval_captions.py --model runs/joint-s0 --joint-runs runs/joint-s1 \
        --t2i-only runs/t2i-s0 runs/t2i-s1 --parts interference --out runs/interference
    python tools/eval_captions.py --model runs/joint-new --t2i-recorded runs/interference/captions-eval.json

  The second form compares a new joint run with the text-to-image-only runs as an earlier evaluation recorded
  them: the same prompts and seeds (the same --split, --n and --seed) give them the same images, so they are not
  drawn again, and their weights are not needed.

Writes OUT/captions-eval.json and OUT/captions-eval.md; refuses an OUT that holds them unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

from dalle import cli
from dalle.captioning import answer, caption, check_candidates, prompt_logprob, require_reading
from dalle.cli import DTYPES, add_threads_flag, apply_threads, resolve_device
from dalle.data.qa import QUESTION_KINDS, shapes_qa
from dalle.evaluation import interference
from dalle.evaluation.captions import CAPTION_ATTRIBUTES, answer_correct, judge_caption
from dalle.evaluation.compositional import shapes_prompts, to_uint8
from dalle.evaluation.detect import compare, detect
from dalle.evaluation.report import markdown_table
from dalle.generation import sample_codes
from dalle.pipeline import DEFAULT_MODEL, Pipeline, load_pipeline, score
from dalle.transformer.reading import check_prior

NAMES = ("captions-eval.json", "captions-eval.md")


def _renders(pipe: Pipeline, split: str, args: argparse.Namespace) -> tuple[list, torch.Tensor]:
    prompts = shapes_prompts(split, args.n, args.seed, pipe.dvae.config.image_size)
    images = torch.stack([torch.from_numpy(to_uint8(p.sample.image).copy()).permute(2, 0, 1)
                          for p in prompts]) / 255
    return prompts, images


def _rate(values: list[bool | None]) -> float | None:
    said = [v for v in values if v is not None]
    return sum(said) / len(said) if said else None


def eval_captions(pipe: Pipeline, split: str, args: argparse.Namespace) -> list[dict]:
    """One row per --prior-scale and --caption-candidates, all over the same renders."""
    prompts, images = _renders(pipe, split, args)
    rows = []
    for prior_scale, k in [(s, k) for s in args.prior_scale for k in args.caption_candidates]:
        texts = caption(pipe, images, beam=args.beam, batch_size=args.batch_size, prior_scale=prior_scale,
                        candidates=k)
        verdicts = [judge_caption(t[0].text, p.sample.scene) for t, p in zip(texts, prompts)]
        row = {"split": split, "prior_scale": prior_scale, "candidates": k, "n": len(prompts),
               "parsed": _rate([v.parsed for v in verdicts])}
        row |= {a: _rate([v.attributes[a] for v in verdicts]) for a in CAPTION_ATTRIBUTES}
        row["all_correct"] = _rate([v.all_correct for v in verdicts])
        row["examples"] = [{"caption": t[0].text, "truth": p.caption, "logprob": round(t[0].logprob, 4)}
                           for t, p in list(zip(texts, prompts))[:8]]
        rows.append(row)
    return rows


def eval_answers(pipe: Pipeline, split: str, args: argparse.Namespace) -> dict:
    prompts, images = _renders(pipe, split, args)
    jobs = [(i, q, a, kind) for i, p in enumerate(prompts) for q, a, kind in shapes_qa(p.sample.scene)]
    got = answer(pipe, images[[i for i, *_ in jobs]], [q for _, q, _, _ in jobs], beam=args.beam,
                 batch_size=args.batch_size)
    right = [answer_correct(g[0].text, a) for g, (_, _, a, _) in zip(got, jobs)]
    row = {"split": split, "questions": len(jobs), "all": _rate(right)}
    row |= {kind: _rate([r for r, j in zip(right, jobs) if j[3] == kind]) for kind in QUESTION_KINDS}
    return row


def _candidates(pipe: Pipeline, prompts: list, k: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k, N) codes and (n, k, 3, H, W) images; candidate c of every prompt from seed SEED + c."""
    jobs = [(i, args.seed + c) for i in range(len(prompts)) for c in range(k)]
    codes, images = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=f"sampling {k} per prompt",
                      disable=args.no_progress):
        chunk = jobs[start : start + args.batch_size]
        c, im = sample_codes(pipe, [prompts[i].caption for i, _ in chunk], [s for _, s in chunk],
                             cond_scale=args.cond_scale)
        codes.append(c)
        images.append(im)
    n = len(prompts)
    return torch.cat(codes).view(n, k, -1), torch.cat(images).view(n, k, *images[0].shape[1:])


def eval_cycle_and_rerank(pipe: Pipeline, split: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    prompts = shapes_prompts(split, args.n, args.seed, pipe.dvae.config.image_size)
    k_max = max(args.candidates)
    codes, images = _candidates(pipe, prompts, k_max, args)

    def detector(chosen: torch.Tensor) -> list[bool]:
        return [compare(p.sample.scene, p.sample.mentions, detect(to_uint8(im))).all_correct
                for p, im in zip(prompts, chosen)]

    first = images[:, 0]
    texts = caption(pipe, first, beam=args.beam, batch_size=args.batch_size, prior_scale=args.prior_scale[0],
                    candidates=args.caption_candidates[0])
    agrees = [_agrees(judge_caption(t[0].text, p.sample.scene), p.sample.mentions) for t, p in zip(texts, prompts)]
    judged = detector(first)
    cycle = {"split": split, "n": len(prompts), "caption_agrees": _rate(agrees), "detector_correct": _rate(judged),
             "both_agree": _rate([a == d for a, d in zip(agrees, judged)])}
    by = {"self": torch.stack([prompt_logprob(pipe, codes[i], [p.caption] * k_max) for i, p in enumerate(prompts)])}
    if pipe.reranker is not None:
        by["clip"] = torch.stack([score(pipe, p.caption, images[i]) for i, p in enumerate(prompts)])
    rows = []
    for k in sorted(set(args.candidates)):
        for name, scores in by.items():
            if k == 1 and name != "self":
                continue  # the first sample: no ranking, one row
            pick = scores[:, :k].argmax(1) if k > 1 else torch.zeros(len(prompts), dtype=torch.long)
            chosen = images[torch.arange(len(prompts)), pick]
            rows.append({"split": split, "candidates": k, "rerank": name if k > 1 else "-",
                         "all_correct": _rate(detector(chosen))})
    return cycle, rows


def eval_interference(args: argparse.Namespace, out: Path) -> dict:
    """Every run's compositional accuracy (eval_shapes, each into OUT/interference/NAME), then the comparison."""
    import importlib

    eval_shapes = importlib.import_module(f"{__package__}.eval_shapes" if __package__ else "eval_shapes")
    groups = {"joint": [args.model, *args.joint_runs], "t2i": args.t2i_only}
    rows = {"joint": [], "t2i": []}
    for group, models in groups.items():
        for i, model in enumerate(models):
            sub = out / "interference" / f"{group}-{i}"
            argv = ["--model", model, "--split", *args.split, "--n", str(args.n), "--seed", str(args.seed),
                    "--candidates", *map(str, args.interference_candidates),
                    "--cond-scale", *map(str, args.interference_cond_scale), "--batch-size", str(args.batch_size),
                    "--device", args.device, "--threads", str(args.threads), "--out", str(sub), "--overwrite"]
            argv += (["--reranker", args.reranker] if args.reranker else []) + (
                ["--no-progress"] if args.no_progress else [])
            eval_shapes.main(argv)
            rows[group].append(json.loads((sub / "shapes-eval.json").read_text())["rows"])
    if args.recorded:
        groups["t2i"] = [*groups["t2i"], *args.recorded[0]]
        rows["t2i"] += args.recorded[1]
    result = interference.compare(rows["joint"], rows["t2i"])
    return {"runs": groups, **result}


def recorded_t2i(path: str, args: argparse.Namespace) -> tuple[list[str], list[list[dict]]]:
    """The text-to-image-only runs of an earlier interference evaluation (its captions-eval.json): a name and
    the eval_shapes rows of each. Raises ValueError when the file is not one, or was drawn on other prompts or
    seeds, or lacks a setting this evaluation compares."""
    try:
        data = json.loads(Path(path).read_text())
        settings, found = data["settings"], data["interference"]
        names, rows = found["runs"]["t2i"], interference.recorded_rows(found, "t2i")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--t2i-recorded {path}: not the output of an interference evaluation "
                         f"(tools/eval_captions.py --t2i-only ...): {cli.one_line(e)}") from None
    for key in ("split", "n", "seed"):
        if settings.get(key) != getattr(args, key):
            raise ValueError(f"--t2i-recorded {path} was drawn with --{key} {settings.get(key)}, this evaluation with "
                             f"{getattr(args, key)}: other prompts or seeds; evaluate with the recorded value")
    have = {(r["split"], r["cond_scale"], r["candidates"]) for r in rows[0]} if rows else set()
    missing = [(split, cs, k) for split in args.split for cs in args.interference_cond_scale
               for k in args.interference_candidates if (split, cs, k) not in have]
    if missing:
        split, cs, k = missing[0]
        raise ValueError(f"--t2i-recorded {path} has no {split} row at cond scale {cs:g} with best of {k}: set "
                         "--interference-cond-scale and --interference-candidates to what it recorded")
    return [f"{name} (recorded in {path})" for name in names], rows


def _agrees(verdict, mentions) -> bool:
    """The caption names the prompt's objects and contradicts nothing the prompt says (a size the prompt
    left open may be either in the image, so the caption's word on it is not held against it)."""
    said = {a for m in mentions for a in m} | {"relation"}
    return verdict.parsed and verdict.count and all(verdict.attributes[a] is not False for a in said)


def _table(rows: list[dict], cols: tuple[str, ...]) -> str:
    return markdown_table([c.replace("_", " ") for c in cols], ([r.get(c) for c in cols] for r in rows))


def markdown(result: dict) -> str:
    parts = [f"Model: {result['model']}, {result['settings']['n']} scenes/prompts per split\n"]
    if result["captions"]:
        cols = ("split", "prior_scale", "candidates", "n", "parsed") + CAPTION_ATTRIBUTES + ("all_correct",)
        parts += ["## Captions of renders\n", _table(result["captions"], cols)]
    if result["answers"]:
        parts += ["## Answers\n", _table(result["answers"], ("split", "questions", "all") + QUESTION_KINDS)]
    if result["cycle"]:
        parts += ["## Cycle: prompt -> image -> caption\n",
                  _table(result["cycle"], ("split", "n", "caption_agrees", "detector_correct", "both_agree"))]
    if result["rerank"]:
        parts += ["## Reranking, judged by the detector\n",
                  _table(result["rerank"], ("split", "candidates", "rerank", "all_correct"))]
    if result.get("interference"):
        parts += ["## Interference: drawing, joint against text to image only (all attributes right)\n",
                  interference.markdown(result["interference"], result["interference"]["runs"])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="joint transformer model or run directory (default: the shipped model)")
    p.add_argument("--reranker", default=None, help="reranker directory (default: the model's reranker/ folder)")
    p.add_argument("--split", nargs="+", default=["train", "zeroshot"], choices=["train", "val", "zeroshot"],
                   help="shapes splits whose scenes and captions are used")
    p.add_argument("--n", type=cli.positive_int, default=200, help="scenes (and prompts) per split")
    p.add_argument("--parts", nargs="+", default=["captions", "answers", "cycle"],
                   choices=["captions", "answers", "cycle", "interference"],
                   help="what to evaluate (cycle includes reranking; interference, added whenever --t2i-only is "
                        "given, needs it)")
    p.add_argument("--beam", type=cli.positive_int, default=1, help="beam width for captions and answers (1: greedy)")
    p.add_argument("--prior-scale", type=cli.non_negative_float, nargs="+", default=[0.0],
                   help="captions: guidance against the model's caption prior (caption.py --prior-scale), one row "
                        "of the table per scale; the cycle reads with the first")
    p.add_argument("--caption-candidates", type=cli.positive_int, nargs="+", default=[1],
                   help="captions: write k per image and keep the best by log p(caption | image) + "
                        "log p(image | caption) (caption.py --candidates), one row of the table per k; the cycle "
                        "reads with the first")
    p.add_argument("--candidates", type=cli.positive_int, nargs="+", default=[1, 8, 32],
                   help="reranking: best of the first k samples for each k (1: the first sample)")
    p.add_argument("--cond-scale", type=cli.finite_float, default=1.0, help="guidance scale of the sampled images")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="data seed of the scenes, base seed of the samples")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images read or sampled together")
    p.add_argument("--t2i-only", nargs="+", default=[], metavar="MODEL",
                   help="interference: text-to-image-only models trained as --model was (same data, as many "
                        "text-to-image samples), drawing compared with the joint runs' on the compositional "
                        "evaluation")
    p.add_argument("--t2i-recorded", metavar="JSON",
                   help="interference: text-to-image-only runs as an earlier interference evaluation recorded them "
                        "(its captions-eval.json, e.g. docs/eval/interference.json), beside or instead of "
                        "--t2i-only; drawn with the same --split, --n and --seed, so not drawn again")
    p.add_argument("--joint-runs", nargs="+", default=[], metavar="MODEL",
                   help="interference: more runs of --model's recipe (other seeds), so that its run-to-run spread "
                        "is known")
    p.add_argument("--interference-candidates", type=cli.positive_int, nargs="+", default=[1, 8],
                   help="interference: best of the first k samples by the reranker, for each k (1: the first)")
    p.add_argument("--interference-cond-scale", type=cli.finite_float, nargs="+", default=[1.0, 3.0],
                   help="interference: guidance scales of the sampled images")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and compute dtype")
    add_threads_flag(p)
    p.add_argument("--out", default="runs/eval-captions", help="directory for the JSON and Markdown")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if (args.t2i_only or args.t2i_recorded) and "interference" not in args.parts:
        args.parts.append("interference")
    if "interference" in args.parts and not (args.t2i_only or args.t2i_recorded):
        p.error("interference compares with text-to-image-only runs: name them with --t2i-only MODEL [MODEL ...] "
                "or --t2i-recorded JSON")
    if args.joint_runs and not (args.t2i_only or args.t2i_recorded):
        p.error("--joint-runs is for the interference comparison: add --t2i-only MODEL [MODEL ...]")
    try:
        args.recorded = recorded_t2i(args.t2i_recorded, args) if args.t2i_recorded else None
    except ValueError as e:
        p.error(str(e))
    for flag, models in (("--joint-runs", args.joint_runs), ("--t2i-only", args.t2i_only)):
        for model in models:
            if not Path(model).exists():
                p.error(f"{flag} {model}: no such model or run directory")
    apply_threads(args.threads)
    out = Path(args.out)
    if not args.overwrite and any((out / n).exists() for n in NAMES):
        raise SystemExit(f"--out {out} already holds an evaluation: choose another --out, or pass --overwrite")
    try:
        pipe = load_pipeline(args.model, reranker_dir=args.reranker, device=resolve_device(args.device),
                             dtype=DTYPES[args.dtype])
        require_reading(pipe, "caption")
        check_prior(pipe.model, "caption", max(args.prior_scale))
        check_candidates(pipe, max(args.caption_candidates))
        if "answers" in args.parts:
            require_reading(pipe, "qa")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot evaluate {args.model}: {e}") from None
    result = {"model": pipe.model_id,
              "settings": {k: v for k, v in vars(args).items() if k not in ("no_progress", "recorded")},
              "captions": [], "answers": [], "cycle": [], "rerank": [], "interference": None}
    with torch.no_grad():
        for split in tqdm(args.split, desc="splits", disable=args.no_progress):
            if "captions" in args.parts:
                result["captions"] += eval_captions(pipe, split, args)
            if "answers" in args.parts:
                result["answers"].append(eval_answers(pipe, split, args))
            if "cycle" in args.parts:
                cycle, rows = eval_cycle_and_rerank(pipe, split, args)
                result["cycle"].append(cycle)
                result["rerank"] += rows
    out.mkdir(parents=True, exist_ok=True)
    if "interference" in args.parts:
        result["interference"] = eval_interference(args, out)
    (out / NAMES[0]).write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / NAMES[1]).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    cli.run(main)
