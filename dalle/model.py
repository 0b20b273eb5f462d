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
Attention masks per layer (row, column, conv, full) live in `dalle.attention`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle.attention import additive_mask, attend, attend_newest, dense_mask, layer_kinds


@dataclass(frozen=True)
class DALLEConfig:
    text_vocab_size: int = 16384  # BPE ids (0 in a config file: the tokenizer's); T pad ids come on top
    text_seq_len: int = 256
    image_vocab_size: int = 8192
    image_grid: int = 32  # 32 x 32 = 1024 image tokens, as the paper's dVAE
    n_embd: int = 3968
    n_layer: int = 64
    n_head: int = 62
    mlp_ratio: int = 4
    attn_schedule: str = "paper"  # "paper", "full", or a comma list of row/column/conv/full per layer
    conv_kernel: int = 11
    dropout: float = 0.0
    tie_embeddings: bool = False  # share each token embedding with its output head

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.text_seq_len < 1 or self.image_grid < 1:
            raise ValueError("text_seq_len and image_grid must be positive")
        layer_kinds(self.n_layer, self.attn_schedule)  # validates the schedule

    @property
    def image_seq_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_seq_len + self.image_seq_len

    @property
    def text_vocab_total(self) -> int:
        return self.text_vocab_size + self.text_seq_len

    def to_dict(self) -> dict:
        return asdict(self)


