import math

import pytest
import torch
from tiny import tiny_config

from dalle.config import from_dict
from dalle.train.config import load_yaml
from dvae import schedules
from dvae.losses import codebook_usage, gradient_difference_loss, kl_to_uniform, logit_laplace_nll, psnr
from dvae.model import DiscreteVAE, DVAEConfig, map_pixels, unmap_pixels

TINY = tiny_config("dvae")


def test_encode_decode_shapes_and_range():
    model = DiscreteVAE(TINY).eval()
    images = torch.rand(3, 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < TINY.vocab_size
    out = model.decode(codes)
    assert out.shape == (3, 3, 32, 32)
    assert 0 <= out.min() and out.max() <= 1


def test_inference_in_pieces_equals_the_whole_batch(monkeypatch):
    # encode/decode run a CPU batch in pieces, and decode looks codes up in the codebook conv instead of
    # feeding it one-hot maps: the same codes, and the same images up to the last bit (oneDNN's convolutions
    # pick their algorithm by batch size, as they always did)
    import torch.nn.functional as F

    import dvae.model

    model = DiscreteVAE(TINY).eval()
    codes = torch.randint(TINY.vocab_size, (7, 8, 8))
    images = torch.rand(7, 3, 32, 32)
    with torch.no_grad():
        whole = model.stats_to_images(model.decoder(F.one_hot(codes, TINY.vocab_size).permute(0, 3, 1, 2).float()))
        argmax = model.logits(images).argmax(dim=1)
    monkeypatch.setattr(dvae.model, "CPU_CHUNK_BYTES", 1)  # one image per piece
    assert model._chunk(7, torch.device("cpu"), 4, 32 * 32) == 1
    torch.testing.assert_close(model.decode(codes), whole, atol=1e-6, rtol=0)
    assert torch.equal(model.encode(images), argmax)
    assert model.decode(codes[:0]).shape == (0, 3, 32, 32) and model.encode(images[:0]).shape == (0, 8, 8)


def test_paper_config_on_meta_device():
    cfg = from_dict(DVAEConfig, load_yaml("configs/dvae/paper.yaml")["model"])
    assert (cfg.image_size, cfg.grid_size, cfg.vocab_size) == (256, 32, 8192)
    with torch.device("meta"):
        model = DiscreteVAE(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 50e6 < n < 150e6  # the OpenAI release has ~54M (encoder) + ~44M (decoder)
    x = torch.empty(1, 3, 256, 256, device="meta")
    assert model.logits(x).shape == (1, 8192, 32, 32)


def test_decoder_min_hidden_widens_only_the_narrow_blocks():
    # TINY's decoder blocks are 32, 16 and 8 wide: bottlenecks 8, 4 and 2 by the paper's n_out / 4.
    def hidden(cfg):
        return [b.res_path[1].out_channels for b in DiscreteVAE(cfg).decoder.blocks if hasattr(b, "res_path")]

    assert hidden(TINY) == [8, 4, 2]
    wide = DVAEConfig(**{**TINY.to_dict(), "decoder_min_hidden": 4})
    assert hidden(wide) == [8, 4, 4]
    model = DiscreteVAE(wide).eval()
    assert model.decode(model.encode(torch.rand(2, 3, 32, 32))).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="decoder_min_hidden"):
        DVAEConfig(decoder_min_hidden=-1)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        DVAEConfig(image_size=30, downsample=4)
    model = DiscreteVAE(TINY)
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode(torch.full((1, 8, 8), 64))


def test_schedule_end_points():
    assert schedules.temperature(0) == 1.0
    assert schedules.temperature(150_000) == pytest.approx(1 / 16)
    assert schedules.temperature(10**7) == pytest.approx(1 / 16)
    assert schedules.temperature(75_000) == pytest.approx((1 + 1 / 16) / 2)
    assert schedules.kl_weight(0) == 0.0
    assert schedules.kl_weight(5_000) == pytest.approx(6.6)
    assert schedules.kl_weight(2_500) == pytest.approx(3.3)
    # monotone on the way
    ts = [schedules.temperature(s) for s in range(0, 150_001, 1000)]
    assert all(a >= b for a, b in zip(ts, ts[1:]))


def test_logit_laplace_against_hand_computation():
    x, mu, log_b = 0.25, 0.3, 0.2
    images = torch.full((1, 1, 1, 1), x)
    stats = torch.tensor([mu, log_b]).view(1, 2, 1, 1)
    xm = (1 - 2 * 0.1) * x + 0.1  # 0.3
    logit = math.log(xm / (1 - xm))
    expected = math.log(2) + log_b + math.log(xm) + math.log(1 - xm) + abs(logit - mu) / math.exp(log_b)
    assert logit_laplace_nll(images, stats).item() == pytest.approx(expected, rel=1e-6)


def test_logit_laplace_is_a_density():
    # Integrates to one over (eps, 1 - eps) in the mapped space: check numerically for one mu, b.
    mu, log_b = torch.tensor(0.4), torch.tensor(-0.5)
    xs = torch.linspace(1e-4, 1 - 1e-4, 200_001, dtype=torch.float64)
    b = log_b.exp().double()
    dens = torch.exp(-(torch.logit(xs) - mu).abs() / b) / (2 * b * xs * (1 - xs))
    assert torch.trapezoid(dens, xs).item() == pytest.approx(1.0, abs=2e-3)


def test_map_unmap_round_trip():
    x = torch.rand(100)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)


