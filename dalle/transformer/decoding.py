"""Key/value-cached inference for the transformer: the prompt pass, then one slot per step.

`prefill` runs the prompt (and any priming image tokens) through the network once, filling a `KVCache`;
`decode_step` then feeds one image token per call and returns the logits of the next. Each is the same
computation as `DALLE.forward` on the stream so far (tests check it logit for logit), without module and
dropout overheads, which at batch 4 and width 256 cost as much as the arithmetic. A sparse layer's step
reads only the keys its mask allows: the text keys and a row's, a column's or a window's image keys,
gathered into a small buffer (`KVCache`), a few hundred keys instead of up to 1,280 at the paper's size.

On a CPU in fp32 the few-row products of a step go through oneDNN, each weight packed once for the
cache's batch, and the MLP's GELU runs inside its first product (benchmarks in docs/performance.md).
Those are private torch ops (`torch.ops.mkldnn`): every other case, a torch build without them, another
device or dtype, or autocast, takes `F.linear`, which the tests compare them with.

The reading layouts (image first, then text: captions and answers) have their own pair: `prefill_reading`
runs the image and the text prompt, `decode_text_step` feeds one text token. A text query after the image reads
every cached key, so their cache (`KVCache(..., image_first=True)`) keeps no windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle.transformer.attention import additive_mask, attend_newest, dense_mask, image_keys, layer_kinds
from dalle.transformer.layouts import LAYOUTS
from dalle.transformer.model import DALLE, Attention, Block, DALLEConfig

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class KVCache:
    """Preallocated keys and values of every layer, (B, H, L, D) each, in stream order; `length` slots are
    filled.

    A sparse (row, column, conv) layer's query at image slot s reads the T text keys and the few image keys
    of `image_keys(kind)[s]` (at most G + 1 of up to 1,024 at the paper's 32 x 32 grid). With `sparse` (the
    default) each such layer also owns a window, (B, H, T + M, D) for keys and values, M its pattern's
    largest key set: the text keys are copied in once, at the first step, and each step gathers the slot's
    image keys behind them (a row layer keeps its newest G + 1 there as a ring instead), so its attention
    reads T + M keys at most, unmasked, instead of the whole cache.
    With sparse=False a step reads the whole cache with the layer's mask row as an additive bias (`bias[i]`,
    layer i's (L, L) `additive_mask`): the reference the tests compare the windows with. A full layer's
    query reads every cached key either way.

    Separate key and value buffers keep (B, H) mergeable into one batch dimension, so the attention
    matmuls of a decoding step read the cache in place (one buffer holding both copied it each step).
    `packed` holds the oneDNN-packed weights (filled on first use; None where the fast path does not
    apply): weights cannot change while a cache lives, since sampling runs under inference mode."""

    def __init__(self, cfg: DALLEConfig, batch: int, device: torch.device | str, dtype: torch.dtype,
                 sparse: bool = True, image_first: bool = False, text_only: bool = False) -> None:
        shape = (batch, cfg.n_head, cfg.seq_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.text_len, self.length, self.staged = cfg.text_seq_len, 0, False
        self.image_first, self.text_only = image_first, text_only
        # where text slot 0 sits in the stream: after the image in a reading stream, first in a text-only one
        self.text_start = cfg.image_seq_len if image_first else 0
        # A reading stream decodes text only, whose queries read every cached key, and so does a text-only
        # stream (the caption prior of guided reading): no key sets, windows or masks
        kinds = ("full",) * cfg.n_layer if image_first or text_only else layer_kinds(cfg.n_layer, cfg.attn_schedule)
        geometry = (cfg.text_seq_len, cfg.image_grid_size, cfg.conv_kernel, device)
        # one tuple of index tensors per kind, shared by that kind's layers (and by caches of one geometry)
        self.keys = [None if kind == "full" or not sparse else image_keys(kind, *geometry) for kind in kinds]
        self.bias = [None if kind == "full" or sparse else additive_mask(kind, *geometry, dtype)
                     for kind in kinds]
        self.window_k, self.window_v = ([None if keys is None else
                                         torch.zeros(shape[:2] + (cfg.text_seq_len + max(map(len, keys)), shape[3]),
                                                     device=device, dtype=dtype) for keys in self.keys]
                                        for _ in range(2))
        # A row layer's image keys are the newest G + 1 slots: its window holds them as a ring, so a step
        # writes one key there instead of gathering G + 1 (the gathers were a third of a step's attention)
        self.ring = [cfg.image_grid_size + 1 if kind == "row" and sparse else 0 for kind in kinds]
        on_cpu = torch.device(device).type == "cpu"
        self.packed: dict[nn.Linear, Tensor] | None = {} if ONEDNN and on_cpu and dtype == torch.float32 else None

    def reorder(self, rows: Tensor) -> None:
        """Keep the cached rows `rows` (B',) long, in that order: a beam's parents, or each row repeated. Only
        for a reading or text-only cache, whose text steps keep no windows."""
        if not (self.image_first or self.text_only):
            raise ValueError("only a reading (image_first=True) or text-only cache can be reordered")
        batch = self.k[0].shape[0]
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        if self.packed is not None and rows.shape[0] != batch:
            self.packed = {}  # oneDNN packs each weight for one row count

    def stage_text(self) -> None:
        """Copy the cached text keys and values into every window: once, at the first decoding step, so the
        windows hold whatever the prompt pass (or a caller filling `k` and `v`) left there."""
        t, self.staged = self.text_len, True
        for cache, windows in ((self.k, self.window_k), (self.v, self.window_v)):
            for full, window, ring in zip(cache, windows, self.ring):
                if window is not None:
                    window[:, :, :t] = full[:, :, :t]
                if ring:  # the image slots the prompt pass filled, the newest `ring` of them
                    slots = torch.arange(max(0, self.length - t - ring), self.length - t, device=window.device)
                    window[:, :, t + slots % ring] = full[:, :, t + slots]

    def attend(self, q: Tensor, layer: int) -> Tensor:  # (B, H, 1, D) -> (B, H, 1, D)
        """The newest slot's query against the keys its layer reads; the slot's key and value are cached."""
        n = self.length + 1
        keys, values = self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        if ring := self.ring[layer]:
            slot, end = self.length - self.text_len, self.text_len + min(n - self.text_len, ring)
            keys, values = self.window_k[layer][:, :, :end], self.window_v[layer][:, :, :end]
            # the ring's order is not the stream's: attention without positions inside does not care
            keys[:, :, self.text_len + slot % ring] = self.k[layer][:, :, self.length]
            values[:, :, self.text_len + slot % ring] = self.v[layer][:, :, self.length]
            return attend_newest(q, keys, values, None)  # (B, H, 1, D)
        if self.keys[layer] is not None:
            index = self.keys[layer][self.length - self.text_len]
            end = self.text_len + index.shape[0]
            keys, values = self.window_k[layer][:, :, :end], self.window_v[layer][:, :, :end]
            # straight into the window behind the text keys: one copy of at most M keys, no temporary
            torch.index_select(self.k[layer], 2, index, out=keys[:, :, self.text_len:])
            torch.index_select(self.v[layer], 2, index, out=values[:, :, self.text_len:])
            return attend_newest(q, keys, values, None)  # (B, H, 1, D)
        bias = self.bias[layer]
        return attend_newest(q, keys, values, None if bias is None else bias[self.length, :n])


def row_linear(layer: nn.Linear, x: Tensor, cache: KVCache, gelu: bool = False) -> Tensor:
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


def attention_step(attn: Attention, x: Tensor, cache: KVCache, layer: int) -> Tensor:  # (B, d) -> (B, d)
    """The newest slot's query against the cached keys its layer's pattern reads."""
    b, d = x.shape
    h, pos = attn.cfg.n_head, cache.length
    q, k, v = row_linear(attn.qkv, x, cache).reshape(b, 3, h, 1, d // h).unbind(1)  # 3 x (B, H, 1, D)
    cache.k[layer][:, :, pos : pos + 1] = k
    cache.v[layer][:, :, pos : pos + 1] = v
    y = cache.attend(q, layer)  # (B, H, 1, D)
    return row_linear(attn.proj, y.reshape(b, d), cache)


def block_step(block: Block, x: Tensor, cache: KVCache, layer: int) -> Tensor:  # (B, d) -> (B, d)
    fc1, _, fc2 = block.mlp  # the GELU (tanh) runs inside fc1's kernel
    x = x + attention_step(block.attn, block.ln1(x), cache, layer)
    return x + row_linear(fc2, row_linear(fc1, block.ln2(x), cache, gelu=True), cache)


@torch.inference_mode()
def prefill(model: DALLE, text: Tensor, image_prefix: Tensor, cache: KVCache) -> Tensor:
    """Run the prompt and any given image tokens through the cache; returns the image logits (B, Vi) for
    the next image token. text: (B, T) ids; image_prefix: (B, p) codes with 0 <= p < N."""
    p = image_prefix.shape[1]
    x = torch.cat([model.embed_text(text), model.embed_image(image_prefix, 0) if p else
                   model.soi.expand(text.shape[0], 1, -1) + model.image_pos(0, 1)], dim=1)
    if p:  # image slots 0..p: <soi> plus the p given tokens
        x = torch.cat([x, model.image_emb(image_prefix[:, -1:]) + model.image_pos(p, 1)], dim=1)
    return row_linear(model.image_head, model.backbone(x, cache)[:, -1], cache)  # as decode_step computes it


@torch.inference_mode()
def decode_step(model: DALLE, token: Tensor, cache: KVCache) -> Tensor:
    """Feed image token (B,) into the next slot; returns the logits (B, Vi) for the token after it."""
    cfg, pos = model.config, cache.length
    if pos >= cfg.seq_len:
        raise RuntimeError(f"the cache is full ({pos} of {cfg.seq_len} slots): no image slot is left")
    slot = pos - cfg.text_seq_len  # image slot this token occupies
    if not cache.staged:
        cache.stage_text()
    g = cfg.image_grid_size
    x = model.image_emb(token) + model.row_pos[slot // g] + model.col_pos[slot % g]
    for i, block in enumerate(model.blocks):
        x = block_step(block, x, cache, i)
    cache.length += 1
    return row_linear(model.image_head, model.ln_f(x), cache)


@torch.inference_mode()
def prefill_reading(model: DALLE, image: Tensor, text: Tensor, layout: str, answer_at: Tensor, length: int,
                    cache: KVCache) -> Tensor:
    """Run the image (B, N) codes and the first `length` text slots of a reading stream through the cache;
    returns the text logits (B, Vt + T) for the token of text slot length - 1. text: (B, T) ids, of which the
    slots before length - 1 feed the stream (the question; nothing for a caption); answer_at: (B,)."""
    n = model.config.image_seq_len
    if not 1 <= length <= model.config.text_seq_len:
        raise ValueError(f"length must be in 1..{model.config.text_seq_len}, got {length}")
    rows = torch.full((text.shape[0],), LAYOUTS.index(layout), device=text.device)
    x = model.embed_reading(text, image, rows, answer_at)[:, : n + length]
    return row_linear(model.text_head, model.backbone(x, cache, image_first=True)[:, -1], cache)


def _text_slot(model: DALLE, x: Tensor, cache: KVCache) -> Tensor:
    """Input (B, d) of the next text slot through every layer; the logits (B, Vt + T) of the token after it."""
    end = cache.text_start + model.config.text_seq_len
    if cache.length >= end:
        raise RuntimeError(f"the cache is full ({cache.length} of {end} slots): no text slot is left")
    for i, block in enumerate(model.blocks):
        x = block_step(block, x, cache, i)
    cache.length += 1
    return row_linear(model.text_head, model.ln_f(x), cache)


@torch.inference_mode()
def prefill_text_prior(model: DALLE, batch: int, cache: KVCache) -> Tensor:
    """Start the text-to-image stream's text alone in an empty text-only cache (`KVCache(..., text_only=True)`):
    its <sot> slot. Returns the logits (B, Vt + T) of text slot 0: the model's caption before any image."""
    if not cache.text_only or cache.length:
        raise ValueError("the text prior needs an empty text-only cache (KVCache(..., text_only=True))")
    return _text_slot(model, (model.sot + model.text_pos[0]).expand(batch, -1), cache)  # embed_text's slot 0


@torch.inference_mode()
def decode_text_step(model: DALLE, token: Tensor, cache: KVCache) -> Tensor:
    """Feed text token (B,) into the next text slot of a reading or text-only stream; returns the logits
    (B, Vt + T) for the token after it."""
    return _text_slot(model, model.text_emb(token) + model.text_pos[cache.length - cache.text_start], cache)


def sampling_flops(cfg: DALLEConfig, sparse: bool = True) -> float:
    """FLOPs to sample one image with the cache: the prompt pass over T + 1 slots, then N - 1 steps. Each
    slot costs 2 per weight of its layers' products and, per layer, 4·d per key it reads (q·k and the
    weighted sum of values): the visible pairs of the mask in the prompt pass; in a step, every cached key
    for a full layer (or a sparse one with sparse=False, which reads them all under its bias), else the
    text keys plus the layer's image key set. The image head runs once per sampled token."""
    d, t, n = cfg.n_embd, cfg.text_seq_len, cfg.image_seq_len
    per_slot = cfg.n_layer * 2 * (4 + 2 * cfg.mlp_ratio) * d * d
    geometry = (t, cfg.image_grid_size, cfg.conv_kernel)
    keys = 0
    for kind in layer_kinds(cfg.n_layer, cfg.attn_schedule):
        keys += int(dense_mask(kind, *geometry)[: t + 1, : t + 1].sum())  # the prompt pass
        if kind == "full" or not sparse:
            keys += sum(t + s + 1 for s in range(1, n))
        else:
            keys += sum(t + len(idx) for idx in image_keys(kind, *geometry)[1:])
    return per_slot * (t + n) + 4.0 * d * keys + 2.0 * d * cfg.image_vocab_size * n
