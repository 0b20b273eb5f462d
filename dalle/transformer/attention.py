"""Masked attention for the DALL-E transformer.

The paper's attention patterns (Ramesh et al. 2021, sec. 2.2, appendix B.1, Fig. 11: full causal, row, column
and convolutional masks over the image grid) are defined once in `masks`; this module turns them into dense
masks and FlexAttention BlockMasks and runs the masked attention itself on those backends (and, for CPU
training passes, `blocksparse`). The model owns the q/k/v projections and the KV cache; this module only
decides which keys each query reads.

Stream layout: L = T + N positions, T text slots then N = G*G image slots. Image slot k (stream position T + k)
predicts image token k, at grid position (k // G, k % G); image masks are defined on those positions. Every
pattern is causal in stream order, image queries always see all T text keys, text queries never see image keys.
With `image_first` (the reading layouts: caption, question and answer) the N image slots come first and the T
text slots after them: image queries keep the same sparse pattern among image keys, and text queries read every
image key and the text keys before them (causal). A (B,) bool tensor gives each row of a batch its own order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # imported where used: the module pulls in sympy, a sixth of generate.py's start on a CPU
    from torch.nn.attention.flex_attention import BlockMask

from dalle.transformer import blocksparse
from dalle.transformer.masks import KINDS, _check_geometry, layer_kinds, mask_mod

# The mask definitions are re-exported: callers of attention need one module.
__all__ = ["BACKENDS", "KINDS", "additive_mask", "attend", "attend_newest", "block_sparsity", "dense_mask",
           "image_keys", "layer_kinds", "mask_mod"]

BACKENDS = ("auto", "sdpa", "flex")


def dense_mask(
    kind: str, text_len: int, grid: int, kernel: int = 11, device: torch.device | str | None = None,
    image_first: bool = False,
) -> Tensor:
    """(L, L) boolean mask, L = text_len + grid**2, True = may attend. Cached per arguments: do not modify."""
    _check_geometry(kind, text_len, grid, kernel)
    return _dense_mask(kind, text_len, grid, kernel, torch.device(device if device is not None else "cpu"),
                       bool(image_first))


@functools.lru_cache(maxsize=64)
def _dense_mask(kind: str, text_len: int, grid: int, kernel: int, device: torch.device,
                image_first: bool = False) -> Tensor:
    if device.type != "cpu":  # build once on the CPU, keep one copy per device
        return _dense_mask(kind, text_len, grid, kernel, torch.device("cpu"), image_first).to(device)
    idx = torch.arange(text_len + grid * grid)  # (L,)
    zero = torch.zeros((), dtype=torch.long)
    return mask_mod(kind, text_len, grid, kernel, image_first)(zero, zero, idx[:, None], idx[None, :])  # (L, L)


def additive_mask(
    kind: str, text_len: int, grid: int, kernel: int = 11, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, image_first: bool = False,
) -> Tensor:
    """(L, L) float mask: 0 where `dense_mask` is True, -inf elsewhere. Cached per arguments: do not modify."""
    _check_geometry(kind, text_len, grid, kernel)
    return _additive_mask(kind, text_len, grid, kernel, torch.device(device if device is not None else "cpu"), dtype,
                          bool(image_first))


@functools.lru_cache(maxsize=64)
def _additive_mask(kind: str, text_len: int, grid: int, kernel: int, device: torch.device,
                   dtype: torch.dtype, image_first: bool = False) -> Tensor:
    mask = _dense_mask(kind, text_len, grid, kernel, device, image_first)
    return torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(~mask, float("-inf"))  # (L, L)


def image_keys(
    kind: str, text_len: int, grid: int, kernel: int = 11, device: torch.device | str | None = None
) -> tuple[Tensor, ...]:
    """Per image slot s, the stream positions (ascending, long) of the image keys a sparse layer's query at
    slot s reads; with the T text keys, exactly the True entries of row T + s of `dense_mask`. Taken from
    that mask, so the patterns keep one definition. Cached per arguments: do not modify."""
    _check_geometry(kind, text_len, grid, kernel)
    if kind == "full":
        raise ValueError("a full layer's query reads every cached key: it has no image key sets")
    return _image_keys(kind, text_len, grid, kernel, torch.device(device if device is not None else "cpu"))


@functools.lru_cache(maxsize=16)
def _image_keys(kind: str, text_len: int, grid: int, kernel: int, device: torch.device) -> tuple[Tensor, ...]:
    image = _dense_mask(kind, text_len, grid, kernel, torch.device("cpu"))[text_len:, text_len:]  # (N, N)
    _, cols = image.nonzero(as_tuple=True)  # row-major, so each slot's keys come out together and ascending
    return tuple(t.to(device) for t in (cols + text_len).split(image.sum(dim=1).tolist()))


# Half-precision attention on the CPU: below this many scores per layer, two batched matmuls beat the
# fused kernel, whose bf16 backward is slow on CPUs (fwd+bwd at 8 x 8 heads x 288 tokens: 15 ms vs 36 ms).
_CPU_MATH_MAX_SCORES = 2**25


def _math_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    b, h, lq, d = q.shape
    scores = torch.baddbmm(bias.expand(b * h, lq, k.shape[2]), q.reshape(b * h, lq, d),
                           k.reshape(b * h, -1, d).transpose(1, 2), alpha=d**-0.5)  # (B*H, Lq, Lk)
    y = torch.bmm(scores.softmax(dim=-1), v.reshape(b * h, -1, v.shape[-1]))  # (B*H, Lq, Dv)
    return y.view(b, h, lq, -1)


def attend_newest(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """One decoding step: the newest slot's query (B, H, 1, D) against the cached keys and values (B, H, Lk, D);
    bias (Lk,) is the query's row of `additive_mask` (0: the layer's pattern reads that key, -inf: it skips
    it), or None where it reads every key (a full layer, or a sparse layer's window of its keys). Keys and
    values may be prefix views of the cache.

    Two batched products with (B, H) merged into one batch dimension, so that the keys stay a view of the
    cache; masked, the first (baddbmm) also scales the scores and adds the mask. On a CPU these beat SDPA's
    fused kernel for one query, most at many rows (docs/performance.md has the A/B); a GPU keeps it."""
    if bias is None and q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dv)
    b, h, _, d = q.shape
    lk = k.shape[2]
    qs, ks = q.reshape(b * h, 1, d), k.reshape(b * h, lk, d).transpose(1, 2)
    if bias is None:
        scores = torch.bmm(qs, ks).mul_(d**-0.5)  # (B*H, 1, Lk)
    else:
        scores = torch.baddbmm(bias, qs, ks, alpha=d**-0.5)  # (B*H, 1, Lk)
    return torch.bmm(scores.softmax(dim=-1).to(v.dtype), v.reshape(b * h, lk, -1)).view(b, h, 1, -1)


@functools.lru_cache(maxsize=64)
def _block_mask(kind: str, text_len: int, grid: int, kernel: int, length: int, device: torch.device,
                image_first: bool = False) -> BlockMask:
    # The pattern does not depend on the length, so a prefix of the stream just asks for a smaller mask.
    from torch.nn.attention.flex_attention import create_block_mask

    fn = mask_mod(kind, text_len, grid, kernel, image_first)
    return create_block_mask(fn, None, None, length, length, device=device)


@functools.lru_cache(maxsize=2)
def _flex(compiled: bool) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex materialises every score; only the compiled kernel skips the fully masked tiles.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _check_attend(q: Tensor, k: Tensor, v: Tensor, length: int, backend: str, q_offset: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need matching (B, H), k and v of "
            "equal length, and q and k of equal head size"
        )
    lq, lk = q.shape[2], k.shape[2]
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative int, got {q_offset!r}")
    if lq < 1 or lk != q_offset + lq:
        raise ValueError(
            f"keys must be the stream prefix up to the last query: got {lk} keys for {lq} queries at "
            f"q_offset={q_offset} (expected {q_offset + lq})"
        )
    if lk > length:
        raise ValueError(f"{lk} keys exceed the stream length {length} (text_len + grid**2)")


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kind: str,
    text_len: int,
    grid: int,
    kernel: int = 11,
    backend: str = "auto",
    q_offset: int = 0,
    image_first: bool | Tensor = False,
) -> Tensor:
    """Masked softmax attention: (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv) -> (B, H, Lq, Dv).

    Queries sit at stream positions q_offset .. q_offset + Lq - 1; keys are the prefix 0 .. Lk - 1 with
    Lk == q_offset + Lq. With q_offset == 0 this is the full (possibly shortened) sequence; with Lq == 1 it is
    one cached decoding step, where the sparse mask only restricts which cached keys are read.

    backend: "sdpa" (dense boolean mask, any device, autograd), "flex" (FlexAttention with a cached BlockMask,
    compiled on CUDA; no backward on CPU) or "auto" (flex on CUDA for full sequences; on the CPU, full sequences
    of sparse layers in fp32 in text-first order through `blocksparse`, which computes about the scores the
    mask keeps; sdpa otherwise). Decoding steps (q_offset > 0) always use sdpa. image_first: the stream order
    (see the module docstring), one bool for the batch or a (B,) bool tensor per row; a batch that mixes
    orders takes SDPA with a per-row dense mask.
    """
    _check_geometry(kind, text_len, grid, kernel)
    _check_attend(q, k, v, text_len + grid * grid, backend, q_offset)
    lq, lk = q.shape[2], k.shape[2]
    if isinstance(image_first, Tensor):
        if kind != "full":
            return _attend_mixed(q, k, v, kind, text_len, grid, kernel, q_offset, image_first)
        image_first = False  # causal either way
    first = bool(image_first)
    full_seq = q_offset == 0
    # "full" is plain causal attention, which SDPA's fused causal kernels already do best.
    use_flex = full_seq and (backend == "flex" or (backend == "auto" and q.is_cuda and kind != "full"))
    if use_flex:
        block_mask = _block_mask(kind, text_len, grid, kernel, lq, q.device, first)
        return _flex(q.is_cuda)(q, k, v, block_mask=block_mask)  # (B, H, Lq, Dv)
    if (full_seq and backend == "auto" and q.device.type == "cpu" and not first
            and blocksparse.routes(kind, text_len, grid, lq, q.dtype)):
        return blocksparse.attend(q, k, v, kind=kind, text_len=text_len, grid=grid, kernel=kernel)  # (B, H, Lq, Dv)
    if (full_seq and not q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[0] * q.shape[1] * lq * lk <= _CPU_MATH_MAX_SCORES):
        bias = _additive_mask(kind, text_len, grid, kernel, q.device, q.dtype, first)[:lq, :lk]
        return _math_attention(q, k, v, bias)  # (B, H, Lq, Dv)
    if kind == "full" and full_seq:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, Lq, Dv)
    if lq == 1 and (kind == "full" or (first and q_offset >= grid * grid)):
        # the newest query reads the whole cache: a full layer's, or a text query after the image
        return attend_newest(q, k, v, None)  # (B, H, 1, Dv)
    if lq == 1 and not q.is_cuda:
        bias = _additive_mask(kind, text_len, grid, kernel, q.device, q.dtype, first)[q_offset, :lk]  # (Lk,)
        return attend_newest(q, k, v, bias)  # (B, H, 1, Dv)
    mask = dense_mask(kind, text_len, grid, kernel, q.device, first)[q_offset : q_offset + lq, :lk]  # (Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, Dv)


def _attend_mixed(q: Tensor, k: Tensor, v: Tensor, kind: str, text_len: int, grid: int, kernel: int,
                  q_offset: int, image_first: Tensor) -> Tensor:
    """A batch whose rows have different stream orders: each row gets its order's mask."""
    if image_first.shape != (q.shape[0],):
        raise ValueError(f"image_first must be one bool per row, shape ({q.shape[0]},), got {tuple(image_first.shape)}")
    lq, lk = q.shape[2], k.shape[2]
    rows = slice(q_offset, q_offset + lq)
    masks = [dense_mask(kind, text_len, grid, kernel, q.device, first)[rows, :lk] for first in (False, True)]
    mask = torch.where(image_first.to(q.device)[:, None, None, None], masks[1], masks[0])  # (B, 1, Lq, Lk)
    if not q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        bias = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        b, h = q.shape[:2]
        return _math_attention(q, k, v, bias.expand(b, h, lq, lk).reshape(b * h, lq, lk))  # (B, H, Lq, Dv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, Dv)


def block_sparsity(kind: str, text_len: int, grid: int, kernel: int = 11, block: int = 128) -> float:
    """Fraction of (q-block, kv-block) tiles of the full-length mask that are entirely masked (what flex skips).

    The last partial block is padded with masked positions, as FlexAttention does.
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    mask = dense_mask(kind, text_len, grid, kernel)  # (L, L)
    length = mask.shape[0]
    n = -(-length // block)
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)  # (n*block, n*block)
    padded[:length, :length] = mask
    live = padded.view(n, block, n, block).any(dim=3).any(dim=1)  # (n, n) tiles with any visible pair
    return 1.0 - live.float().mean().item()
