"""Reranking DALL-E's samples with the reranker (paper sec. 2.5): score every candidate, keep the best.

The paper drew 512 samples per caption and kept the 32 that a pretrained contrastive model ranked highest;
`best(rerank(reranker, tokenizer, prompt, images), 32)` is that step. Plain functions over a model, no I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.reranker.model import Reranker
from dalle.tokenizer import TextTokenizer


@torch.no_grad()
def rerank(reranker: Reranker, tokenizer: TextTokenizer, prompt: str, images: Tensor, *, batch_size: int = 64,
           logit_scaled: bool = False) -> Tensor:
    """Scores (N,) of images (N, 3, H, W) in [0, 1] for `prompt`, in input order, higher is better.

    The score is the cosine similarity of the two encodings (the "Reranker score"), or with `logit_scaled` the
    reranker's logit (cosine times its learned temperature). Images of another size than the reranker's are
    resized first (bilinear, antialiased), so the dVAE's output can be passed as it is. `batch_size`
    bounds the images encoded at once. The scores are float32, on the device of `images`.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    cfg = reranker.config
    param = next(reranker.parameters())
    ids, _ = tokenizer.encode_batch([prompt], cfg.text_seq_len)  # warns when the prompt is truncated
    text = reranker.encode_text(ids.to(param.device)).float()  # (1, E)
    scores = []
    for chunk in images.split(batch_size):  # (n, 3, H, W)
        chunk = chunk.to(param.device, param.dtype)
        if chunk.shape[-2:] != (cfg.image_size, cfg.image_size):
            chunk = F.interpolate(chunk, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                  align_corners=False, antialias=True).clamp(0, 1)
        scores.append(reranker.encode_image(chunk).float() @ text[0])  # (n,)
    out = torch.cat(scores) if scores else torch.zeros(0, device=param.device)
    if logit_scaled:
        out = out * reranker.scale().float()
    return out.to(images.device)


def best(scores: Tensor, k: int) -> Tensor:
    """Indices (k,) of the k highest scores, best first (the paper kept 32 of 512)."""
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be in [1, {len(scores)}] (the number of scores), got {k}")
    return torch.topk(scores, k, sorted=True).indices
