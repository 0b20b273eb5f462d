"""Stage 2: the transformer, its loss, and sampling with and without the key/value cache."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from dalle.config import from_dict
from dalle.train.config import load_yaml
from dalle.train.tasks.transformer import DALLEObjective, DALLETask
from dalle.transformer.decoding import KVCache, decode_step, prefill
from dalle.transformer.model import DALLE, DALLEConfig
from dalle.transformer.sampling import empty_text, filter_logits, sample

CFG = tiny_config("dalle", text_vocab_size=50, text_seq_len=6, image_vocab_size=32)


def model_for(schedule="paper", **kw):
    torch.manual_seed(0)
    return DALLE(dataclasses.replace(CFG, attn_schedule=schedule, **kw)).eval()


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, CFG.text_vocab_size, (b, CFG.text_seq_len), generator=g)
    text[:, 4:] = CFG.text_vocab_size + torch.arange(4, CFG.text_seq_len)  # per-position pads
    image = torch.randint(0, CFG.image_vocab_size, (b, CFG.image_seq_len), generator=g)
    return text, image


def test_logit_shapes_cover_each_vocabulary_only():
    model = model_for()
    text, image = batch()
    tl, il = model(text, image)
    assert tl.shape == (3, CFG.text_seq_len, CFG.text_vocab_size + CFG.text_seq_len)
    assert il.shape == (3, CFG.image_seq_len, CFG.image_vocab_size)


def test_per_position_pad_tokens_are_distinct_learned_embeddings():
    model = model_for()
    pads = CFG.text_vocab_size + torch.arange(CFG.text_seq_len)
    emb = model.text_emb(pads)
    assert emb.requires_grad
    assert torch.cdist(emb, emb).add(torch.eye(len(pads)) * 1e9).min() > 0  # all different
    # An empty prompt is every position's own pad, and the model predicts pads (end of text) too.
    assert torch.equal(empty_text(model, 2, "cpu")[0], pads)


@pytest.mark.parametrize("schedule", ["paper", "full"])
def test_causal_in_the_stream(schedule):
    model = model_for(schedule)
    text, image = batch(1)
    _, il = model(text, image)
    changed = image.clone()
    changed[0, 7] = (changed[0, 7] + 1) % CFG.image_vocab_size
    _, il2 = model(text, changed)
    # image token 7 feeds slot 8: logits for tokens 0..7 cannot move, later ones may
    torch.testing.assert_close(il[:, :8], il2[:, :8])
    assert not torch.allclose(il[:, 8:], il2[:, 8:])
    # every image position reads the text
    text2 = text.clone()
    text2[0, 1] = (text2[0, 1] + 1) % CFG.text_vocab_size
    _, il3 = model(text2, image)
    assert (il3 - il).abs().amax(dim=-1).min() > 0


def test_loss_weighting_is_one_eighth_text_seven_eighths_image():
    model = model_for()
    text, image = batch()

    class Tok:
        vocab_size = CFG.text_vocab_size

    task = DALLETask(model, DALLEObjective(), Tok(), [], [])
    loss, metrics = task.loss(model, {"text": text, "codes": image}, 0)
    tl, il = model(text, image)
    t = F.cross_entropy(tl.flatten(0, 1), text.flatten())
    i = F.cross_entropy(il.flatten(0, 1), image.flatten())
    torch.testing.assert_close(loss, t / 8 + 7 * i / 8)
    assert metrics["text_loss"] == pytest.approx(t.item(), rel=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = DALLE(CFG).train()
    text, image = batch(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        tl, il = model(text, image)
        loss = F.cross_entropy(tl.flatten(0, 1), text.flatten()) / 8 + 7 * F.cross_entropy(
            il.flatten(0, 1), image.flatten()) / 8
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first


def _loss_curve(precision, steps=40):
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, attn_schedule="paper")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text, image = batch(4)
    curve = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            tl, il = model(text, image)
            loss = F.cross_entropy(tl.flatten(0, 1).float(), text.flatten()) / 8 + 7 * F.cross_entropy(
                il.flatten(0, 1).float(), image.flatten()) / 8
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def test_bf16_autocast_training_follows_the_fp32_loss_curve():
    # The training engine's bf16 precision is exactly this autocast; its speed-up is only worth having if
    # the model still learns the same thing.
    fp32, bf16 = _loss_curve("fp32"), _loss_curve("bf16")
    assert bf16[-1] < 0.5 * bf16[0]  # it learns at all
    assert ((bf16 - fp32).abs() / fp32).max() < 0.1


def test_gradient_checkpointing_gives_the_same_gradients():
    model = model_for().train()
    text, image = batch(2)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        tl, il = model(text, image)
        (tl.float().logsumexp(-1).mean() + il.float().logsumexp(-1).mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("schedule", ["paper", "full", "row,column,conv,full"])
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_sampling_equals_uncached(schedule, cond_scale):
    model = model_for(schedule)
    text, image = batch(2)
    text_before = text.clone()
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(sample(model, text, top_k=8, temperature=1.0, cond_scale=cond_scale, generator=g,
                           use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(text, text_before)  # the caller's prompt is never modified
    assert outs[0].shape == (2, CFG.image_seq_len)
    assert 0 <= outs[0].min() and outs[0].max() < CFG.image_vocab_size


@pytest.mark.parametrize("schedule", ["paper", "full"])
def test_packed_decoding_step_gives_the_plain_products_logits(schedule):
    # On a CPU in fp32 a decoding step runs its products through oneDNN on weights packed once per cache,
    # with the MLP's GELU inside the first product; the logits must be those of plain F.linear and GELU.
    model = model_for(schedule)
    text, image = batch(2)
    fast, plain = (KVCache(model.config, 2, "cpu", torch.float32) for _ in range(2))
    if fast.packed is None:
        pytest.skip("this torch build has no oneDNN")
    plain.packed = None
    torch.testing.assert_close(prefill(model, text, image[:, :0], fast), prefill(model, text, image[:, :0], plain))
    for k in range(6):
        torch.testing.assert_close(decode_step(model, image[:, k], fast), decode_step(model, image[:, k], plain),
                                   atol=1e-5, rtol=1e-5)
    assert len(fast.packed) == 4 * CFG.n_layer + 1  # every product of the step took the packed path


def test_a_rows_decoding_step_does_not_depend_on_its_batch():
    # Part of what makes an image reproducible from its seed alone (generate.py's sidecars): from the same
    # cache, a row's decoding logits carry the same bits alone as beside others (the prompt pass, MKL's,
    # may still differ in the last bit between batch sizes).
    model = model_for()
    text, image = batch(3)
    together, alone = KVCache(model.config, 3, "cpu", torch.float32), KVCache(model.config, 1, "cpu", torch.float32)
    prefill(model, text, image[:, :0], together)
    for key in ("k", "v"):
        for mine, theirs in zip(getattr(alone, key), getattr(together, key)):
            mine.copy_(theirs[1:2])
    alone.length = together.length
    for k in range(6):
        assert torch.equal(decode_step(model, image[:, k], together)[1:2], decode_step(model, image[1:2, k], alone))


def test_priming_keeps_the_given_rows_and_matches_uncached():
    model = model_for()
    text, image = batch(2)
    prime = image[:, :8].clone()  # the top two rows of the 4x4 grid
    prime_before = prime.clone()
    outs = [sample(model, text, prime=prime, generator=torch.Generator().manual_seed(1), use_cache=c)
            for c in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :8], prime_before) and torch.equal(prime, prime_before)


def test_guidance_uses_the_empty_prompt_for_the_unconditional_branch():
    model = model_for()
    text, _ = batch(1)
    # With cond_scale 0 the result is the unconditional model: same as sampling from the empty prompt.
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    uncond = sample(model, text, cond_scale=0.0, generator=g())
    empty = sample(model, empty_text(model, 1, "cpu"), generator=g())
    assert torch.equal(uncond, empty)
    _, image = batch(1)
    assert not torch.allclose(model(text, image)[1], model(empty_text(model, 1, "cpu"), image)[1])


def test_seed_reproducibility_and_batching():
    model = model_for()
    text, _ = batch(2)
    a = sample(model, text, generator=torch.Generator().manual_seed(5))
    b = sample(model, text, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_filter_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, :2]).all() and torch.isfinite(k2[0, 2:]).all()
    p = filter_logits(logits, top_p=0.7)  # softmax ~ [.03, .09, .24, .64]: keep the top two
    assert torch.isfinite(p[0, 2:]).all() and torch.isinf(p[0, :2]).all()
    assert torch.equal(filter_logits(logits), logits)
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=0)


def test_bad_inputs_are_clear_errors():
    model = model_for()
    text, image = batch(1)
    with pytest.raises(ValueError, match="text must have 6 ids"):
        model(text[:, :3], image)
    with pytest.raises(ValueError, match=r"image codes must be \(B, 16\)"):
        model(text, image[:, :5])
    with pytest.raises(ValueError, match="prime"):
        sample(model, text, prime=image)


def test_paper_12b_config_on_meta():
    cfg = from_dict(DALLEConfig, load_yaml("configs/dalle/paper-12b.yaml")["model"])
    with torch.device("meta"):
        model = DALLE(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 11.9e9 < n < 12.4e9, n  # "a 12-billion parameter transformer" (sec. 2.2)
    assert cfg.seq_len == 1280 and cfg.n_embd // cfg.n_head == 64
    from dalle.transformer.attention import layer_kinds

    kinds = layer_kinds(cfg.n_layer, cfg.attn_schedule)
    assert kinds[-1] == "conv" and kinds.count("column") == 16


def test_estimate_tool_prints_the_12b_size(capsys):
    from dalle_tools import estimate

    assert estimate.main(["--config", "configs/dalle/paper-12b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "(12.29 B)" in out and "GiB" in out


def test_forced_backends_give_the_same_logits():
    import warnings

    model = model_for()
    text, image = batch(2)
    model.set_attention_backend("sdpa")
    dense = model(text, image)[1]
    model.set_attention_backend("flex")
    with warnings.catch_warnings(), torch.no_grad():  # flex has no CPU backward in this torch
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        sparse = model(text, image)[1]
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        model.set_attention_backend("xformers")


def test_per_row_generators_make_each_image_independent_of_its_batch():
    model = model_for()
    text, _ = batch(3)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = sample(model, text, top_k=8, generator=gens([10, 11, 12]))
    alone = sample(model, text[1:2], top_k=8, generator=gens([11]))
    assert torch.equal(together[1:2], alone)
    cached_off = sample(model, text, top_k=8, generator=gens([10, 11, 12]), use_cache=False)
    assert torch.equal(together, cached_off)


def test_tied_embeddings_save_and_load(tmp_path):
    from dalle.checkpoint import load_pretrained, save_pretrained

    model = model_for(tie_embeddings=True)
    assert model.image_head.weight is model.image_emb.weight
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.image_head.weight is loaded.image_emb.weight
    text, image = batch(1)
    torch.testing.assert_close(loaded(text, image)[1], model(text, image)[1])
