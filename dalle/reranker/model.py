"""The CLIP-style reranker that reranks DALL-E's samples (paper sec. 2.5; Radford et al. 2021).

Two towers map a caption and an image into one embedding space; their cosine similarity is the score.

Text tower: a bidirectional transformer over the BPE ids of `TextTokenizer.encode_batch`. Ids at or above
`text_vocab_size` are that function's per-position pads (appendix B.2); here they all share one pad row
and are masked out as attention keys, so a caption's encoding does not depend on how much padding follows
it. A learned <cls> slot in front of the caption is pooled: it attends to every real token, and to itself,
so the empty prompt (all pads) still has an encoding.

Image tower: a small conv net over pixels in [0, 1], normalised inside the model. A stem brings the image
to a (image_size / patch_size)^2 grid, either with one strided convolution ("patch", as a ViT) or with a
stack of stride-2 3x3 convolutions ("conv"; Xiao et al. 2021); `layers` residual 3x3 conv blocks follow,
and a linear map of the whole grid reads the embedding out, so where things are (which the captions
state: "on the left", "above") is kept. It was chosen over a ViT because it learned faster on a CPU in
the same time budget (the comparison is in docs/training.md).

Both encodings are projected to `embed_dim` and L2-normalised; logits are cosines times a learned
temperature exp(logit_scale), initialised to 1/0.07 and capped at 100, as in CLIP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEMS = ("patch", "conv")
# CLIP's pixel statistics: the inputs are whitened with them inside the model, so callers pass [0, 1].
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class RerankerConfig:
    text_vocab_size: int = 16384  # BPE ids (0 in a config file: the tokenizer's); higher ids are pads
    text_seq_len: int = 256  # the transformer's text length, so its padded prompts encode as they are
    image_size: int = 256  # the dVAE's output size, so samples are scored as they are decoded
    patch_size: int = 16  # the stem turns the image into a (image_size / patch_size)^2 grid
    stem: str = "conv"  # "patch" (one strided conv) or "conv" (log2(patch_size) stride-2 3x3 convs)
    width: int = 256  # channels of both towers
    layers: int = 6  # per tower: transformer blocks of the text, residual conv blocks of the image
    heads: int = 8  # the text tower's
    mlp_ratio: int = 4
    embed_dim: int = 512  # the joint embedding space

    def __post_init__(self) -> None:
        if min(self.width, self.heads, self.text_seq_len, self.layers, self.embed_dim, self.mlp_ratio) < 1:
            raise ValueError("width, heads, text_seq_len, layers, embed_dim and mlp_ratio must be positive")
        if self.text_vocab_size < 0:
            raise ValueError(f"text_vocab_size must be >= 0 (0: the tokenizer's), got {self.text_vocab_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"the conv stem halves the image per layer: patch_size must be a power of two >= 2, "
                             f"got {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


class TextBlock(nn.Module):
    """Pre-LN transformer block of the text tower; `keep` (B, 1, 1, L) marks the keys each query may attend to."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:  # (B, L, d) -> (B, L, d)
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, L, D)
        x = x + self.proj(y.transpose(1, 2).reshape(b, l, d))
        return x + self.mlp(self.ln2(x))


def _stem(cfg: RerankerConfig) -> nn.Module:
    if cfg.stem == "patch":
        return nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
    n = int(math.log2(cfg.patch_size))
    chans = [3] + [max(cfg.width >> (n - i), 16) for i in range(1, n + 1)]  # doubling up to the width
    layers: list[nn.Module] = []
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], cfg.width, 1))  # 1x1: a linear map into the stream


