"""The paper's sparse masks (sec. 2.2, appendix B.1, Fig. 11) against hand-written patterns, and the two
attention backends against each other, a naive reference and cached decoding."""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from dalle.transformer.attention import (
    KINDS,
    additive_mask,
    attend,
    attend_newest,
    block_sparsity,
    dense_mask,
    layer_kinds,
    mask_mod,
)

T, G = 2, 4  # 2 text slots and a 4x4 image grid: L = 18

# Image -> image part (query slot k = line, key slot j = column) written out by hand from the definitions:
# row: the previous G + 1 = 5 slots; column: k - j divisible by 4; conv (kernel 3): 3x3 window, causal.
ROW = """
1...............
11..............
111.............
1111............
11111...........
.11111..........
..11111.........
...11111........
....11111.......
.....11111......
......11111.....
.......11111....
........11111...
.........11111..
..........11111.
...........11111
"""
COLUMN = """
1...............
.1..............
..1.............
...1............
1...1...........
.1...1..........
..1...1.........
...1...1........
1...1...1.......
.1...1...1......
..1...1...1.....
...1...1...1....
1...1...1...1...
.1...1...1...1..
..1...1...1...1.
...1...1...1...1
"""
CONV3 = """
1...............
11..............
.11.............
..11............
11..1...........
111.11..........
.111.11.........
..11..11........
....11..1.......
....111.11......
.....111.11.....
......11..11....
........11..1...
........111.11..
.........111.11.
..........11..11
"""


def parse(pattern: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line] for line in pattern.split()])


@pytest.mark.parametrize(
    "kind,kernel,expected",
    [("row", 11, ROW), ("column", 11, COLUMN), ("conv", 3, CONV3)],
)
def test_image_masks_match_hand_written(kind, kernel, expected):
    assert torch.equal(dense_mask(kind, T, G, kernel)[T:, T:], parse(expected))


def test_full_and_wide_conv_are_causal():
    causal = torch.ones(T + G * G, T + G * G, dtype=torch.bool).tril()
    assert torch.equal(dense_mask("full", T, G), causal)
    assert torch.equal(dense_mask("conv", T, G, kernel=11), causal)  # a window wider than the grid is full


@pytest.mark.parametrize("kind", KINDS)
def test_text_blocks(kind):
    m = dense_mask(kind, T, G, 3)
    assert torch.equal(m[:T, :T], torch.tensor([[True, False], [True, True]]))  # causal text
    assert m[T:, :T].all()  # image queries read every text key
    assert not m[:T, T:].any()  # text never sees the image


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text_len,grid,kernel", [(2, 4, 3), (3, 5, 3), (0, 6, 5), (5, 8, 11)])
def test_masks_causal_and_see_self(kind, text_len, grid, kernel):
    m = dense_mask(kind, text_len, grid, kernel)
    length = text_len + grid * grid
    assert m.shape == (length, length) and m.dtype == torch.bool
    assert not m.triu(1).any()
    assert m.diagonal().all()


@pytest.mark.parametrize("kind", KINDS)
def test_dense_mask_is_the_vmapped_mask_mod(kind):
    expected = create_mask(mask_mod(kind, 3, 5, 3), None, None, 28, 28, device="cpu")  # (1, 1, L, L)
    assert torch.equal(dense_mask(kind, 3, 5, 3), expected[0, 0])


def test_layer_kinds():
    assert layer_kinds(8) == ("row", "row", "column", "row", "row", "row", "column", "conv")
    assert layer_kinds(1) == ("conv",)
    assert layer_kinds(3, "full") == ("full", "full", "full")
    assert layer_kinds(3, "row, column,conv") == ("row", "column", "conv")


@pytest.mark.parametrize(
    "n,schedule,match",
    [(3, "row,column", "2 kinds"), (2, "row,diag", "diag"), (2, "papr", "papr"), (0, "paper", "n_layers")],
)
def test_bad_schedules_raise(n, schedule, match):
    with pytest.raises(ValueError, match=match):
        layer_kinds(n, schedule)


def test_bad_mask_arguments_raise():
    with pytest.raises(ValueError, match="column"):
        mask_mod("diagonal", T, G)
    with pytest.raises(ValueError, match="odd"):
        dense_mask("conv", T, G, kernel=4)


def qkv(length: int, *, keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = length if keys is None else keys
    return torch.randn(2, 2, length, 8), torch.randn(2, 2, keys, 8), torch.randn(2, 2, keys, 8)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [19, 13])  # the whole stream (T=3, G=4) and a prefix ending mid-image
def test_sdpa_and_flex_agree(kind, length):
    q, k, v = qkv(length)
    geometry = dict(kind=kind, text_len=3, grid=G, kernel=3)
    sdpa = attend(q, k, v, backend="sdpa", **geometry)
    flex = attend(q, k, v, backend="flex", **geometry)
    assert sdpa.shape == (2, 2, length, 8)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [19, 13])
