"""The stage-2 transformer (paper sec. 2.2, appendix B): one decoder-only stream of text then image tokens.

Stream layout for text_seq_len T and an image grid of G x G = N tokens (length T + N):

    slot    0      1 .. T-1         T      T+1 .. T+N-1
    holds   <sot>  t_0 .. t_{T-2}   <soi>  i_0 .. i_{N-2}
    learns  t_0    t_1 .. t_{T-1}   i_0    i_1 .. i_{N-1}

Text ids come from `TextTokenizer.encode_batch`: BPE ids below `text_vocab_size`, and after the caption
a separately learned pad token for each position (id `text_vocab_size + position`, appendix B.2), so the
text head predicts over `text_vocab_size + T` ids and the first pad acts as end-of-text. Text positions
are learned; image positions are a row embedding plus a column embedding, broadcast over the grid.
Logits at text slots cover the text vocabulary only and at image slots the image vocabulary only.

Reading layouts (`DALLEConfig.layouts`; the stream orders and their loss masks are in `dalle.transformer.layouts`):
"caption" puts the image first and the caption after it, "qa" the image, then a question, then its answer.
The image part is the text-to-image stream's own (`reading_image: drawn`, the default): each image slot holds
the token before its cell, so the shared layers see one image whichever side of the text it sits on, and the
last image token rides on the text's start slot:

    slot    0      1 .. N-1         N                              N+1 .. N+T-1
    holds   <soi>  i_0 .. i_{N-2}   i_{N-1} + (<soc> or <soq>)     t_0 .. t_{T-2}   (qa: <soa> where the answer starts)
    learns  (nothing)               t_0                            t_1 .. t_{T-1}

Positions belong to the token kind: text slot j gets text_pos[j], image slot k (grid cell (r, c))
row_pos[r] + col_pos[c] in both orders. (`reading_image: cells`, that of joint checkpoints written before the
option, feeds i_k at slot k instead, one cell off the text-to-image stream.)

Attention masks per layer (row, column, conv, full) live in `dalle.transformer.attention`; the key/value-
cached prompt pass and decoding step, with their CPU fast path, in `dalle.transformer.decoding`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle.transformer.attention import attend, dense_mask, layer_kinds
from dalle.transformer.layouts import CAPTION, LAYOUTS, QA, T2I

READING_IMAGE = ("drawn", "cells")


@dataclass(frozen=True)
class DALLEConfig:
    text_vocab_size: int = 16384  # BPE ids (0 in a config file: the tokenizer's); T pad ids come on top
    text_seq_len: int = 256
    image_vocab_size: int = 8192
    image_grid_size: int = 32  # 32 x 32 = 1024 image tokens, as the paper's dVAE
    n_embd: int = 3968
    n_layer: int = 64
    n_head: int = 62
    mlp_ratio: int = 4
    attn_schedule: str = "paper"  # "paper", "full", or a comma list of row/column/conv/full per layer
    conv_kernel: int = 11
    dropout: float = 0.0
    tie_embeddings: bool = False  # share each token embedding with its output head
    # stream layouts the model has start tokens for: "t2i" (text then image), "caption" (image then text),
    # "qa" (image, question, answer); a config without the key is a text-to-image model
    layouts: tuple[str, ...] = ("t2i",)
    # How a reading layout feeds the image: "drawn", as the text-to-image stream does (each image slot holds
    # the token before its cell, the last token rides on the text's start slot), so both directions give the
    # shared layers the same image; or "cells" (each token at its own cell), what joint checkpoints written
    # before this option read (the loader sets it for them)
    reading_image: str = "drawn"

    def __post_init__(self) -> None:
        if self.reading_image not in READING_IMAGE:
            raise ValueError(f"reading_image {self.reading_image!r}: expected one of {list(READING_IMAGE)}")
        unknown = [x for x in self.layouts if x not in LAYOUTS]
        if unknown or not self.layouts or len(set(self.layouts)) != len(self.layouts):
            raise ValueError(f"layouts {list(self.layouts)}: give distinct names from {list(LAYOUTS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.text_seq_len < 1 or self.image_grid_size < 1:
            raise ValueError("text_seq_len and image_grid_size must be positive")
        layer_kinds(self.n_layer, self.attn_schedule)  # validates the schedule

    @property
    def image_seq_len(self) -> int:
        return self.image_grid_size**2

    @property
    def seq_len(self) -> int:
        return self.text_seq_len + self.image_seq_len

    @property
    def text_vocab_total(self) -> int:
        return self.text_vocab_size + self.text_seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        # A text-to-image model's config.json stays what it was before the reading layouts existed, so a run
        # started then resumes (its saved config must equal this one) and its files are unchanged.
        if self.layouts == (T2I,):
            del d["layouts"], d["reading_image"]
        else:
            d["layouts"] = list(self.layouts)  # as JSON gives it back
        return d


class Cache(Protocol):
    """Where a cached pass keeps every layer's keys and values, (B, H, L, D) each, with `length` slots
    filled: `dalle.transformer.decoding.KVCache`."""

    k: list[Tensor]
    v: list[Tensor]
    length: int


class Attention(nn.Module):
    def __init__(self, cfg: DALLEConfig, kind: str) -> None:
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.backend = "auto"  # "sdpa", "flex" or "auto"; see DALLE.set_attention_backend
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, cache: Cache | None, layer: int,
                image_first: bool | Tensor = False) -> Tensor:  # (B, l, d) -> (B, l, d)
        b, l, d = x.shape
        h = self.cfg.n_head
        q, k, v = self.qkv(x).view(b, l, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x (B, H, l, D)
        offset = 0
        if cache is not None:
            offset = cache.length
            cache.k[layer][:, :, offset : offset + l] = k
            cache.v[layer][:, :, offset : offset + l] = v
            k, v = cache.k[layer][:, :, : offset + l], cache.v[layer][:, :, : offset + l]
        y = attend(q, k, v, kind=self.kind, text_len=self.cfg.text_seq_len, grid=self.cfg.image_grid_size,
                   kernel=self.cfg.conv_kernel, backend=self.backend, q_offset=offset,
                   image_first=image_first)  # (B, H, l, D)
        return self.proj(y.transpose(1, 2).reshape(b, l, d))


class Block(nn.Module):
    def __init__(self, cfg: DALLEConfig, kind: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg, kind)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: Cache | None = None, layer: int = 0,
                image_first: bool | Tensor = False) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer, image_first))
        return x + self.drop(self.mlp(self.ln2(x)))


class DALLE(nn.Module):
    def __init__(self, cfg: DALLEConfig) -> None:
        super().__init__()
        if cfg.text_vocab_size < 1:
            raise ValueError("text_vocab_size must be set (the training tool takes it from the tokenizer)")
        self.config = cfg
        d = cfg.n_embd
        self.text_emb = nn.Embedding(cfg.text_vocab_total, d)
        self.image_emb = nn.Embedding(cfg.image_vocab_size, d)
        self.sot = nn.Parameter(torch.zeros(d))  # <start-of-text>
        self.soi = nn.Parameter(torch.zeros(d))  # <start-of-image>
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_seq_len, d))
        self.row_pos = nn.Parameter(torch.zeros(cfg.image_grid_size, d))
        self.col_pos = nn.Parameter(torch.zeros(cfg.image_grid_size, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in layer_kinds(cfg.n_layer, cfg.attn_schedule))
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab_total, bias=False)
        self.image_head = nn.Linear(d, cfg.image_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.text_head.weight, self.image_head.weight = self.text_emb.weight, self.image_emb.weight
        self.gradient_checkpointing = False  # a training setting, switched on by the training task
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):  # GPT-2: keep the residual stream O(1)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for p in (self.sot, self.soi, self.text_pos, self.row_pos, self.col_pos):
            nn.init.normal_(p, std=0.02)
        # Start tokens of the reading layouts, made last so a text-to-image model draws the same initial weights
        # as before they existed (and its checkpoints, which lack them, load strictly).
        if CAPTION in cfg.layouts:
            self.soc = nn.Parameter(torch.randn(d) * 0.02)  # <start-of-caption>
        if QA in cfg.layouts:
            self.soq = nn.Parameter(torch.randn(d) * 0.02)  # <start-of-question>
            self.soa = nn.Parameter(torch.randn(d) * 0.02)  # <start-of-answer>, added where the answer starts

    def set_attention_backend(self, backend: str) -> None:
        """Force "sdpa" (dense masks, any device) or "flex" (block-sparse), or "auto" (flex on CUDA)."""
        if backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention backend must be auto, sdpa or flex, got {backend!r}")
        for block in self.blocks:
            block.attn.backend = backend

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # -- embeddings ------------------------------------------------------------------------
    def image_pos(self, start: int, length: int) -> Tensor:  # (length, d) for image slots start..
        k = torch.arange(start, start + length, device=self.row_pos.device)
        g = self.config.image_grid_size
        return self.row_pos[k // g] + self.col_pos[k % g]

    def embed_text(self, text: Tensor) -> Tensor:  # (B, T) ids -> (B, T, d) slots 0..T-1
        b, t = text.shape
        if t != self.config.text_seq_len:
            raise ValueError(f"text must have {self.config.text_seq_len} ids (padded), got shape {tuple(text.shape)}")
        x = torch.cat([self.sot.expand(b, 1, -1), self.text_emb(text[:, :-1])], dim=1)
        return x + self.text_pos

    def embed_image(self, image: Tensor, start: int) -> Tensor:
        """Image slots start..start+n-1 for the n tokens `image` (B, n) that feed them; slot 0 is <soi>."""
        b, n = image.shape
        if start == 0:
            x = torch.cat([self.soi.expand(b, 1, -1), self.image_emb(image[:, : max(n - 1, 0)])], dim=1)
            x = x[:, : max(n, 1)]
        else:
            x = self.image_emb(image)
        return x + self.image_pos(start, x.shape[1])

    def embed_reading(self, text: Tensor, image: Tensor, layout: Tensor, answer_at: Tensor) -> Tensor:
        """The image-first stream (B, N + T, d) of the reading layouts: image (B, N) codes at their own cells, then
        the start token of each row's layout and text (B, T) ids; a qa row's slot answer_at[b] gets <soa>."""
        b, t = text.shape
        if t != self.config.text_seq_len:
            raise ValueError(f"text must have {self.config.text_seq_len} ids (padded), got shape {tuple(text.shape)}")
        wanted = {CAPTION: layout == LAYOUTS.index(CAPTION), QA: layout == LAYOUTS.index(QA)}
        missing = [name for name, rows in wanted.items() if not hasattr(self, "soq" if name == QA else "soc")
                   and bool(rows.any())]
        if missing:
            raise ValueError(f"this model has no {missing[0]!r} layout (its layouts: {list(self.config.layouts)}); "
                             "train one with model.layouts including it")
        # every start vector the model has takes part (x 0 where unused), so each gets a gradient in every step
        start = torch.zeros(b, self.config.n_embd, device=text.device, dtype=self.text_pos.dtype)
        if hasattr(self, "soc"):
            start = start + wanted[CAPTION][:, None] * self.soc
        answer = torch.zeros_like(self.text_pos[None]).expand(b, -1, -1)
        if hasattr(self, "soq"):
            start = start + wanted[QA][:, None] * self.soq
            at = (torch.arange(t, device=text.device)[None] == answer_at[:, None]) & wanted[QA][:, None]  # (B, T)
            answer = at[..., None] * self.soa
        if self.config.reading_image == "drawn":  # the text-to-image stream's image slots; the last token is left
            pixels = self.embed_image(image, 0)
            start = start + self.image_emb(image[:, -1])
        else:
            pixels = self.image_emb(image) + self.image_pos(0, image.shape[1])
        words = torch.cat([start[:, None], self.text_emb(text[:, :-1])], dim=1) + self.text_pos + answer
        return torch.cat([pixels, words], dim=1)

    # -- forward ---------------------------------------------------------------------------
    def backbone(self, x: Tensor, cache: Cache | None = None,
                 image_first: bool | Tensor = False) -> Tensor:  # (B, l, d) -> (B, l, d)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, None, i, image_first, use_reentrant=False)
            else:
                x = block(x, cache, i, image_first)
        if cache is not None:
            cache.length += x.shape[1]
        return self.ln_f(x)

    def forward(self, text: Tensor, image: Tensor, layout: Tensor | None = None,
                answer_at: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass: (B, T) text ids, (B, N) image codes -> text logits (B, T, Vt + T) and
        image logits (B, N, Vi), where position j of each predicts token j of its kind.

        layout: (B,) index into LAYOUTS per row (None: all text-to-image); answer_at: (B,) the text slot where a
        qa row's answer starts (its question's length). Image logits of reading rows predict nothing useful."""
        n, t = self.config.image_seq_len, self.config.text_seq_len
        if image.shape[1] != n:
            raise ValueError(f"image codes must be (B, {n}), got {tuple(image.shape)}; flatten the grid first")
        if layout is None or self.config.layouts == (T2I,):
            x = torch.cat([self.embed_text(text), self.embed_image(image, 0)], dim=1)  # (B, T+N, d)
            h = self.backbone(x)
            return self.text_head(h[:, :t]), self.image_head(h[:, t:])
        # Both orders are embedded and every row picks its own, so every start token and both heads take part
        # in each step whatever the batch's mix (distributed back ends expect a gradient for every weight).
        reading = layout != LAYOUTS.index(T2I)  # (B,)
        answer_at = torch.zeros_like(layout) if answer_at is None else answer_at
        forward = torch.cat([self.embed_text(text), self.embed_image(image, 0)], dim=1)  # (B, T+N, d)
        x = torch.where(reading[:, None, None], self.embed_reading(text, image, layout, answer_at), forward)
        uniform = bool(reading.all()) or not bool(reading.any())
        h = self.backbone(x, image_first=bool(reading[0]) if uniform else reading)  # (B, L, d)
        text_h = torch.where(reading[:, None, None], h[:, n:], h[:, :t])  # (B, T, d)
        image_h = torch.where(reading[:, None, None], h[:, :n], h[:, t:])  # (B, N, d)
        return self.text_head(text_h), self.image_head(image_h)


def training_flops_per_token(cfg: DALLEConfig) -> tuple[float, float]:
    """Training FLOPs (forward + backward) per token: (matmuls, attention). 6 per matmul weight (2 forward,
    4 backward; embeddings are lookups), and 12·d per visible (query, key) pair of each layer's mask
    (QK^T and AV, forward and backward), averaged over the stream. Recomputing activations adds a forward."""
    d = cfg.n_embd
    matmul = cfg.n_layer * (4 + 2 * cfg.mlp_ratio) * d * d + d * (cfg.text_vocab_total + cfg.image_vocab_size)
    kinds = layer_kinds(cfg.n_layer, cfg.attn_schedule)
    pairs = {k: int(dense_mask(k, cfg.text_seq_len, cfg.image_grid_size, cfg.conv_kernel).sum()) for k in set(kinds)}
    return 6.0 * matmul, 12.0 * d * sum(pairs[k] for k in kinds) / cfg.seq_len
