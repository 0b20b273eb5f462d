"""tools/bench.py's cases for where users spend their time: many candidates for one prompt, and the paper's
stream length, where the sparse masks are meant to pay.

gen:candidates   64 candidates for one prompt at bench-small through `dalle.generation.generate` (prompt pass,
                 decoding, dVAE decode, reranking), random weights; candidates/s, and the sampling's model
                 GFLOP/s (`sampling_flops`: the keys actually read) against the fp32 matmul peak timed in the
                 same process.
paper:decode     cached sampling of 16 images (one batch of `generate`'s default size) at the paper's stream
                 (256 text + 32x32 image tokens) with a narrow model (PAPER_MODEL): the paper's masks (each
                 step reads its keys only), the same masks read as a bias over the whole cache (the step
                 before sparse decoding), and full attention.
paper:train      one training step at the same geometry, fp32: the paper's masks (on the CPU through
                 dalle/transformer/blocksparse.py), the same masks as a dense mask (attention backend "sdpa"),
                 and full attention.
caption:64       greedy captions of 64 shapes renders (`dalle.captioning.caption`: dVAE encode, prompt pass,
                 cached decoding) by the shipped model (or, for a shipped model that does not read images, by a
                 random-weight model of its size with the caption layout, which writes every text slot); and
                 the same captions guided by the model's caption prior (prior_scale 2: a second, text-only stream);
                 and caption.py's default for a model that draws: guided, 2 candidates by beam search reranked by
                 log p(image | caption) (one more pass of the whole stream per candidate).

The variants of one case run in turn in one process, so the machine's drift hits them alike.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

if __name__ == "__main__":  # a part of tools/bench.py, which picks these cases by name
    raise SystemExit("tools/bench_cases.py holds cases of tools/bench.py: run python tools/bench.py --cases "
                     "gen:candidates,paper:decode,paper:train,caption:64 (or --help)")

from tools import bench

# bench-small's width and vocabularies, the paper's stream: 256 text tokens, a 32 x 32 grid
PAPER_MODEL = dict(text_vocab_size=1024, text_seq_len=256, image_vocab_size=1024, image_grid_size=32, n_embd=128,
                   n_layer=6, n_head=4)
# 16 images: with more rows, the cache each step reads outweighs the weights all rows share
PAPER_IMAGES, PAPER_TRAIN_BATCH = 16, 4
CAPTION_IMAGES = 64
RERANKER = dict(text_seq_len=32, image_size=64, patch_size=8, stem="patch", width=128, layers=2, heads=4,
                embed_dim=128)


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, runs: int) -> dict[str, Any]:
    """One call of each fn in turn, warm-up rounds first; every timed run and its foreign load per variant,
    each variant's median over its clean runs (all of them where none was clean), and its median CPU time."""
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    foreign: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            bench._wait_quiet()
            b, o, t, c = bench._busy_seconds(), bench._own_seconds(), time.perf_counter(), time.process_time()
            fn()
            wall = time.perf_counter() - t
            if i >= warmup:
                walls[name].append(wall)
                cpus[name].append(time.process_time() - c)
                foreign[name].append(max(0.0, bench._busy_seconds() - b - (bench._own_seconds() - o)) / wall)
    # the median of the clean runs where there are any, as bench.timed does
    out: dict[str, Any] = {f"{name}_s": statistics.median([w for w, f in zip(walls[name], foreign[name])
                                                           if f < bench.CLEAN_CORES] or walls[name])
                           for name in fns}
    # CPU seconds: with --threads 1 the work itself, which other jobs on the machine move far less than the wall
    out.update({f"{name}_cpu_s": statistics.median(v) for name, v in cpus.items()})
    out["runs_s"] = {k: [round(w, 4) for w in v] for k, v in walls.items()}
    out["foreign_cores"] = {k: [round(f, 2) for f in v] for k, v in foreign.items()}
    out["clean"] = all(f < bench.CLEAN_CORES for v in foreign.values() for f in v)
    return out


def fp32_peak(warmup: int = 1, runs: int = 3) -> float:
    """GFLOP/s of the best square fp32 matmul (1024 or 2048), as the peak:fp32 case, but quicker."""
    return bench.case_peak("fp32", warmup, runs)["gflops"]


def _pipeline(model: dict[str, Any] | None = None) -> Any:
    """A random-weight pipeline at bench-small: transformer, a BPE tokenizer, the bench's dVAE, a reranker."""
    import torch

    from dalle.pipeline import Pipeline
    from dalle.reranker.model import Reranker, RerankerConfig
    from dalle.tokenizer import TextTokenizer
    from dalle.transformer.model import DALLE
    from dvae.model import DiscreteVAE, DVAEConfig

    words = ("red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "left", "right",
             "above", "below", "of", "the", "a")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (8,), generator=g)) for _ in range(500)]
    tok = TextTokenizer.train(texts, vocab_size=300)
    cfg = dataclasses.replace(bench._model_cfg("full"), text_vocab_size=tok.vocab_size, **(model or {}))
    reranker = Reranker(RerankerConfig(text_vocab_size=tok.vocab_size, **RERANKER)).eval()
    return Pipeline(DALLE(cfg).eval(), tok, DiscreteVAE(DVAEConfig(**bench.DVAE)).eval(), "bench-small@random",
                    reranker, tok, "reranker@random")