def test_kl_to_uniform():
    dims = 3 * 4 * 4
    uniform = torch.zeros(2, 10, 2, 2)
    assert kl_to_uniform(uniform, dims).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((2, 10, 2, 2), -1e4)
    peaked[:, 3] = 0
    assert kl_to_uniform(peaked, dims).item() == pytest.approx(4 * math.log(10) / dims, rel=1e-5)


def test_psnr_and_codebook_usage():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, rel=1e-5)
    ppl, used = codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert ppl == pytest.approx(4.0) and used == pytest.approx(0.5)


def test_loss_falls_on_tiny_overfit_batch():
    from dalle.train.tasks.dvae import DVAEObjective, DVAETask

    torch.manual_seed(0)
    model = DiscreteVAE(TINY)
    task = DVAETask(model, DVAEObjective(temp_steps=100, kl_steps=100, kl_end=0.5), [], [])
    images = torch.rand(4, 3, 32, 32).round()  # binary pixels: easy to tell apart
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, _ = task.loss(model, {"image": images}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def test_usage_term_soft_and_hard():
    from dvae.losses import usage_kl_to_uniform

    dims = 3 * 8 * 8
    # Every position prefers code 0 a little: the mean softmax is near uniform, the argmax codes are not.
    logits = torch.zeros(2, 16, 2, 2, requires_grad=True)
    with torch.no_grad():
        logits[:, 0] += 0.1
    soft = usage_kl_to_uniform(logits, dims)
    hard = usage_kl_to_uniform(logits, dims, hard=True)
    assert soft.item() < 1e-4
    assert hard.item() == pytest.approx(math.log(16) * 4 / dims, rel=1e-5)  # all mass on one code
    hard.backward()
    assert logits.grad[:, 0].sum() > 0  # pushes the over-used code down


def test_gradient_difference_loss_against_hand_computation():
    x = torch.zeros(1, 1, 2, 3)
    x[..., 0, 1] = 1.0  # one bright pixel: differences +1/-1 along the row, -1 down its column
    y = torch.zeros_like(x)
    # horizontal differences of x: [[1, -1], [0, 0]] -> mean square 2/4; vertical: [[0, -1, 0]] -> 1/3
    assert gradient_difference_loss(x, y).item() == pytest.approx(0.5 + 1 / 3)
    assert gradient_difference_loss(x, x + 0.3).item() == pytest.approx(0.0, abs=1e-12)  # same edges


def test_relaxation_noise_and_straight_through():
    model = DiscreteVAE(TINY)
    logits = torch.randn(2, 64, 3, 3, requires_grad=True)
    weights = torch.randn(2, 64, 3, 3)
    # Without noise the relaxation is the tempered softmax of the logits, the same on every call.
    quiet = model.relax(logits, 0.5, noise=0.0)
    torch.testing.assert_close(quiet, torch.softmax(logits / 0.5, dim=1))
    noisy = model.relax(logits, 0.5, torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy, quiet)
    # Straight-through: the forward value is the one-hot code of the same sample, the gradient the soft one's.
    hard = model.relax(logits, 0.7, torch.Generator().manual_seed(1), hard=True)
    soft = model.relax(logits, 0.7, torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(soft.argmax(1), 64).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(hard.detach(), one_hot, rtol=0, atol=1e-6)
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)
    # What the decoder trains on is then exactly what it decodes from argmax codes at evaluation.
    codes = model.relax(logits, 0.7, noise=0.0, hard=True).argmax(1)
    assert torch.equal(codes, logits.argmax(1))
