"""Losses of the dVAE objective (paper sec. 2.1 and appendix A.3).

The evidence lower bound is reported in nats per image dimension: both the reconstruction term and
the KL term are summed over an image and divided by its number of dimensions (C*H*W), so the paper's
KL weight of 6.6 keeps its meaning at any resolution with the same down-sampling factor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dvae.model import LOGIT_LAPLACE_EPS, map_pixels, straight_through


def logit_laplace_nll(images: Tensor, stats: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Negative log-likelihood (nats per dimension, mean over the batch) of images in [0, 1].

    The logit-Laplace density on (0, 1) is 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b); pixels
    are first mapped into [eps, 1 - eps] so logit(x) stays finite. `stats` holds mu for each channel,
    then ln b for each channel.
    """
    c = images.shape[1]
    mu, log_b = stats[:, :c].float(), stats[:, c : 2 * c].float()
    x = map_pixels(images.float(), eps)
    nll = (
        math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x)
        + (torch.logit(x) - mu).abs() * torch.exp(-log_b)
    )
    return nll.mean()


def mse_loss(images: Tensor, stats: Tensor) -> Tensor:
    """Mean squared error against the first C decoder outputs (the option the issue asks for)."""
    return F.mse_loss(stats[:, : images.shape[1]].float(), images.float())


def gradient_difference_loss(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Mean squared error between the horizontal and vertical finite differences of two image batches.

    Not in the paper (Mathieu et al. 2016 use it against blur in video prediction): pixel MSE lets a
    decoder that is unsure where an edge lies blur it, at a cost proportional to the few pixels on the
    edge, while the plain background dominates the loss. Differences are zero on flat regions, so this
    term spends its whole weight on edges and keeps shapes sharp.
    """
    x, y = images.float(), reconstructions.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.pow(2).mean() + dy.pow(2).mean()


def kl_to_uniform(logits: Tensor, dims_per_image: int) -> Tensor:
    """KL(q(z|x) || uniform) summed over the token grid, per image dimension, mean over the batch.

    logits: (B, V, h, w). For one token KL = log V - H(q).
    """
    logq = F.log_softmax(logits.float(), dim=1)
    kl = (logq.exp() * logq).sum(dim=1) + math.log(logits.shape[1])  # (B, h, w)
    return kl.flatten(1).sum(dim=1).mean() / dims_per_image


def usage_kl_to_uniform(logits: Tensor, dims_per_image: int, hard: bool = False) -> Tensor:
    """KL(mean posterior over the batch and grid || uniform), scaled like `kl_to_uniform`.

    Not in the paper: the per-token KL pulls each posterior towards uniform but does not stop all
    tokens from preferring the same few codes. Penalising the batch-averaged posterior (wav2vec 2.0's
    codebook diversity loss) spreads usage. With `hard`, the average is over straight-through one-hot
    argmax codes (softmax gradients), which spreads the codes actually used rather than rewarding broad
    posteriors; in a probe it took argmax perplexity from 13 to 160 of 512 codes.
    """
    q = F.softmax(logits.float(), dim=1)  # (B, V, h, w)
    if hard:
        q = straight_through(q)
    mean_q = q.mean(dim=(0, 2, 3))  # (V,)
    kl = (mean_q * mean_q.clamp_min(1e-12).log()).sum() + math.log(logits.shape[1])
    return kl * logits.shape[2] * logits.shape[3] / dims_per_image


def psnr(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for pixels in [0, 1]. (B, C, H, W) x 2 -> (B,)"""
    mse = (images.float() - reconstructions.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_usage(codes: Tensor, vocab_size: int) -> tuple[float, float]:
    """(perplexity, share of codes used) of the empirical code distribution in `codes`."""
    counts = torch.bincount(codes.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).double().mean())