def case_candidates(warmup: int, runs: int, candidates: int = 64, batch_size: int | None = None,
                    model: dict[str, Any] | None = None) -> dict[str, Any]:
    """batch_size None: generate.py's default, as many as fit its default batch memory."""
    import dalle.generation as generation
    from dalle.transformer.decoding import sampling_flops

    pipe = _pipeline(model)
    cfg = pipe.model.config
    batch_size = batch_size or generation.auto_batch_size(pipe, generation.DEFAULT_BATCH_MEMORY)
    top_k = max(1, int(bench.TOP_K_FRACTION * cfg.image_vocab_size))
    sampling = {"s": 0.0}

    def timed_sample(*args: Any, **kwargs: Any) -> Any:  # the share of a generation spent sampling tokens
        t = time.perf_counter()
        out = generation_sample(*args, **kwargs)
        sampling["s"] += time.perf_counter() - t
        return out

    generation_sample, generation.sample = generation.sample, timed_sample
    try:
        starts: list[float] = []

        def run() -> None:
            starts.append(sampling["s"])
            kept = generation.generate(pipe, "a red circle above a blue square", keep=4, candidates=candidates,
                                       batch_size=batch_size, top_k=top_k)
            assert len(kept) == 4 and kept[0].score is not None

        r = bench.timed(run, warmup, runs)
        starts.append(sampling["s"])
    finally:
        generation.sample = generation_sample
    sample_s = statistics.median(b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :]))
    peak = fp32_peak()
    gflops = candidates * sampling_flops(cfg) / sample_s / 1e9
    # the measure: the transformer's FLOPs over the whole generation's time (the dVAE decode and the
    # reranking add time, and their FLOPs are not counted, so this is a lower bound of the machine's use)
    whole = candidates * sampling_flops(cfg) / r["median_s"] / 1e9
    return {**r, "candidates": candidates, "batch_size": batch_size, "candidates_per_s": candidates / r["median_s"],
            "sampling_s": sample_s, "sampling_share": sample_s / r["median_s"], "sampling_gflops": gflops,
            "peak_fp32_gflops": peak, "sampling_peak_share": gflops / peak, "whole_gflops": whole,
            "whole_peak_share": whole / peak}


def case_caption(warmup: int, runs: int, images: int = CAPTION_IMAGES) -> dict[str, Any]:
    import torch

    from dalle.captioning import DRAWN_CANDIDATES, DRAWN_PRIOR_SCALE, caption, reads
    from dalle.data.shapes import ShapesDataset
    from dalle.pipeline import DEFAULT_MODEL, load_pipeline
    from dalle.transformer.model import DALLE

    pipe = load_pipeline(DEFAULT_MODEL)
    shipped = reads(pipe)
    if not shipped:
        cfg = dataclasses.replace(pipe.model.config, layouts=("t2i", "caption"))
        pipe.model = DALLE(cfg).eval()
    data = ShapesDataset("val", images)
    batch = torch.stack([data[i]["image"] for i in range(images)])
    lengths: list[int] = []

    def run(prior_scale: float = 0.0, candidates: int = 1) -> None:
        texts = caption(pipe, batch, batch_size=images, prior_scale=prior_scale, candidates=candidates)
        if not prior_scale:
            lengths.append(sum(len(pipe.tokenizer.encode(t[0].text)) for t in texts))

    r = alternate({"greedy": run, "guided": lambda: run(DRAWN_PRIOR_SCALE),
                   "reranked": lambda: run(DRAWN_PRIOR_SCALE, DRAWN_CANDIDATES)}, warmup, runs)
    return {**r, "median_s": r["greedy_s"], "images": images,
            "model": "shipped" if shipped else "shipped size, random weights",
            "captions_per_s": images / r["greedy_s"], "mean_text_tokens": lengths[-1] / images,
            "reranked_candidates": DRAWN_CANDIDATES}


def _paper_cfg(schedule: str, model: dict[str, Any] | None) -> Any:
    from dalle.transformer.model import DALLEConfig

    return DALLEConfig(**{**PAPER_MODEL, **(model or {})}, attn_schedule=schedule)


