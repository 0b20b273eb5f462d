"""Key/value-cached inference for the transformer: the prompt pass, then one slot per step.

`prefill` runs the prompt (and any priming image tokens) through the network once, filling a `KVCache`;
`decode_step` then feeds one image token per call and returns the logits of the next. Each is the same
computation as `DALLE.forward` on the stream so far (tests check it logit for logit), without module and
dropout overheads, which at batch 4 and width 256 cost as much as the arithmetic.

On a CPU in fp32 the few-row products of a step go through oneDNN, each weight packed once for the
cache's batch, and the MLP's GELU runs inside its first product (benchmarks in docs/performance.md).
Those are private torch ops (`torch.ops.mkldnn`): every other case, a torch build without them, another
device or dtype, or autocast, takes `F.linear`, which the tests compare them with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle.transformer.attention import additive_mask, attend_newest, layer_kinds
from dalle.transformer.model import DALLE, Attention, Block, DALLEConfig

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class KVCache:
    """Preallocated keys and values of every layer, (B, H, L, D) each; `length` slots are filled. `bias[i]`
    is layer i's (L, L) `additive_mask`, shared between layers of one kind, so a step reads its row, or None
    for a full layer, whose newest query reads every cached key.

    Separate key and value buffers keep (B, H) mergeable into one batch dimension, so the attention
    matmuls of a decoding step read the cache in place (one buffer holding both copied it each step).
    `packed` holds the oneDNN-packed weights (filled on first use; None where the fast path does not
    apply): weights cannot change while a cache lives, since sampling runs under inference mode."""

    def __init__(self, cfg: DALLEConfig, batch: int, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch, cfg.n_head, cfg.seq_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.bias = [None if kind == "full" else
                     additive_mask(kind, cfg.text_seq_len, cfg.image_grid_size, cfg.conv_kernel, device, dtype)
                     for kind in layer_kinds(cfg.n_layer, cfg.attn_schedule)]
        self.length = 0
        on_cpu = torch.device(device).type == "cpu"
        self.packed: dict[nn.Linear, Tensor] | None = {} if ONEDNN and on_cpu and dtype == torch.float32 else None


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
    keys, values = cache.k[layer][:, :, : pos + 1], cache.v[layer][:, :, : pos + 1]
    bias = cache.bias[layer]
    y = attend_newest(q, keys, values, None if bias is None else bias[pos, : pos + 1])  # (B, H, 1, D)
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
    g = cfg.image_grid_size
    x = model.image_emb(token) + model.row_pos[slot // g] + model.col_pos[slot % g]
    for i, block in enumerate(model.blocks):
        x = block_step(block, x, cache, i)
    cache.length += 1
    return row_linear(model.image_head, model.ln_f(x), cache)
