"""Image -> codes -> transformer -> text: captions, answers and the model's own log p(prompt | image).

    texts = caption(pipe, images)                          # one list per image, best first
    texts[0][0].text, texts[0][0].logprob
    caption(pipe, images, candidates=8)                    # 8 written, reranked by log p(image | caption)
    answer(pipe, images, ["how many objects?"] * len(images))
    prompt_logprob(pipe, codes, ["a red circle"] * len(codes))   # generate.py --rerank self

The same transformer that draws images reads them, in the caption and qa layouts of
`dalle.transformer.layouts` (a model trained with those in `model.layouts`). Decoding is greedy (beam 1),
beam search (`beam` > 1) or sampled (`sample=True`), on the key/value cache; each text comes with the
model's log-probability of it, its end-of-text token included. A model that also draws can check its
captions against the image: `candidates` captions are written and the best kept by log p(caption | image) +
log p(image | caption), the second from its text-to-image stream (the noisy channel of machine translation).
Reading alone names the objects but often not which is where; drawing places them, so the image's likelihood
tells the right relation and colour binding from the wrong one (docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dalle.pipeline import Pipeline
from dalle.transformer.layouts import CAPTION, QA, T2I, pack_qa
from dalle.transformer.reading import image_logprob, text_logprob, write

# The defaults for captions of a model that also draws (caption.py, the caption:64 bench; docs/evaluation.md):
# the best of the guidance scales measured on shapes, and 2 candidates checked by drawing, which on the shipped
# model came within 2.5 points of 4's captions in half the time (64 captions in about 1 s on a 2-core CPU).
DRAWN_PRIOR_SCALE = 2.0
DRAWN_CANDIDATES = 2


@dataclass(frozen=True)
class Text:
    text: str
    logprob: float  # natural log of the model's probability of the text's tokens and its end-of-text token
    image_logprob: float | None = None  # log p(image | text) by the text-to-image stream, when reranked by it


def reads(pipe: Pipeline, layout: str = CAPTION) -> bool:
    """Whether the pipeline's transformer was trained to read images in `layout` ("caption" or "qa")."""
    return layout in pipe.model.config.layouts


def require_reading(pipe: Pipeline, layout: str = CAPTION) -> None:
    if not reads(pipe, layout):
        what = "caption images" if layout == CAPTION else "answer questions"
        raise ValueError(f"{pipe.model_id} was trained text-to-image only (layouts: "
                         f"{', '.join(pipe.model.config.layouts)}), so it cannot {what}: train one that does with "
                         "configs/dalle/shapes.yaml (docs/training.md, \"Both directions\")")


@torch.no_grad()
def encode_images(pipe: Pipeline, images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] at the dVAE's size -> (B, N) codes, on the pipeline's device."""
    size = pipe.dvae.config.image_size
    if images.ndim != 4 or images.shape[1:] != (3, size, size):
        raise ValueError(f"images must be (B, 3, {size}, {size}) in [0, 1], got {tuple(images.shape)}")
    return pipe.dvae.encode(images.to(pipe.device)).flatten(1)


def _decoding(num: int, beam: int, sample: bool) -> None:
    if num < 1 or beam < 1:
        raise ValueError(f"num and beam must be at least 1, got num={num}, beam={beam}")
    if sample and beam > 1:
        raise ValueError("choose beam search or sampling, not both")


def _write(pipe: Pipeline, codes: Tensor, prompt: Tensor, layout: str, answer_at: int, *, num: int, beam: int,
           sample: bool, seed: int, batch_size: int, prior_scale: float = 0.0,
           **filters: float) -> list[list[tuple[Tensor, Text]]]:
    """Per image `num` (ids (T,) on the CPU, Text) pairs, best first."""
    _decoding(num, beam, sample)
    out: list[list[tuple[Tensor, Text]]] = []
    for start in range(0, len(codes), batch_size):
        rows = slice(start, start + batch_size)
        n = len(codes[rows])
        # one generator per written row, seeded by its image's place in the call: reproducible whatever the batch
        gens = ([torch.Generator(device=pipe.device).manual_seed(seed + (start + i) * num + j)
                 for i in range(n) for j in range(num)] if sample else None)
        written = write(pipe.model, codes[rows].to(pipe.device), prompt[rows].to(pipe.device), layout, answer_at,
                        beam=max(beam, num) if not sample else 1, num=num, sample=sample, generator=gens,
                        prior_scale=prior_scale, **filters)
        out += [[(ids, Text(pipe.tokenizer.decode(ids[answer_at:]).strip(), lp)) for ids, lp in texts]
                for texts in written]
    return out


def check_candidates(pipe: Pipeline, candidates: int) -> None:
    """ValueError unless `candidates` captions per image can be reranked: at least 1, and above 1 only for a
    model that also draws (its text-to-image stream gives log p(image | caption))."""
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    if candidates > 1 and T2I not in pipe.model.config.layouts:
        raise ValueError(f"reranking captions by log p(image | caption) needs a model that also draws, and "
                         f"{pipe.model_id} has no text-to-image layout: write one caption (candidates 1)")


@torch.no_grad()
def _rerank(pipe: Pipeline, codes: Tensor, written: list[list[tuple[Tensor, Text]]], num: int,
            batch_size: int) -> list[list[Text]]:
    """Each image's written captions ordered by log p(caption | image) + log p(image | caption), the first num."""
    ids = torch.stack([i for texts in written for i, _ in texts]).to(pipe.device)
    image = torch.cat([codes[i].expand(len(texts), -1) for i, texts in enumerate(written)]).to(pipe.device)
    step = batch_size * max(len(t) for t in written)  # the rows the beams of one batch held
    lp = torch.cat([image_logprob(pipe.model, image[s : s + step], ids[s : s + step]).cpu()
                    for s in range(0, len(ids), step)]).tolist()
    out, at = [], 0
    for texts in written:
        scored = [replace(t, image_logprob=lp[at + k]) for k, (_, t) in enumerate(texts)]
        at += len(texts)
        out.append(sorted(scored, key=lambda t: -(t.logprob + t.image_logprob))[:num])
    return out


