"""The CPU's block-sparse full-sequence attention (dalle/transformer/blocksparse.py) against the dense-mask
SDPA reference: the same outputs and the same gradients for q, k and v, for every sparse kind and geometry,
and the routing that decides which passes take it."""

import pytest
import torch

from dalle.transformer import blocksparse
from dalle.transformer.attention import attend
from dalle.transformer.model import DALLE
from tests.tiny import tiny_config

SPARSE = ("row", "column", "conv")
# (text_len, grid, kernel): no text; grids smaller than a block, not a divisor of it, several blocks, and the
# paper's 32x32 grid with its 11x11 conv kernel
GEOMETRIES = [(0, 4, 5), (3, 5, 5), (7, 8, 11), (16, 8, 5), (5, 32, 11), (9, 32, 5)]


@pytest.fixture(autouse=True)
def route_short_streams(monkeypatch):
    # the geometries here are small, so that the comparisons stay quick: let every length take the route
    monkeypatch.setattr(blocksparse, "MIN_TOKENS", dict.fromkeys(SPARSE, 0))


def values_and_grads(backend: str, q, k, v, **geometry):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y = attend(q, k, v, backend=backend, **geometry)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))  # the same dO for any strides
    return y.detach(), q.grad, k.grad, v.grad


def assert_matches_dense(length: int, **geometry):
    g = torch.Generator().manual_seed(0)
    # the model's layout: q, k and v are strided views of one projection
    q, k, v = torch.randn(2, length, 3, 2, 8, generator=g).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
    got, want = values_and_grads("auto", q, k, v, **geometry), values_and_grads("sdpa", q, k, v, **geometry)
    for name, a, b in zip(["y", "q", "k", "v"], got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name} {geometry}: {m}")


@pytest.mark.parametrize("kind", SPARSE)
@pytest.mark.parametrize("text_len, grid, kernel", GEOMETRIES)
def test_full_stream_matches_the_dense_mask(kind, text_len, grid, kernel):
    assert blocksparse.routes(kind, text_len, grid, text_len + grid * grid, torch.float32)
    assert_matches_dense(text_len + grid * grid, kind=kind, text_len=text_len, grid=grid, kernel=kernel)


@pytest.mark.parametrize("kind", ["row", "conv"])
@pytest.mark.parametrize("image", [0, 1, 3, 70])  # the text alone, the prompt pass, partial grids
def test_stream_prefixes_match_the_dense_mask(kind, image):
    text_len, grid = 6, 10
    assert blocksparse.routes(kind, text_len, grid, text_len + image, torch.float32)
    assert_matches_dense(text_len + image, kind=kind, text_len=text_len, grid=grid, kernel=5)


def test_routing():
    # only sparse kinds in fp32, and a column layer only over its whole grid (it reorders it by columns)
    assert not blocksparse.routes("full", 4, 8, 68, torch.float32)
    assert not blocksparse.routes("row", 4, 8, 68, torch.bfloat16)
    assert not blocksparse.routes("column", 4, 8, 40, torch.float32)
    assert blocksparse.routes("column", 4, 8, 4, torch.float32)
    assert blocksparse.routes("column", 4, 8, 68, torch.float32)


def test_short_streams_keep_the_dense_mask(monkeypatch):
    monkeypatch.setattr(blocksparse, "MIN_TOKENS", {"row": 256, "column": 256, "conv": 512})
    assert not blocksparse.routes("row", 32, 8, 96, torch.float32)
    assert blocksparse.routes("row", 32, 16, 288, torch.float32)
    assert blocksparse.routes("column", 32, 16, 288, torch.float32)
    assert not blocksparse.routes("conv", 32, 16, 288, torch.float32)
    assert blocksparse.routes("conv", 256, 16, 512, torch.float32)


def test_auto_takes_the_block_sparse_path_and_sdpa_the_dense_mask(monkeypatch):
    calls = []
    monkeypatch.setattr(blocksparse, "attend", lambda *a, **kw: calls.append(kw["kind"]) or torch.zeros(1))
    q = torch.randn(1, 2, 3 + 16, 8)
    attend(q, q, q, kind="row", text_len=3, grid=4, backend="auto")
    attend(q, q, q, kind="row", text_len=3, grid=4, backend="sdpa")
    attend(q, q, q, kind="full", text_len=3, grid=4, backend="auto")
    attend(q[:, :, :1], q, q, kind="row", text_len=3, grid=4, backend="auto", q_offset=18)  # a decoding step
    assert calls == ["row"]


def test_model_gradients_match_the_dense_masks():
    """A training step's loss and every parameter's gradient, all four kinds in one model."""
    torch.manual_seed(0)
    model = DALLE(tiny_config("dalle", text_vocab_size=50, image_grid_size=8, conv_kernel=5,
                              attn_schedule="row,column,conv,full"))
    cfg = model.config
    text = torch.randint(cfg.text_vocab_size, (3, cfg.text_seq_len))
    image = torch.randint(cfg.image_vocab_size, (3, cfg.image_seq_len))

    def loss_and_grads(backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        model.set_attention_backend(backend)
        text_logits, image_logits = model(text, image)
        loss = text_logits.logsumexp(-1).mean() + image_logits.logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads("auto"), loss_and_grads("sdpa")
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)
