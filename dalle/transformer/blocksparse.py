"""Masked attention for full-sequence passes on the CPU that computes about what the mask allows.

A full-sequence pass (a training step, the prompt pass of sampling) of a row, column or conv layer
(`attention.attend`, q_offset == 0) with SDPA and a dense (L, L) mask computes every score of the square,
twice the work of a full layer's causal kernel, though at the paper's stream (256 text + 32x32 image tokens)
an image query reads about 290 of up to 1,280 keys. Here:

- text queries: causal SDPA over the text keys (causality keeps them off every image key);
- image queries: one softmax over two key sets, merged by their log-sum-exps: every text key (one unmasked
  fused call, the bulk of the work), and a window of image keys per block of Q queries (a fused call with a
  (Q, W + Q) mask). The window is the W slots before the block and the block itself, in the order in which
  the pattern is a band: raster order for row (W = G) and conv (W = r * (G + 1), r = kernel // 2);
  column-major for column, whose blocks are whole columns (W = 0: a column's keys never leave it).

The backward is the fused kernel's own, run for each key set against the merged output and log-sum-exp
(the split-key form of FlashAttention's backward), which gives the gradients of the one softmax over both.
The masks come from `masks.mask_mod`, so the patterns keep one definition; `attention.attend` with
backend "sdpa" is the dense reference that tests/test_blocksparse.py compares against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from dalle.transformer.masks import mask_mod

# 64 queries a block: 32 and 128 time within the noise of it at 32x32 grids; much smaller blocks make small
# kernel calls, much larger ones read ever more masked keys per window.
_BLOCK = 64
_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
_HAVE_OPS = all(hasattr(torch.ops.aten, op) for op in _OPS)  # SDPA's CPU kernel with its log-sum-exp
# Shorter passes keep the dense mask: there the fused calls of every block and their merge cost more than the
# masked scores save. Measured by benchmarks/blocksparse_crossover.py (docs/performance.md): at 96 tokens
# every kind took about 1.8x the dense mask's time; at 288 row and column layers were faster and a conv layer,
# whose window reaches r rows back, slower; from 512 every kind was faster.
MIN_TOKENS = {"row": 256, "column": 256, "conv": 512}


def routes(kind: str, text_len: int, grid: int, length: int, dtype: torch.dtype) -> bool:
    """Whether a CPU full-sequence pass of `length` stream slots takes `attend` rather than the dense mask:
    at least MIN_TOKENS[kind] slots.

    Only fp32: in half precision `attention.attend` runs small passes as two batched matmuls, because the
    fused kernels' half-precision backward is slow on CPUs, and this path is made of those kernels. A
    column layer needs its whole grid to reorder it by columns; a partial grid (an image-to-image prompt
    pass) keeps the dense mask.
    """
    if not _HAVE_OPS or kind not in ("row", "column", "conv") or dtype != torch.float32 or length < MIN_TOKENS[kind]:
        return False
    image = length - text_len
    return not (kind == "column" and 0 < image < grid * grid)


def _blocking(kind: str, grid: int, kernel: int) -> tuple[int, int]:
    """(queries a block, image slots before the block that its window reaches back to), in the band order."""
    if kind == "column":
        return grid * max(1, _BLOCK // grid), 0
    return _BLOCK, grid if kind == "row" else (kernel // 2) * (grid + 1)


def _by_column(x: Tensor, grid: int) -> Tensor:  # (B, H, G*G, D) raster <-> column-major (its own inverse)
    b, h, n, d = x.shape
    return x.reshape(b, h, grid, grid, d).transpose(2, 3).reshape(b, h, n, d)


@functools.lru_cache(maxsize=64)
def _window_mask(kind: str, text_len: int, grid: int, kernel: int, image: int, dtype: torch.dtype) -> Tensor:
    """(1, nb, Q, W + Q) additive mask of each block's queries over its window: 0 where the pattern reads the
    key, -inf elsewhere (slots before the grid or past the last query too). Cached: do not modify."""
    block, reach = _blocking(kind, grid, kernel)
    nb = -(-image // block)
    order = torch.arange(grid * grid)  # order[p]: the raster slot at place p of the band order
    if kind == "column":
        order = order.view(grid, grid).t().reshape(-1)
    i = torch.arange(nb * block).view(nb, block, 1)  # each query's place
    j = torch.arange(nb).view(nb, 1, 1) * block - reach + torch.arange(reach + block)  # (nb, 1, W + Q) keys'

    def stream(p: Tensor) -> Tensor:
        return order[p.clamp(0, image - 1)] + text_len

    zero = torch.zeros((), dtype=torch.long)
    ok = mask_mod(kind, text_len, grid, kernel)(zero, zero, stream(i), stream(j)) & (j >= 0) & (j < image)
    ok = ok | (i >= image)  # padding queries (dropped after) read every key, so no row is all -inf
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, float("-inf"))[None]  # (1, nb, Q, W + Q)


class _TextAndWindow(torch.autograd.Function):
    """Image queries over every text key and their block's window of image keys: one softmax over both."""

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, kt: Tensor, vt: Tensor, kw: Tensor, vw: Tensor,
                mask: Tensor) -> Tensor:
        # q (B, H, M, D), M = nb * Q; kt, vt (B, H, T, D); kw, vw (B*H, nb, W + Q, D); mask (1, nb, Q, W + Q)
        b, h, m, d = q.shape
        nb = kw.shape[1]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        ow, lw = flash(q.reshape(b * h, nb, m // nb, d), kw, vw, attn_mask=mask)  # (B*H, nb, Q, Dv), (B*H, nb, Q)
        ow, lw = ow.reshape(b, h, m, -1), lw.reshape(b, h, m)
        if kt.shape[2]:
            ot, lt = flash(q, kt, vt)  # (B, H, M, Dv), (B, H, M)
            # the text keys' share of the joint softmax; few elementwise passes, each a parallel region
            o = torch.lerp(ow, ot, torch.sigmoid(lt - lw).unsqueeze(-1).to(ot.dtype))
            lse = torch.logaddexp(lt, lw)
        else:
            o, lse = ow, lw
        o, lse = o.contiguous(), lse.contiguous()
        ctx.save_for_backward(q, kt, vt, kw, vw, mask, o, lse)
        return o  # (B, H, M, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
        q, kt, vt, kw, vw, mask, o, lse = ctx.saved_tensors
        b, h, m, d = q.shape
        nb = kw.shape[1]
        grad = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        do = do.contiguous()

        def blocks(x: Tensor) -> Tensor:  # (B, H, M, E) -> (B*H, nb, Q, E)
            return x.reshape(b * h, nb, m // nb, x.shape[-1])

        # Each key set's backward with the merged output and log-sum-exp: the probabilities it recomputes are
        # those of the joint softmax, and its row term sum(dO * O) is the joint one.
        dqw, dkw, dvw = grad(blocks(do), blocks(q), kw, vw, blocks(o), lse.view(b * h, nb, m // nb), 0.0, False,
                             attn_mask=mask)
        dq, dkt, dvt = dqw.reshape(b, h, m, d), None, None
        if kt.shape[2]:
            dqt, dkt, dvt = grad(do, q, kt, vt, o, lse, 0.0, False)
            dq = dq + dqt
        return dq, dkt, dvt, dkw, dvw, None


def attend(q: Tensor, k: Tensor, v: Tensor, *, kind: str, text_len: int, grid: int, kernel: int = 11) -> Tensor:
    """A full-sequence pass of a row, column or conv layer: (B, H, L, D) x3 -> (B, H, L, Dv), L <= T + G*G.

    Equals `attention.attend(..., backend="sdpa")` (the dense mask) up to rounding, values and gradients;
    the caller checks the geometry, and `routes` says where this path is the faster one."""
    b, h, length, d = q.shape
    t = min(text_len, length)
    image = length - t
    if image == 0:  # the text alone: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, Dv)
    (qt, qi), (kt, ki), (vt, vi) = (x.split([t, image], dim=2) for x in (q, k, v))
    if kind == "column":
        qi, ki, vi = (_by_column(x, grid) for x in (qi, ki, vi))
    block, reach = _blocking(kind, grid, kernel)
    nb = -(-image // block)
    pad = nb * block - image

    spans = -(-(reach + block) // block)  # blocks a window spans

    def windows(x: Tensor) -> Tensor:  # (B, H, n, E) -> (B*H, nb, W + Q, E), block i's W + Q slots
        # Shifted block views side by side rather than `unfold`, whose backward is several times slower here.
        x = F.pad(x, (0, 0, reach, (nb + spans - 1) * block - reach - image)).view(b, h, nb + spans - 1, block, -1)
        x = torch.cat([x[:, :, i : i + nb] for i in range(spans)], dim=3)  # (B, H, nb, spans * Q, E)
        return x[:, :, :, : reach + block].reshape(b * h, nb, reach + block, -1)

    mask = _window_mask(kind, text_len, grid, kernel, image, q.dtype)
    qi = F.pad(qi, (0, 0, 0, pad)) if pad else qi
    yi = _TextAndWindow.apply(qi, kt, vt, windows(ki), windows(vi), mask)[:, :, :image]
    if kind == "column":
        yi = _by_column(yi, grid)
    if t == 0:
        return yi  # (B, H, N, Dv)
    return torch.cat([F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), yi], dim=2)  # (B, H, L, Dv)