def case_paper_decode(warmup: int, runs: int, model: dict[str, Any] | None = None,
                      images: int = PAPER_IMAGES) -> dict[str, Any]:
    import torch

    import dalle.transformer.sampling as sampling
    from dalle.transformer.decoding import KVCache, sampling_flops
    from dalle.transformer.model import DALLE

    models = {s: DALLE(_paper_cfg(s, model)).eval() for s in ("paper", "full")}
    cfg = models["paper"].config
    text = torch.randint(cfg.text_vocab_size, (images, cfg.text_seq_len))
    top_k = max(1, int(bench.TOP_K_FRACTION * cfg.image_vocab_size))

    def run(schedule: str, sparse: bool = True) -> None:
        sampling.KVCache = KVCache if sparse else functools.partial(KVCache, sparse=False)
        try:
            sampling.sample(models[schedule], text, top_k=top_k, generator=torch.Generator().manual_seed(0))
        finally:
            sampling.KVCache = KVCache

    r = alternate({"paper": lambda: run("paper"), "paper_bias": lambda: run("paper", False),
                   "full": lambda: run("full")}, warmup, runs)
    flops = {"paper": sampling_flops(cfg), "paper_bias": sampling_flops(cfg, sparse=False),
             "full": sampling_flops(models["full"].config)}
    return {**r, "median_s": r["paper_s"], "images": images, "model": {**PAPER_MODEL, **(model or {})},
            "full_over_paper": r["full_s"] / r["paper_s"], "bias_over_paper": r["paper_bias_s"] / r["paper_s"],
            **{f"{k}_gflops": images * f / r[f"{k}_s"] / 1e9 for k, f in flops.items()}}


def case_paper_train(warmup: int, runs: int, model: dict[str, Any] | None = None,
                     batch_size: int = PAPER_TRAIN_BATCH) -> dict[str, Any]:
    from dalle.config import from_dict
    from dalle.train.config import TrainConfig, load_yaml
    from dalle.train.engine import Trainer
    from dalle.train.tasks.transformer import DALLEObjective
    from dalle.transformer.model import DALLE
    from tools.bench_train import SyntheticTask

    train = {**load_yaml(bench.CONFIG)["train"], "batch_size": batch_size}
    # "paper_dense": the same masks through SDPA with the dense (L, L) mask, the step before blocksparse
    variants = {"paper": ("paper", "auto"), "paper_dense": ("paper", "sdpa"), "full": ("full", "auto")}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(SyntheticTask(DALLE(_paper_cfg(schedule, model)), DALLEObjective()),
                                  from_dict(TrainConfig, {**train, "attn_backend": backend}, "train"), f"{tmp}/{name}",
                                  resume="never", progress=False)
                    for name, (schedule, backend) in variants.items()}
        batch = bench._batch(trainers["paper"].task.model.config, batch_size)
        r = alternate({s: lambda t=t: t.train_step(iter([dict(batch)])) for s, t in trainers.items()}, warmup, runs)
        for trainer in trainers.values():
            trainer.close()
    return {**r, "median_s": r["paper_s"], "batch_size": batch_size, "model": {**PAPER_MODEL, **(model or {})},
            "paper_over_full": r["paper_s"] / r["full_s"], "dense_over_full": r["paper_dense_s"] / r["full_s"]}


def figure(r: dict[str, Any]) -> str | None:
    """The table's figure for these cases, or None for another case."""
    if "captions_per_s" in r:  # dvae cases report images_per_s
        def met(s: float) -> str:
            return "< 2 s met" if s < 2 else "< 2 s NOT met"

        k = r.get("reranked_candidates")  # absent from results recorded before it was
        return (f"{r['median_s']:.2f} s for {r['images']} images ({r['model']}) ({met(r['median_s'])}); guided by "
                f"the caption prior {r['guided_s']:.2f} s; guided, {k or 'the default'} candidates reranked "
                f"(caption.py's default) {r['reranked_s']:.2f} s ({met(r['reranked_s'])})")
    if "candidates_per_s" in r:
        whole = r.get("whole_peak_share")
        return (f"{r['median_s']:.2f} s, {r['candidates_per_s']:.1f} candidates/s; sampling {r['sampling_s']:.2f} s "
                f"({r['sampling_share']:.0%}), {r['sampling_gflops']:.1f} GFLOP/s = {r['sampling_peak_share']:.0%} "
                f"of the {r['peak_fp32_gflops']:.0f} GFLOP/s fp32 peak"
                + ("" if whole is None else f"; whole generation {whole:.0%} "
                   f"({'>= 40% met' if whole >= 0.4 else '>= 40% NOT met'})"))
    if "full_over_paper" in r:
        return (f"paper {r['paper_s']:.2f} s vs full {r['full_s']:.2f} s: {r['full_over_paper']:.2f}x "
                f"({'>= 1.5x met' if r['full_over_paper'] >= 1.5 else '>= 1.5x NOT met'}); masks as a bias "
                f"{r['paper_bias_s']:.2f} s")
    if "paper_over_full" in r and "batch_size" in r:
        return (f"paper {r['paper_s']:.3f} s vs full {r['full_s']:.3f} s: {100 * (r['paper_over_full'] - 1):+.1f}% "
                f"({'no slower: met' if r['paper_over_full'] <= 1 else 'slower: NOT met'}); dense masks "
                f"{r['paper_dense_s']:.3f} s ({100 * (r['dense_over_full'] - 1):+.1f}%)")
    return None