# oneDNN's linear on a weight packed ahead: private ops (they back torch.compile's CPU linear fusions), so a
# build without them takes F.linear
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class KVCache:
    """Preallocated keys and values of every layer, (B, H, L, D) each; `length` slots are filled. `bias[i]`
    is layer i's (L, L) `additive_mask`, shared between layers of one kind, so a step reads its row, or None
    for a full layer, whose newest query reads every cached key.

    Separate key and value buffers keep (B, H) mergeable into one batch dimension, so the attention
    matmuls of a decoding step read the cache in place (one buffer holding both copied it each step).

    On a CPU in fp32 a decoding step's products go through oneDNN with each weight packed once for
    this cache's batch (`packed`, filled on first use: weights cannot change while a cache lives, since
    sampling runs under inference mode), and the MLP's GELU runs inside its first product. Against MKL
    on the unpacked weights that takes 6-9% off a guided bench-small generation (benchmarks/RESULTS.md,
    run 6)."""

    def __init__(self, cfg: DALLEConfig, batch: int, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch, cfg.n_head, cfg.seq_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.bias = [None if kind == "full" else
                     additive_mask(kind, cfg.text_seq_len, cfg.image_grid, cfg.conv_kernel, device, dtype)
                     for kind in layer_kinds(cfg.n_layer, cfg.attn_schedule)]
        self.length = 0
        on_cpu = torch.device(device).type == "cpu"
        self.packed: dict[nn.Linear, Tensor] | None = {} if _ONEDNN and on_cpu and dtype == torch.float32 else None


def _row_linear(layer: nn.Linear, x: Tensor, cache: KVCache, gelu: bool = False) -> Tensor:
    """layer(x) for the B rows of a decoding step, (B, i) -> (B, o), then tanh-GELU if asked."""
    # oneDNN's packed kernel takes fp32 rows and weights only: under autocast (bf16 sampling inside a bf16
    # training run's evaluation) or on other dtypes the plain product runs, with autocast's own casts
    if cache.packed is None or x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
        y = F.linear(x, layer.weight, layer.bias)
        return F.gelu(y, approximate="tanh") if gelu else y
    # oneDNN's one-row kernel rounds differently from its many-row ones, which give each row the same bits
    # whatever the batch (2-64 rows here): two rows keep an image independent of what shared its batch
    rows = x if x.shape[0] > 1 else x.expand(2, -1)
    w = cache.packed.get(layer)
    if w is None:
        w = cache.packed[layer] = torch.ops.mkldnn._reorder_linear_weight(layer.weight, rows.shape[0])
    y = torch.ops.mkldnn._linear_pointwise(rows, w, layer.bias, "gelu" if gelu else "none", [],
                                           "tanh" if gelu else "")
    return y[: x.shape[0]]


class Attention(nn.Module):
    def __init__(self, cfg: DALLEConfig, kind: str) -> None:
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.backend = "auto"  # "sdpa", "flex" or "auto"; see DALLE.set_attention_backend
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:  # (B, l, d) -> (B, l, d)
        b, l, d = x.shape
        h = self.cfg.n_head
        q, k, v = self.qkv(x).view(b, l, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x (B, H, l, D)
        offset = 0
        if cache is not None:
            offset = cache.length
            cache.k[layer][:, :, offset : offset + l] = k
            cache.v[layer][:, :, offset : offset + l] = v
            k, v = cache.k[layer][:, :, : offset + l], cache.v[layer][:, :, : offset + l]
        y = attend(q, k, v, kind=self.kind, text_len=self.cfg.text_seq_len, grid=self.cfg.image_grid,
                   kernel=self.cfg.conv_kernel, backend=self.backend, q_offset=offset)  # (B, H, l, D)
        return self.proj(y.transpose(1, 2).reshape(b, l, d))

    def step(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """One decoding step, (B, d) -> (B, d): the newest slot's query against the cached keys its
        layer's pattern reads."""
        b, d = x.shape
        h, pos = self.cfg.n_head, cache.length
        q, k, v = _row_linear(self.qkv, x, cache).reshape(b, 3, h, 1, d // h).unbind(1)  # 3 x (B, H, 1, D)
        cache.k[layer][:, :, pos : pos + 1] = k
        cache.v[layer][:, :, pos : pos + 1] = v
        keys, values = cache.k[layer][:, :, : pos + 1], cache.v[layer][:, :, : pos + 1]
        bias = cache.bias[layer]
        y = attend_newest(q, keys, values, None if bias is None else bias[pos, : pos + 1])  # (B, H, 1, D)
        return _row_linear(self.proj, y.reshape(b, d), cache)


class Block(nn.Module):
    def __init__(self, cfg: DALLEConfig, kind: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg, kind)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))

    def step(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:  # (B, d) -> (B, d)
        """`forward` for one new slot in inference: the same computation without module and dropout
        overheads, which at batch 4 and d=256 cost as much as the arithmetic."""
        fc1, _, fc2 = self.mlp  # the GELU (tanh) runs inside fc1's kernel
        x = x + self.attn.step(self.ln1(x), cache, layer)
        return x + _row_linear(fc2, _row_linear(fc1, self.ln2(x), cache, gelu=True), cache)


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
        self.row_pos = nn.Parameter(torch.zeros(cfg.image_grid, d))
        self.col_pos = nn.Parameter(torch.zeros(cfg.image_grid, d))
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
        g = self.config.image_grid
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

    # -- forward ---------------------------------------------------------------------------
    def backbone(self, x: Tensor, cache: KVCache | None = None) -> Tensor:  # (B, l, d) -> (B, l, d)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, None, i, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.ln_f(x)

    def forward(self, text: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass: (B, T) text ids, (B, N) image codes -> text logits (B, T, Vt + T) and
        image logits (B, N, Vi), where position j of each predicts token j of its kind."""
        n = self.config.image_seq_len
        if image.shape[1] != n:
            raise ValueError(f"image codes must be (B, {n}), got {tuple(image.shape)}; flatten the grid first")
        x = torch.cat([self.embed_text(text), self.embed_image(image, 0)], dim=1)  # (B, T+N, d)
        h = self.backbone(x)
        t = self.config.text_seq_len
        return self.text_head(h[:, :t]), self.image_head(h[:, t:])

    @torch.inference_mode()
    def prefill(self, text: Tensor, image_prefix: Tensor, cache: KVCache) -> Tensor:
        """Run the prompt and any given image tokens through the cache; returns the image logits
        (B, Vi) for the next image token. image_prefix: (B, p) with 0 <= p < N."""
        p = image_prefix.shape[1]
        x = torch.cat([self.embed_text(text), self.embed_image(image_prefix, 0) if p else
                       self.soi.expand(text.shape[0], 1, -1) + self.image_pos(0, 1)], dim=1)
        if p:  # image slots 0..p: <soi> plus the p given tokens
            x = torch.cat([x, self.image_emb(image_prefix[:, -1:]) + self.image_pos(p, 1)], dim=1)
        return _row_linear(self.image_head, self.backbone(x, cache)[:, -1], cache)  # as decode_step computes it

    @torch.inference_mode()
    def decode_step(self, token: Tensor, cache: KVCache) -> Tensor:
        """Feed image token (B,) into the next slot; returns the logits (B, Vi) for the token after it."""
        cfg, pos = self.config, cache.length
        if pos >= cfg.seq_len:
            raise RuntimeError(f"the cache is full ({pos} of {cfg.seq_len} slots): no image slot is left")
        slot = pos - cfg.text_seq_len  # image slot this token occupies
        x = self.image_emb(token) + self.row_pos[slot // cfg.image_grid] + self.col_pos[slot % cfg.image_grid]
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache, i)
        cache.length += 1
        return _row_linear(self.image_head, self.ln_f(x), cache)


def training_flops_per_token(cfg: DALLEConfig) -> tuple[float, float]:
    """Training FLOPs (forward + backward) per token: (matmuls, attention). 6 per matmul weight (2 forward,
    4 backward; embeddings are lookups), and 12·d per visible (query, key) pair of each layer's mask
    (QK^T and AV, forward and backward), averaged over the stream. Recomputing activations adds a forward."""
    d = cfg.n_embd
    matmul = cfg.n_layer * (4 + 2 * cfg.mlp_ratio) * d * d + d * (cfg.text_vocab_total + cfg.image_vocab_size)
    kinds = layer_kinds(cfg.n_layer, cfg.attn_schedule)
    pairs = {k: int(dense_mask(k, cfg.text_seq_len, cfg.image_grid, cfg.conv_kernel).sum()) for k in set(kinds)}
    return 6.0 * matmul, 12.0 * d * sum(pairs[k] for k in kinds) / cfg.seq_len