def caption_codes(pipe: Pipeline, codes: Tensor, *, num: int = 1, beam: int = 1, sample: bool = False,
                  seed: int = 0, batch_size: int = 64, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, prior_scale: float = 0.0, candidates: int = 1) -> list[list[Text]]:
    """`caption` for images given as (B, N) dVAE codes."""
    require_reading(pipe, CAPTION)
    check_candidates(pipe, candidates)
    cfg = pipe.model.config
    empty = cfg.text_vocab_size + torch.arange(cfg.text_seq_len).expand(len(codes), -1)
    k = max(num, candidates)
    written = _write(pipe, codes, empty, CAPTION, 0, num=k, beam=max(beam, k) if not sample else 1, sample=sample,
                     seed=seed, batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                     prior_scale=prior_scale)
    if candidates == 1:
        return [[t for _, t in texts] for texts in written]
    return _rerank(pipe, codes, written, num, batch_size)


def caption(pipe: Pipeline, images: Tensor, *, num: int = 1, beam: int = 1, sample: bool = False, seed: int = 0,
            batch_size: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            prior_scale: float = 0.0, candidates: int = 1) -> list[list[Text]]:
    """Captions of images (B, 3, H, W) in [0, 1]: per image `num` texts, best first. Greedy by default; `beam`
    hypotheses kept by beam search (at least num); `sample` draws num texts (seed + k for the k-th written row
    of the call) with temperature/top_k/top_p. `prior_scale` > 0 weighs each word against the model's own
    caption prior (`dalle.transformer.reading.write`), for images the training captions never described.
    `candidates` > 1 writes that many (by beam search, or sampled) and keeps the num with the highest
    log p(caption | image) + log p(image | caption), the latter in each Text's image_logprob; it needs a
    model that also draws."""
    return caption_codes(pipe, encode_images(pipe, images), num=num, beam=beam, sample=sample, seed=seed,
                         batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                         prior_scale=prior_scale, candidates=candidates)


def answer(pipe: Pipeline, images: Tensor, questions: Sequence[str], *, num: int = 1, beam: int = 1,
           sample: bool = False, seed: int = 0, batch_size: int = 64, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> list[list[Text]]:
    """Answers to questions[i] about images[i]: per image `num` texts, best first (decoding as `caption`)."""
    if isinstance(questions, str) or len(questions) != len(images):
        raise ValueError(f"give one question per image: {len(images)} images, "
                         f"{1 if isinstance(questions, str) else len(questions)} questions")
    blank = [i for i, q in enumerate(questions) if not q.strip()]
    if blank:  # with no question to answer, the model writes a caption in the answer's place
        raise ValueError(f"question {blank[0]} is empty: give one question per image")
    require_reading(pipe, QA)
    cfg = pipe.model.config
    codes = encode_images(pipe, images)
    packed = [pack_qa(pipe.tokenizer.encode(q), [], cfg.text_seq_len, cfg.text_vocab_size) for q in questions]
    cut = [q for q, (_, at) in zip(questions, packed) if at < len(pipe.tokenizer.encode(q))]
    if cut:
        raise ValueError(f"the question {cut[0]!r} is longer than the model's {cfg.text_seq_len - 1} text slots "
                         "for a question: ask a shorter one")
    prompt = torch.tensor([ids for ids, _ in packed])
    out: list[list[Text] | None] = [None] * len(images)
    # the prompt pass covers the question, so rows are batched by question length
    for at in sorted({at for _, at in packed}):
        rows = [i for i, (_, a) in enumerate(packed) if a == at]
        index = torch.tensor(rows)
        texts = _write(pipe, codes[index.to(codes.device)], prompt[index], QA, at, num=num, beam=beam,
                       sample=sample, seed=seed, batch_size=batch_size, temperature=temperature, top_k=top_k,
                       top_p=top_p)
        for i, t in zip(rows, texts):
            out[i] = [text for _, text in t]
    return out  # type: ignore[return-value]


@torch.no_grad()
def prompt_logprob(pipe: Pipeline, codes: Tensor, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
    """log p(prompts[i] | image i) under the caption layout: (B, N) codes -> (B,) on the CPU, the model's
    own score of how well an image fits its prompt (generate.py --rerank self)."""
    require_reading(pipe, CAPTION)
    if len(prompts) != len(codes):
        raise ValueError(f"{len(codes)} images but {len(prompts)} prompts")
    text, _ = pipe.tokenizer.encode_batch(list(prompts), pipe.model.config.text_seq_len)
    scores = []
    for start in range(0, len(codes), batch_size):
        rows = slice(start, start + batch_size)
        at = torch.zeros(len(text[rows]), dtype=torch.long, device=pipe.device)
        scores.append(text_logprob(pipe.model, codes[rows].to(pipe.device), text[rows].to(pipe.device),
                                   CAPTION, at).cpu())
    return torch.cat(scores)
