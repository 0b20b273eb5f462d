"""Autoregressive sampling of image tokens from a `DALLE` model (paper sec. 2.2 and 2.5).

Plain functions over a model. The cached path keeps every layer's keys and values in a preallocated
cache, so each new token costs one slot through the network; sparse layers read only the cached keys
their mask allows. Classifier-free guidance runs the conditional and the unconditional (empty-prompt)
streams as one batch. The caller's tensors are never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dalle.transformer.decoding import KVCache, decode_step, prefill
from dalle.transformer.model import DALLE


def empty_text(model: DALLE, batch: int, device: torch.device | str) -> Tensor:
    """The unconditional prompt: every text slot holds its own pad token. (B, T)"""
    cfg = model.config
    return (cfg.text_vocab_size + torch.arange(cfg.text_seq_len, device=device)).expand(batch, -1).clone()


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p of each token under its logits: (B, N, V), (B, N) -> (B, N), in fp32 (scoring a sequence the
    model was teacher-forced on: reading, reranking, the feedback losses)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then keep the top_k most likely tokens (0: all), then the smallest set whose mass
    reaches top_p (1.0: all). Returns new logits with the rest at -inf. (B, V) -> (B, V)"""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    if top_k and top_k < logits.shape[-1]:
        # the k-th largest: the least of an unsorted top k, which skips topk's sort
        kth = torch.topk(logits, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = mass - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _check(model: DALLE, text: Tensor, prime: Tensor | None, top_k: int, top_p: float) -> None:
    cfg = model.config
    if text.ndim != 2 or text.shape[1] != cfg.text_seq_len:
        raise ValueError(f"text must be (B, {cfg.text_seq_len}) ids, got {tuple(text.shape)}")
    if prime is not None and (prime.ndim != 2 or prime.shape[0] != text.shape[0]
                              or not 0 <= prime.shape[1] < cfg.image_seq_len):
        raise ValueError(f"prime must be (B, p) image codes with p < {cfg.image_seq_len}, got {tuple(prime.shape)}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")


def _draw(probs: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """One token per row by inverting the CDF at a uniform draw (a third of torch.multinomial's cost at
    this size). With one generator per row, row i depends on its own generator only, so an image can be
    regenerated from its seed whatever else shared its batch."""
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])  # (B,)
    else:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)  # (B,)
    cdf = probs.cumsum(dim=-1)
    # right=True: a draw of exactly 0 lands on the first token with mass, never on a filtered one
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


@torch.inference_mode()  # not no_grad: it also skips view and version tracking, 7% of a CPU decode step
def sample(
    model: DALLE,
    text: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cond_scale: float = 1.0,
    prime: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> Tensor:
    """Sample all image tokens for each prompt. text: (B, T) ids -> image codes (B, N).

    cond_scale != 1 mixes logits as uncond + cond_scale * (cond - uncond), the unconditional branch
    conditioned on the empty prompt. prime: (B, p) given first image tokens (the top p / G rows of a
    token grid: the paper's image-to-image mode). generator: one for the batch, or one per prompt
    row (then each row is reproducible on its own). on_token(k) is called after each sampled token.
    """
    _check(model, text, prime, top_k, top_p)
    cfg = model.config
    b, device = text.shape[0], text.device
    guided = cond_scale != 1.0
    stream_text = torch.cat([text, empty_text(model, b, device)]) if guided else text
    out = torch.zeros(b, cfg.image_seq_len, dtype=torch.long, device=device)
    start = 0 if prime is None else prime.shape[1]
    if start:
        out[:, :start] = prime
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, stream_text.shape[0], device, dtype) if use_cache else None

    def next_logits(k: int) -> Tensor:  # (B', Vi) logits for image token k
        if cache is None:
            codes = out.repeat(2, 1) if guided else out
            return model(stream_text, codes)[1][:, k]
        if k == start:
            prefix = out[:, :start]
            return prefill(model, stream_text, prefix.repeat(2, 1) if guided else prefix, cache)
        token = out[:, k - 1]
        return decode_step(model, token.repeat(2) if guided else token, cache)

    for k in range(start, cfg.image_seq_len):
        logits = next_logits(k).float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = torch.lerp(uncond, cond, cond_scale)  # uncond + cond_scale * (cond - uncond), one kernel
        probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
        out[:, k] = _draw(probs, generator)
        if on_token is not None:
            on_token(k)
    return out
