"""Sparse decoding steps: a row, column or conv layer's step reads only the keys its mask allows (the text keys
plus `image_keys`, gathered into a window) and must give the logits of the dense step, which reads the whole
cache with the mask row as an additive bias (KVCache(sparse=False), kept as the reference)."""

import dataclasses

import pytest
import torch

from dalle.transformer.attention import dense_mask, image_keys
from dalle.transformer.decoding import KVCache, decode_step, prefill
from dalle.transformer.model import DALLE, DALLEConfig
from dalle.transformer.sampling import empty_text, sample

# a 5x5 grid and a 5-wide conv window, so rows, columns and windows differ and the window meets every edge
CFG = DALLEConfig(text_vocab_size=40, text_seq_len=5, image_vocab_size=24, image_grid_size=5, n_embd=32, n_layer=4,
                  n_head=4, conv_kernel=5)
SCHEDULES = ["row,row,row,row", "column,column,column,column", "conv,conv,conv,conv", "full", "paper",
             "full,conv,row,column"]


def model_for(schedule):
    torch.manual_seed(0)
    return DALLE(dataclasses.replace(CFG, attn_schedule=schedule)).eval()


def tokens(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, CFG.text_vocab_size, (b, CFG.text_seq_len), generator=g)
    return text, torch.randint(0, CFG.image_vocab_size, (b, CFG.image_seq_len), generator=g)


def step_logits(model, text, image, p, sparse):
    """Logits from the prompt pass after p given image tokens, then at every later image slot."""
    cache = KVCache(model.config, text.shape[0], "cpu", torch.float32, sparse=sparse)
    out = [prefill(model, text, image[:, :p], cache)]
    out += [decode_step(model, image[:, k], cache) for k in range(p, CFG.image_seq_len - 1)]
    return out


def test_image_key_sets_are_the_hand_written_patterns():
    t, g = CFG.text_seq_len, CFG.image_grid_size
    row, column, conv = (image_keys(kind, t, g, 5) for kind in ("row", "column", "conv"))
    for s in range(g * g):
        assert row[s].tolist() == [t + j for j in range(max(0, s - g), s + 1)]  # the previous g + 1 slots
        assert column[s].tolist() == [t + j for j in range(s % g, s + 1, g)]  # the slots above, same column
        r, c = divmod(s, g)
        window = [t + i * g + j for i in range(max(0, r - 2), r + 1) for j in range(max(0, c - 2), min(g, c + 3))]
        assert conv[s].tolist() == [k for k in window if k <= t + s]  # 5x5 around the slot, causal
    for kind, keys in (("row", row), ("column", column), ("conv", conv)):  # the same sets as the dense mask
        mask = dense_mask(kind, t, g, 5)
        for s, idx in enumerate(keys):
            assert mask[t + s].nonzero().squeeze(1).tolist() == list(range(t)) + idx.tolist()
    with pytest.raises(ValueError, match="full layer"):
        image_keys("full", t, g)


def test_windows_hold_the_text_keys_and_the_largest_key_set():
    cache = KVCache(model_for("row,column,conv,full").config, 2, "cpu", torch.float32)
    t, g = CFG.text_seq_len, CFG.image_grid_size
    assert [None if w is None else w.shape[2] for w in cache.window_k] == [t + g + 1, t + g, t + 3 * 5 - 2, None]
    assert cache.ring == [g + 1, 0, 0, 0]  # the row layer's window is a ring of its newest g + 1 keys
    assert cache.bias == [None] * 4  # the sparse cache keeps no (L, L) mask rows


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_guided_steps_give_the_dense_steps_logits(schedule):
    # the guided batch: prompts plus their empty-prompt rows, as `sample` runs them with cond_scale != 1
    model = model_for(schedule)
    text, image = tokens(2)
    text = torch.cat([text, empty_text(model, 2, "cpu")])
    image = image.repeat(2, 1)
    sparse, dense = (step_logits(model, text, image, 0, s) for s in (True, False))
    assert len(sparse) == CFG.image_seq_len
    for k, (a, b) in enumerate(zip(sparse, dense)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"image slot {k}: {m}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p", [1, 7, 13])  # primed with p given tokens: mid-row, so windows start part-filled
def test_primed_steps_give_the_dense_steps_logits(schedule, p):
    model = model_for(schedule)
    text, image = tokens(3, seed=p)
    for k, (a, b) in enumerate(zip(*(step_logits(model, text, image, p, s) for s in (True, False)))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"image slot {p + k}: {m}")


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_a_wrong_key_set_is_caught(kind, monkeypatch):
    # The comparison above has teeth: a step that misses each slot's oldest image key changes the logits.
    model = model_for(",".join([kind] * CFG.n_layer))
    text, image = tokens(2)
    dense = step_logits(model, text, image, 0, False)
    if kind == "row":  # a row layer keeps its newest G + 1 keys as a ring: one slot short drops the oldest

        def short_ring(*args, real=KVCache, **kwargs):
            cache = real(*args, **kwargs)
            cache.ring = [r - 1 for r in cache.ring]
            return cache

        monkeypatch.setitem(globals(), "KVCache", short_ring)
    else:
        wrong = tuple(idx[1:] if len(idx) > 1 else idx for idx in image_keys(kind, CFG.text_seq_len, 5, 5))
        monkeypatch.setattr("dalle.transformer.decoding.image_keys", lambda *a: wrong)
    sparse = step_logits(model, text, image, 0, True)
    assert not all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(sparse, dense))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_sampling_equals_uncached(schedule):
    model = model_for(schedule)
    text, image = tokens(2)
    for kw in ({"cond_scale": 3.0}, {"prime": image[:, :7]}):
        outs = [sample(model, text, top_k=6, generator=torch.Generator().manual_seed(5), use_cache=c, **kw)
                for c in (True, False)]
        assert torch.equal(outs[0], outs[1])