class ConvBlock(nn.Module):
    """Residual 3x3 conv block at the grid's resolution."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(math.gcd(8, width), width)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:  # (B, d, g, g) -> (B, d, g, g)
        return x + self.act(self.norm(self.conv(x)))


class Reranker(nn.Module):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        if cfg.text_vocab_size < 1:
            raise ValueError("text_vocab_size must be set (the training tool takes it from the tokenizer)")
        self.config = cfg
        d = cfg.width
        # Text tower. Row text_vocab_size is the one pad embedding; pads are masked keys, so it stays zero.
        self.token_emb = nn.Embedding(cfg.text_vocab_size + 1, d, padding_idx=cfg.text_vocab_size)
        self.text_cls = nn.Parameter(torch.zeros(d))
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_seq_len + 1, d))
        self.text_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.layers))
        self.text_ln = nn.LayerNorm(d)
        self.text_proj = nn.Linear(d, cfg.embed_dim, bias=False)
        # Image tower.
        self.stem = _stem(cfg)
        self.image_blocks = nn.Sequential(*(ConvBlock(d) for _ in range(cfg.layers)))
        # The readout has one weight per grid cell and channel, so it knows where each feature is. It reads
        # the features minus their mean over the grid, and the mean through a map that starts at zero: at
        # initialisation the background (most of a shapes image, its grey level random) would otherwise
        # dominate every embedding, and learning stalls until it is tuned out.
        self.image_proj = nn.Linear(d * cfg.grid**2, cfg.embed_dim)
        self.image_proj_mean = nn.Linear(d, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # Convolutions keep PyTorch's default init: a variance-preserving (Kaiming) one overfitted a tiny batch
        # faster but learned held-out shapes about half as fast.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.token_emb.weight[self.config.text_vocab_size].zero_()
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "mlp.2.weight")) and "blocks" in name:
                # GPT-2's scaling: keeps the residual stream O(1) whatever the depth.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.layers))
        for p in (self.text_cls, self.text_pos):
            nn.init.normal_(p, std=0.01)
        nn.init.zeros_(self.image_proj_mean.weight)

    # -- towers ----------------------------------------------------------------------------
    def encode_text(self, ids: Tensor) -> Tensor:  # (B, T) BPE ids + pads -> (B, E), unit norm
        cfg = self.config
        if ids.ndim != 2 or ids.shape[1] != cfg.text_seq_len:
            raise ValueError(f"text must be (B, {cfg.text_seq_len}) padded ids, got shape {tuple(ids.shape)}")
        pad = ids >= cfg.text_vocab_size  # (B, T)
        x = self.token_emb(ids.clamp(max=cfg.text_vocab_size))  # (B, T, d)
        x = torch.cat([self.text_cls.to(x.dtype).expand(len(ids), 1, -1), x], dim=1) + self.text_pos
        keep = torch.cat([torch.ones_like(pad[:, :1]), ~pad], dim=1)[:, None, None, :]  # (B, 1, 1, T+1)
        for block in self.text_blocks:
            x = block(x, keep)
        return F.normalize(self.text_proj(self.text_ln(x[:, 0])), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1] -> (B, E), unit norm
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be (B, 3, {s}, {s}) in [0, 1], got shape {tuple(images.shape)}")
        x = self.stem((images - self.pixel_mean) / self.pixel_std)  # (B, d, g, g)
        x = self.image_blocks(x)  # (B, d, g, g)
        mean = x.mean((2, 3))  # (B, d)
        out = self.image_proj((x - mean[:, :, None, None]).flatten(1)) + self.image_proj_mean(mean)
        return F.normalize(out, dim=-1)

    def scale(self) -> Tensor:
        """The temperature exp(logit_scale), capped at 100 so the logits cannot blow up (as Reranker)."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def forward(self, ids: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B_t, T) ids, (B_i, 3, H, W) images -> logits_per_image (B_i, B_t) and logits_per_text (B_t, B_i)."""
        logits_per_image = self.scale() * self.encode_image(images) @ self.encode_text(ids).T
        return logits_per_image, logits_per_image.T


def contrastive_loss(logits_per_image: Tensor) -> Tensor:
    """Symmetric InfoNCE: pair i is the right answer for row i and for column i of the (B, B) logits."""
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError("contrastive_loss needs square (B, B) logits of matching pairs, got "
                         f"{tuple(logits_per_image.shape)}")
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
