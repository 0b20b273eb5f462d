"""The discrete VAE of stage 1 (paper sec. 2.1 and appendix A).

Owns the architecture only: `DVAEConfig`, the conv-ResNet `Encoder` and `Decoder` with bottleneck
res-blocks, and `DiscreteVAE`, which ties them together with the gumbel-softmax relaxation. Losses live
in `dvae.losses`, schedules in `dvae.schedules`, the training objective in `dalle.train.tasks.dvae`.

Layout follows the OpenAI dVAE release: groups of res-blocks whose outputs are scaled by
1 / n_layers**2, max-pool between encoder groups, nearest-neighbour up-sampling between decoder groups,
and 1x1 convs on both sides of the relaxation (encoder logits, decoder input).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_LAPLACE_EPS = 0.1  # the paper's epsilon for mapping pixels into (eps, 1 - eps), sec. A.3
# `encode` and `decode` on a CPU run a batch in pieces whose widest activation is about this size
CPU_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class DVAEConfig:
    image_size: int = 256
    downsample: int = 8  # 256 / 8 = a 32x32 token grid, as in the paper
    vocab_size: int = 8192
    n_hid: int = 256  # width of the first group; group g has n_hid * 2**g channels
    n_blk_per_group: int = 2
    input_channels: int = 3
    n_init: int = 128  # width of the decoder's input 1x1 conv
    loss: str = "logit_laplace"  # or "mse"
    # Multiplies the initial weights of the encoder's logit conv. Above 1, posteriors start sharp and
    # differ between positions, so short runs begin with many codes in use (1.0: PyTorch's default init).
    logit_init_scale: float = 1.0
    # The narrowest a decoder res-block's bottleneck may be (0: the paper's n_out / 4 everywhere). At a
    # small n_hid the full-resolution blocks, which draw corners and points, are only n_hid / 4 wide.
    decoder_min_hidden: int = 0

    def __post_init__(self) -> None:
        if self.downsample not in (2, 4, 8, 16):
            raise ValueError(f"downsample must be 2, 4, 8 or 16, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by downsample {self.downsample}"
            )
        if self.vocab_size < 2 or self.n_hid < 4 or self.n_blk_per_group < 1:
            raise ValueError(f"vocab_size >= 2, n_hid >= 4 and n_blk_per_group >= 1 required: {self}")
        if self.decoder_min_hidden < 0:
            raise ValueError(f"decoder_min_hidden must be >= 0 (0: n_out / 4), got {self.decoder_min_hidden}")
        if self.loss not in ("logit_laplace", "mse"):
            raise ValueError(f"loss must be 'logit_laplace' or 'mse', got {self.loss!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def group_count(self) -> int:
        return int(math.log2(self.downsample)) + 1  # one pooling between consecutive groups

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        # Small post-gain keeps the identity path dominant at init, so a deep stack trains (app. A.1).
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), _conv(n_in, n_hid, 3),
            nn.ReLU(), _conv(n_hid, n_hid, 3),
            nn.ReLU(), _conv(n_hid, n_hid, 3),
            nn.ReLU(), _conv(n_hid, n_out, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, min_hidden: int = 0) -> None:
        super().__init__()
        n_hid = max(n_out // 4, min_hidden)
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), _conv(n_in, n_hid, 1),
            nn.ReLU(), _conv(n_hid, n_hid, 3),
            nn.ReLU(), _conv(n_hid, n_hid, 3),
            nn.ReLU(), _conv(n_hid, n_out, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """Pixels (B, C, H, W) in [0, 1] after `map_pixels` -> logits (B, vocab, H/f, W/f)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**g for g in range(cfg.group_count)]
        layers: list[nn.Module] = [_conv(cfg.input_channels, cfg.n_hid, 7)]
        n_in = cfg.n_hid
        for g, width in enumerate(widths):
            for _ in range(cfg.n_blk_per_group):
                layers.append(EncoderBlock(n_in, width, n_layers))
                n_in = width
            if g < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), _conv(n_in, cfg.vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)
        with torch.no_grad():
            self.blocks[-1].weight.mul_(cfg.logit_init_scale)
            self.blocks[-1].bias.mul_(cfg.logit_init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Soft or hard one-hot codes (B, vocab, h, w) -> pixel statistics (B, 2C, h*f, w*f)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**g for g in reversed(range(cfg.group_count))]
        # The 1x1 input conv is the codebook: a one-hot code selects one column of its weight.
        layers: list[nn.Module] = [_conv(cfg.vocab_size, cfg.n_init, 1)]
        n_in = cfg.n_init
        for g, width in enumerate(widths):
            for _ in range(cfg.n_blk_per_group):
                layers.append(DecoderBlock(n_in, width, n_layers, cfg.decoder_min_hidden))
                n_in = width
            if g < len(widths) - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        # Two statistics per channel: the logit-Laplace location and log-scale (MSE uses the first).
        layers += [nn.ReLU(), _conv(n_in, 2 * cfg.input_channels, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(z)


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """[0, 1] -> [eps, 1 - eps]: keeps logit(x) finite for the logit-Laplace likelihood."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS, clamp: bool = True) -> Tensor:
    x = (x - eps) / (1 - 2 * eps)
    return x.clamp(0, 1) if clamp else x


def straight_through(soft: Tensor) -> Tensor:
    """The one-hot argmax code over dim 1 in the forward pass, the gradient of `soft` in the backward."""
    one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    return one_hot + soft - soft.detach()


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check_images(self, images: Tensor) -> None:
        c, s = self.config.input_channels, self.config.image_size
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] % self.config.downsample \
                or images.shape[3] % self.config.downsample:
            raise ValueError(
                f"expected images of shape (B, {c}, H, W) with H and W divisible by "
                f"{self.config.downsample} (trained at {s}x{s}), got {tuple(images.shape)}"
            )

    def logits(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1] -> (B, V, h, w)
        self._check_images(images)
        x = map_pixels(images) if self.config.loss == "logit_laplace" else images
        return self.encoder(x)

    def relax(self, logits: Tensor, temperature: float, generator: torch.Generator | None = None,
              noise: float = 1.0, hard: bool = False) -> Tensor:
        """Gumbel-softmax relaxation of the categorical posterior over the vocab (dim 1). `noise` scales
        the gumbel noise (1: the paper's sampling, 0: none). `hard`: straight-through, the forward value
        is the one-hot code of the sample and the gradient that of the soft relaxation."""
        z = logits.float()
        if noise:
            # -log(E) with E ~ Exponential(1) is Gumbel(0, 1) distributed.
            e = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
            z = z - noise * e.exponential_(generator=generator).log()
        soft = F.softmax(z / temperature, dim=1)
        return (straight_through(soft) if hard else soft).to(logits.dtype)

    def pixel_stats(self, z: Tensor) -> Tensor:  # (B, V, h, w) -> (B, 2C, H, W)
        return self.decoder(z)

    def stats_to_images(self, stats: Tensor, clamp: bool = True) -> Tensor:
        mu = stats[:, : self.config.input_channels].float()
        if self.config.loss == "logit_laplace":
            return unmap_pixels(torch.sigmoid(mu), clamp=clamp)
        return mu.clamp(0, 1) if clamp else mu

    def forward(
        self, images: Tensor, temperature: float, generator: torch.Generator | None = None, noise: float = 1.0,
        hard: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Training pass: (B, 3, H, W) -> (logits (B, V, h, w), pixel stats (B, 2C, H, W))."""
        logits = self.logits(images)
        return logits, self.pixel_stats(self.relax(logits, temperature, generator, noise, hard))

    def _chunk(self, rows: int, device: torch.device, itemsize: int, pixels: int) -> int:
        """Rows per piece of an inference batch of `rows` images of `pixels` pixels. On a CPU a piece's widest
        activation (the decoder's upsampled input to its last group, 2 n_hid wide) stays about the size of
        the last-level cache; a whole batch of 64 spills it and pages its activations in afresh on every
        call (measured in docs/performance.md)."""
        if device.type != "cpu":
            return max(1, rows)
        return max(1, CPU_CHUNK_BYTES // (2 * self.config.n_hid * pixels * itemsize))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1] -> (B, h, w) int64
        self._check_images(images)
        n = self._chunk(len(images), images.device, images.element_size(), images.shape[2] * images.shape[3])
        return torch.cat([self.logits(part).argmax(dim=1) for part in images.split(n)])

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:  # (B, h, w) int64 -> (B, 3, H, W) in [0, 1]
        if codes.ndim != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer codes of shape (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        # a one-hot code through the 1x1 codebook conv selects a column of its weight: look the column up
        # instead (the same bits, without a (B, V, h, w) one-hot tensor)
        codebook, rest = self.decoder.blocks[0], self.decoder.blocks[1:]
        x = codebook.weight[:, :, 0, 0]  # (n_init, V)
        f = self.config.downsample
        n = self._chunk(len(codes), x.device, x.element_size(), codes.shape[1] * codes.shape[2] * f * f)
        return torch.cat([self.stats_to_images(rest((F.embedding(part.long(), x.t()) + codebook.bias)
                                                    .permute(0, 3, 1, 2))) for part in codes.split(n)])
