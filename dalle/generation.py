"""Text to images as one library call: sample candidates in batches, decode them, rerank, keep the best.

    results = generate(pipe, "a red circle", keep=4, candidates=32)   # best first
    results[0].image, results[0].seed, results[0].score

The paper drew 512 candidates per caption and kept the 32 its contrastive model ranked highest (sec. 2.5).
Candidates are sampled `batch_size` at a time and reranked as each batch finishes, so only the best `keep`
images of each prompt are held, however many candidates are drawn. Candidate c of a prompt is sampled
with seed `seed + c` alone (one generator per row), so any image can be made again from its seed,
whatever else shared its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dalle.pipeline import Pipeline, score
from dalle.transformer.sampling import sample


@dataclass(frozen=True)
class Generated:
    image: Tensor  # (3, H, W) in [0, 1], float32 on the CPU
    seed: int  # the generator seed that alone makes this image again
    candidate: int  # its index among the prompt's candidates
    score: float | None  # the reranker's score for the prompt (None without a reranker)


def sample_images(pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], **kwargs: object) -> Tensor:
    """One image per (prompt, seed) pair, as one batch. -> (B, 3, H, W) in [0, 1], float32 on the CPU.
    kwargs: those of `sample_codes`."""
    return sample_codes(pipe, prompts, seeds, **kwargs)[1]


@torch.no_grad()
def sample_codes(pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, cond_scale: float = 1.0, prime: Tensor | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Codes (B, N) on the CPU and images (B, 3, H, W) in [0, 1], float32 on the CPU, of one sample per
    (prompt, seed) pair, as one batch. prime: (p,) image codes that every row starts with. progress(n) is
    called with the tokens sampled at each step (n = B)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cfg = pipe.model.config
    text, _ = pipe.tokenizer.encode_batch(list(prompts), cfg.text_seq_len)
    gens = [torch.Generator(device=pipe.device).manual_seed(s) for s in seeds]
    primed = None if prime is None else prime[None].expand(len(prompts), -1).to(pipe.device)
    on_token = None if progress is None else (lambda _k: progress(len(prompts)))
    codes = sample(pipe.model, text.to(pipe.device), temperature=temperature, top_k=top_k, top_p=top_p,
                   cond_scale=cond_scale, prime=primed, generator=gens, on_token=on_token)
    images = pipe.dvae.decode(codes.view(-1, cfg.image_grid_size, cfg.image_grid_size)).float().cpu()
    return codes.cpu(), images


# Above this many rows a decoding step is bound by arithmetic rather than by reading the weights, so a
# larger batch only holds more memory.
MAX_AUTO_BATCH = 64
# What a batch may hold unless told otherwise (generate.py --batch-memory): 64 candidates of the shipped
# model, or one of the paper's 12B model in fp16, fit in it.
DEFAULT_BATCH_MEMORY = 2**30


def bytes_per_candidate(pipe: Pipeline, guided: bool) -> int:
    """Memory one candidate holds while it is sampled and decoded: its rows of the key/value cache (two rows
    under guidance), the logits of a step, and its decoded image."""
    cfg, itemsize = pipe.model.config, next(pipe.model.parameters()).element_size()
    rows = 2 if guided else 1
    cache = 2 * cfg.n_layer * cfg.seq_len * cfg.n_embd * itemsize * rows
    logits = 4 * cfg.image_vocab_size * rows * 4  # fp32 logits, filtered copies and probabilities
    image = 4 * 3 * pipe.dvae.config.image_size**2
    return cache + logits + image


def auto_batch_size(pipe: Pipeline, budget_bytes: int, *, guided: bool = False) -> int:
    """The most candidates that fit `budget_bytes` at once, at least 1 and at most MAX_AUTO_BATCH."""
    return max(1, min(MAX_AUTO_BATCH, budget_bytes // bytes_per_candidate(pipe, guided)))


RERANKERS = ("clip", "self")


def can_rerank(pipe: Pipeline, rerank: str = "clip") -> bool:
    """Whether the pipeline can rank candidates: "clip" with its reranker, "self" with a transformer that reads
    images (its own log p(prompt | image), `dalle.captioning.prompt_logprob`)."""
    if rerank not in RERANKERS:
        raise ValueError(f"rerank must be one of {RERANKERS}, got {rerank!r}")
    return pipe.reranker is not None if rerank == "clip" else "caption" in pipe.model.config.layouts


def default_candidates(pipe: Pipeline, keep: int, rerank: str = "clip") -> int:
    """4 candidates per kept image when the model can rank them (see `can_rerank`), else `keep`."""
    return 4 * keep if can_rerank(pipe, rerank) else keep


def generate_many(pipe: Pipeline, prompts: Sequence[str], *, keep: int = 1, candidates: int | None = None,
                  seed: int = 0, batch_size: int = 16, progress: Callable[[int], None] | None = None,
                  rerank: str = "clip", **sampling: object) -> list[list[Generated]]:
    """`generate` for several prompts, whose candidates share batches. One list per prompt, in order;
    repeated prompts are sampled and returned separately. rerank: "clip" (the pipeline's reranker) or "self"
    (the transformer's own log p(prompt | image)). `sampling`: temperature, top_k, top_p, cond_scale, prime
    (see `sample_images`)."""
    candidates = default_candidates(pipe, keep, rerank) if candidates is None else candidates
    ranked = can_rerank(pipe, rerank)
    if keep < 1 or batch_size < 1:
        raise ValueError(f"keep and batch_size must be at least 1, got keep={keep}, batch_size={batch_size}")
    if candidates < keep:
        raise ValueError(f"{candidates} candidates are fewer than the {keep} images to keep")
    if candidates > keep and not ranked:
        raise ValueError(f"choosing {keep} of {candidates} candidates needs a reranker, and this model has none"
                         if rerank == "clip" else f"choosing {keep} of {candidates} candidates by the model's own "
                         "score needs a model trained to caption (model.layouts with caption)")
    jobs = [(p, c) for p in range(len(prompts)) for c in range(candidates)]
    kept: list[list[Generated]] = [[] for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        codes, images = sample_codes(pipe, [prompts[p] for p, _ in chunk], [seed + c for _, c in chunk],
                                     progress=progress, **sampling)
        for p in sorted({p for p, _ in chunk}):
            rows = [i for i, (q, _) in enumerate(chunk) if q == p]
            scores = _scores(pipe, rerank, prompts[p], codes[rows], images[rows]) if ranked else None
            for j, i in enumerate(rows):
                c = chunk[i][1]
                kept[p].append(Generated(images[i], seed + c, c, None if scores is None else scores[j]))
            # best first; equal scores keep the earlier candidate first, so the order is reproducible
            kept[p].sort(key=lambda g: (-g.score if g.score is not None else 0.0, g.candidate))
            del kept[p][keep:]
    return kept


def _scores(pipe: Pipeline, rerank: str, prompt: str, codes: Tensor, images: Tensor) -> list[float]:
    if rerank == "clip":
        return score(pipe, prompt, images).tolist()
    from dalle.captioning import prompt_logprob

    return prompt_logprob(pipe, codes, [prompt] * len(codes)).tolist()


def generate(pipe: Pipeline, prompt: str, *, keep: int = 1, candidates: int | None = None, seed: int = 0,
             batch_size: int = 16, progress: Callable[[int], None] | None = None,
             **sampling: object) -> list[Generated]:
    """Sample `candidates` images for `prompt` (default: 4 x keep with a reranker, else keep), rank them
    by the pipeline's reranker and return the best `keep`, best first, each with its seed and score."""
    return generate_many(pipe, [prompt], keep=keep, candidates=candidates, seed=seed, batch_size=batch_size,
                         progress=progress, **sampling)[0]
