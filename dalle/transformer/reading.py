"""Image to text with the same transformer: the log-probability of a text given an image, and writing one
(greedy, beam search or sampling) in the reading layouts of `dalle.transformer.layouts`.

Plain functions over a model and token tensors, as `sampling.py` is for images. Writing runs the image and
the prompt (the question, or nothing for a caption) through a key/value cache once, then one text slot per
step; with `use_cache=False` every step reruns the whole stream (the reference the tests compare with).
A text ends at its first pad id, the end-of-text token: text slot j's end token is pad id `vocab + j`, so the
other pad ids, which never follow a text, are never chosen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dalle.transformer.decoding import KVCache, decode_text_step, prefill_reading, prefill_text_prior
from dalle.transformer.layouts import CAPTION, LAYOUTS, T2I, generated_mask, layout_index
from dalle.transformer.model import DALLE
from dalle.transformer.sampling import _draw, filter_logits, token_logprobs


def check_reads(model: DALLE, layout: str) -> None:
    """ValueError unless `model` was built for `layout` (a text-to-image model has no reading layout)."""
    if layout_index(layout) == LAYOUTS.index(T2I) or layout not in model.config.layouts:
        raise ValueError(f"the model has no {layout!r} layout (its layouts: {list(model.config.layouts)})")


@torch.inference_mode()
def text_logprob(model: DALLE, image: Tensor, text: Tensor, layout: str, answer_at: Tensor) -> Tensor:
    """log p(text | image): (B, N) codes, (B, T) ids, (B,) answer starts -> (B,) summed over the slots the
    layout generates (the caption or the answer, and its end-of-text token), teacher-forced."""
    return text_logprob_grad(model, image, text, layout, answer_at)


def text_logprob_grad(model: DALLE, image: Tensor, text: Tensor, layout: str, answer_at: Tensor) -> Tensor:
    """`text_logprob` with gradients, for training on it (the reward model's reader body)."""
    check_reads(model, layout)
    rows = torch.full_like(answer_at, LAYOUTS.index(layout))
    picked = token_logprobs(model(text, image, rows, answer_at)[0], text)  # (B, T)
    mask = generated_mask(text, answer_at, model.config.text_vocab_size)
    return torch.where(mask, picked, 0.0).sum(dim=1)


@torch.inference_mode()
def image_logprob(model: DALLE, image: Tensor, text: Tensor) -> Tensor:
    """log p(image | text) by the text-to-image stream: (B, N) codes, (B, T) ids (padded as the tokenizer pads,
    or as `write` returns them) -> (B,) summed over the image's tokens, fp32. Reading's counterpart: how likely
    the model, drawing, finds the image given a text it wrote about it."""
    if T2I not in model.config.layouts:
        raise ValueError(f"the model has no text-to-image stream (its layouts: {list(model.config.layouts)})")
    return token_logprobs(model(text, image)[1], image).sum(dim=1)


def check_prior(model: DALLE, layout: str, prior_scale: float) -> None:
    """ValueError unless guidance by the caption prior (see `write`) applies: a caption, from a model that
    also has the text-to-image stream whose text is the prior."""
    if not prior_scale:
        return
    if not prior_scale > 0:
        raise ValueError(f"prior_scale must be >= 0, got {prior_scale}")
    if layout != CAPTION or T2I not in model.config.layouts:
        raise ValueError("prior guidance is for captions from a model that also draws (layouts with 't2i'): its "
                         "text-to-image stream's text is the caption prior; answers have no such prior")


def _allowed(logp: Tensor, slot: int, vocab: int, finished: Tensor) -> Tensor:
    """Log-probs (R, V) with every pad id but text slot `slot`'s end token at -inf; a finished row may only
    pad on, at no cost."""
    pads = torch.arange(logp.shape[1], device=logp.device) >= vocab
    logp = logp.masked_fill(pads & (torch.arange(logp.shape[1], device=logp.device) != vocab + slot), float("-inf"))
    done = torch.full_like(logp[0], float("-inf"))
    done[vocab + slot] = 0.0
    return torch.where(finished[:, None], done, logp)


@torch.inference_mode()
def write(model: DALLE, image: Tensor, prompt: Tensor, layout: str, answer_at: int, *, beam: int = 1,
          num: int = 1, sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          generator: torch.Generator | list[torch.Generator] | None = None, prior_scale: float = 0.0,
          plausible: float = 0.1, use_cache: bool = True) -> list[list[tuple[Tensor, float]]]:
    """Write the text of a reading layout for each image: image (B, N) codes, prompt (B, T) ids whose slots
    before answer_at hold the question (the rest is ignored). Returns per image `num` (ids (T,), log p) pairs,
    best first, log p being the model's own (temperature 1, unfiltered) over the written slots.

    Greedy: beam=1. Beam search keeps `beam` >= num hypotheses. sample=True draws `num` texts per image with
    temperature/top_k/top_p (generator: one, or one per written row, B * num).

    prior_scale s > 0 guides a caption against the model's own caption prior, the text of its text-to-image
    stream read before any image: each token is chosen by (1 + s) log p(t | image, ...) - s log p(t | ...),
    so a word the image shows outweighs the word the training captions made likely (an unseen colour/shape
    pair). Only plausible tokens compete, those the image-conditioned model gives at least `plausible` times its
    top probability (contrastive decoding's constraint): a word neither model expects, which the difference
    alone would favour, cannot win. The log p returned stays the unguided one."""
    check_reads(model, layout)
    check_prior(model, layout, prior_scale)
    if not 0 < plausible <= 1:
        raise ValueError(f"plausible must be in (0, 1], got {plausible}")
    cfg = model.config
    b, t, vocab = image.shape[0], cfg.text_seq_len, cfg.text_vocab_size
    if not 0 <= answer_at < t:
        raise ValueError(f"answer_at must be in 0..{t - 1}, got {answer_at}")
    if num < 1 or beam < 1 or (not sample and num > beam) or (sample and beam != 1):
        raise ValueError(f"need num >= 1 and either beam >= num or sampling with beam 1, got num={num}, "
                         f"beam={beam}, sample={sample}")
    width = num if sample else beam
    rows = torch.arange(b, device=image.device).repeat_interleave(width)  # (R,) the image of each row
    seqs, starts = prompt[rows].clone(), torch.full((b,), answer_at, device=image.device)
    layout_rows = torch.full((len(rows),), LAYOUTS.index(layout), device=image.device)
    scores = torch.zeros(len(rows), device=image.device)
    if not sample:  # one live hypothesis per image at first: the others would only repeat it
        scores.view(b, width)[:, 1:] = float("-inf")
    own = scores.clone()  # the unguided log p of each row's text; `scores` ranks and may be guided
    finished = torch.zeros(len(rows), dtype=torch.bool, device=image.device)
    keep, cache, prior_cache, prior = torch.arange(len(rows), device=image.device), None, None, None

    def uncached(slot: int) -> Tensor:
        return model(seqs, image[rows], layout_rows, starts[rows])[0][:, slot]

    def uncached_prior(slot: int) -> Tensor:  # the text-to-image stream: text slot j reads text slots < j only
        return model(seqs, image[rows])[0][:, slot]

    if use_cache:
        dtype = next(model.parameters()).dtype
        cache = KVCache(cfg, b, image.device, dtype, image_first=True)
        logits = prefill_reading(model, image, prompt, layout, starts, answer_at + 1, cache)[rows]
        if width > 1:
            cache.reorder(rows)
        if prior_scale:
            prior_cache = KVCache(cfg, len(rows), image.device, dtype, text_only=True)
            prior = prefill_text_prior(model, len(rows), prior_cache)
    else:
        logits = uncached(answer_at)
        prior = uncached_prior(answer_at) if prior_scale else None
    for slot in range(answer_at, t):
        logp = _allowed(logits.float().log_softmax(dim=-1), slot, vocab, finished)  # (R, Vt + T)
        guided = logp
        if prior is not None:  # a finished row only pads on, unguided, so its score stays put
            likely = logp >= logp.amax(dim=-1, keepdim=True) + math.log(plausible)
            contrast = (1 + prior_scale) * logp - prior_scale * prior.float().log_softmax(dim=-1)
            guided = torch.where(finished[:, None], logp, contrast.masked_fill(~likely, float("-inf")))
        if sample:
            masked = _allowed(logits.float(), slot, vocab, finished) if prior is None else guided
            probs = filter_logits(masked, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
            token = _draw(probs, generator)
            scores = scores + guided.gather(1, token[:, None]).squeeze(1)
        else:
            best, index = (scores[:, None] + guided).view(b, -1).topk(width, dim=1)  # (B, W) over W x V
            parent = (index // logp.shape[1] + torch.arange(b, device=image.device)[:, None] * width).flatten()
            token, scores = (index % logp.shape[1]).flatten(), best.flatten()
            seqs, finished, own, logp = seqs[parent], finished[parent], own[parent], logp[parent]
            if not torch.equal(parent, keep):  # greedy, or every beam kept its own
                for c in (cache, prior_cache):
                    if c is not None:
                        c.reorder(parent)
        own = own + logp.gather(1, token[:, None]).squeeze(1)
        seqs[:, slot] = token
        finished = finished | (token >= vocab)
        if slot == t - 1 or bool(finished.all()):
            break
        logits = decode_text_step(model, token, cache) if cache is not None else uncached(slot + 1)
        if prior_scale:
            prior = decode_text_step(model, token, prior_cache) if prior_cache is not None else uncached_prior(slot + 1)
    # slots after a text's end hold their own pads, as a padded prompt does
    slots = torch.arange(t, device=image.device)[None]
    ended = (seqs >= vocab) & (slots >= answer_at)
    after = slots > torch.where(ended, slots, t).amin(dim=1, keepdim=True)
    seqs = torch.where(after, vocab + slots, seqs)
    out = []
    for i in range(b):
        mine = sorted(range(i * width, (i + 1) * width), key=lambda r: -scores[r].item())[:num]
        out.append([(seqs[r].cpu(), own[r].item()) for r in mine])
    return out