def test_sdpa_matches_naive_softmax(kind, length):
    q, k, v = qkv(length)
    mask = dense_mask(kind, 3, G, 3)[:length, :length]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))  # (B, H, L, L)
    expected = scores.softmax(-1) @ v
    out = attend(q, k, v, kind=kind, text_len=3, grid=G, kernel=3, backend="auto")  # sdpa on the CPU
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_sequence(kind):
    q, k, v = qkv(19)
    geometry = dict(kind=kind, text_len=3, grid=G, kernel=3)
    full = attend(q, k, v, **geometry)
    steps = [attend(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], q_offset=i, **geometry) for i in range(19)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-6, rtol=1e-6)
    chunk = attend(q[:, :, 5:9], k[:, :, :9], v[:, :, :9], q_offset=5, **geometry)  # several queries at once
    torch.testing.assert_close(chunk, full[:, :, 5:9], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_additive_mask_is_the_dense_mask_as_a_bias(kind):
    mask, bias = dense_mask(kind, 3, G, 3), additive_mask(kind, 3, G, 3, dtype=torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and torch.equal(bias == 0, mask) and torch.isneginf(bias[~mask]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_step_reads_a_prefix_view_of_a_larger_cache(kind):
    # The model's KV cache is preallocated: a step reads a prefix view of it, and slots past the newest
    # one (here filled with large values) must not leak in.
    q, k, v = qkv(19)
    full = attend(q, k, v, kind=kind, text_len=3, grid=G, kernel=3)
    cache_k, cache_v = (torch.full((2, 2, 25, 8), 1e4) for _ in range(2))
    cache_k[:, :, :19], cache_v[:, :, :19] = k, v
    bias = additive_mask(kind, 3, G, 3)
    for i in (0, 2, 3, 11, 18):
        out = attend_newest(q[:, :, i : i + 1], cache_k[:, :, : i + 1], cache_v[:, :, : i + 1], bias[i, : i + 1])
        torch.testing.assert_close(out, full[:, :, i : i + 1], atol=1e-5, rtol=1e-5)


def test_unmasked_decoding_step_equals_sdpa():
    # A full layer's step (bias None) takes two batched products instead of SDPA's fused kernel
    q, k, v = qkv(19)
    cache_k, cache_v = (torch.full((2, 2, 25, 8), 1e4) for _ in range(2))
    cache_k[:, :, :19], cache_v[:, :, :19] = k, v
    for i in (0, 5, 18):
        out = attend_newest(q[:, :, i : i + 1], cache_k[:, :, : i + 1], cache_v[:, :, : i + 1], None)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1])
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_cpu_path_matches_fp32(kind):
    # bf16 on the CPU takes two batched matmuls with an additive mask instead of the fused kernel.
    q, k, v = (t.requires_grad_() for t in qkv(19))
    geometry = dict(kind=kind, text_len=3, grid=G, kernel=3)
    ref = attend(q, k, v, **geometry)
    ref.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend(*half, **geometry)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for h, g in zip(half, grads):
        torch.testing.assert_close(h.grad.float(), g, atol=5e-2, rtol=5e-2)
    # and a prefix of the stream (a prompt without image tokens yet)
    torch.testing.assert_close(attend(*(t[:, :, :5] for t in half), **geometry).float(), ref[:, :, :5].detach(),
                               atol=3e-2, rtol=3e-2)


def test_sdpa_backward_runs():
    q, k, v = (t.requires_grad_() for t in qkv(19))
    attend(q, k, v, kind="conv", text_len=3, grid=G, kernel=3, backend="auto").sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))


@pytest.mark.parametrize(
    "shapes,offset,match",
    [
        (((2, 2, 4, 8), (2, 2, 5, 8), (2, 2, 5, 8)), 0, "expected 4"),
        (((2, 2, 1, 8), (2, 2, 4, 8), (2, 2, 4, 8)), 0, "expected 1"),
        (((2, 2, 20, 8), (2, 2, 20, 8), (2, 2, 20, 8)), 0, "exceed"),
        (((2, 2, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)), 0, "matching"),
        (((2, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)), 0, "q must be"),
    ],
)
def test_attend_validates_shapes(shapes, offset, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, kind="row", text_len=3, grid=G, q_offset=offset)


def test_attend_rejects_unknown_backend():
    q, k, v = qkv(19)
    with pytest.raises(ValueError, match="sdpa"):
        attend(q, k, v, kind="row", text_len=3, grid=G, backend="xformers")


def test_block_sparsity_orderings():
    full, row, column, conv = (block_sparsity(kind, 256, 32) for kind in KINDS)
    assert full == pytest.approx(0.45)  # 45 of 10x10 tiles lie above the diagonal
    assert row > 0.5 and conv > full and row > full
    # In raster order every 128-slot block spans all 32 columns, so column attention skips no extra tile
    # (it is sparse per element, not per tile).
    assert column == pytest.approx(full)
    assert 0.0 <= block_sparsity("row", 2, 4, block=1) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_compiled_flex_matches_sdpa_on_cuda(kind):
    q, k, v = (t.cuda() for t in qkv(256 + 1024))
    geometry = dict(kind=kind, text_len=256, grid=32)
    torch.testing.assert_close(
        attend(q, k, v, backend="auto", **geometry), attend(q, k, v, backend="sdpa", **geometry), atol=1e-4, rtol=1e-4
    )
