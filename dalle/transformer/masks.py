"""The paper's attention patterns as mask functions: one definition, read by every attention path.

Full causal, row, column and convolutional masks over the image grid (Ramesh et al. 2021, sec. 2.2,
appendix B.1, Fig. 11) and the per-layer schedule. `attention` builds dense masks and BlockMasks from
`mask_mod`; `blocksparse` builds its per-block windows from it. Stream layout: see `attention`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

KINDS = ("full", "row", "column", "conv")
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ImagePattern = Callable[[Tensor, Tensor, int, int], Tensor]


def layer_kinds(n_layers: int, schedule: str = "paper") -> tuple[str, ...]:
    """Attention kind of each layer.

    "paper": column attention in layers with (i - 2) % 4 == 0, row attention elsewhere, and conv attention
    in the last layer (appendix B.1). "full": dense causal attention everywhere (a baseline). Otherwise a
    comma-separated list of n_layers kinds, e.g. "row,column,conv".
    """
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if schedule == "paper":
        return tuple("conv" if i == n_layers - 1 else "column" if (i - 2) % 4 == 0 else "row" for i in range(n_layers))
    if schedule == "full":
        return ("full",) * n_layers
    kinds = tuple(s.strip() for s in schedule.split(","))
    unknown = [s for s in kinds if s not in KINDS]
    if unknown:
        raise ValueError(
            f"schedule {schedule!r}: unknown kinds {unknown}; expected 'paper', 'full' or a comma-separated "
            f"list of kinds from {KINDS}"
        )
    if len(kinds) != n_layers:
        raise ValueError(f"schedule {schedule!r} lists {len(kinds)} kinds but the model has {n_layers} layers")
    return kinds


# Image patterns take the grid slots of query and key (qi, kj). They are only read where both are image
# slots and kj <= qi; elsewhere the caller's text and causal terms decide, so negative slots are harmless.
def _row(qi: Tensor, kj: Tensor, grid: int, radius: int) -> Tensor:
    return qi - kj <= grid  # the previous grid + 1 slots in raster order, itself included


def _column(qi: Tensor, kj: Tensor, grid: int, radius: int) -> Tensor:
    return (qi - kj) % grid == 0


def _conv(qi: Tensor, kj: Tensor, grid: int, radius: int) -> Tensor:
    near_row = (qi // grid - kj // grid).abs() <= radius
    near_col = (qi % grid - kj % grid).abs() <= radius
    return near_row & near_col


_IMAGE_PATTERNS: dict[str, ImagePattern] = {"row": _row, "column": _column, "conv": _conv}


def _check_geometry(kind: str, text_len: int, grid: int, kernel: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")
    if not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int (a window centred on the query), got {kernel!r}")


def mask_mod(kind: str, text_len: int, grid: int, kernel: int = 11, image_first: bool = False) -> MaskMod:
    """FlexAttention mask_mod `fn(b, h, q_idx, kv_idx) -> bool` over stream positions; True = may attend.

    Built from elementwise tensor ops only, so `create_mask` / `create_block_mask` can vmap it and
    torch.compile can fuse it; `dense_mask` broadcasts the same function, so each pattern has one definition.
    image_first: the image slots come first (positions 0..N-1), then the text slots.
    """
    _check_geometry(kind, text_len, grid, kernel)
    if kind == "full":

        def full(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx <= q_idx

        return full

    pattern, radius = _IMAGE_PATTERNS[kind], kernel // 2
    if image_first:
        n = grid * grid

        def reading(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            # Causality alone keeps image queries off text keys; text queries read every image key.
            return (kv_idx <= q_idx) & ((q_idx >= n) | pattern(q_idx, kv_idx, grid, radius))

        reading.__name__ = f"{kind}_image_first_mask"
        return reading

    def sparse(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Causality alone keeps text queries off image keys; image queries read every text key.
        image_ok = pattern(q_idx - text_len, kv_idx - text_len, grid, radius)
        return (kv_idx <= q_idx) & ((kv_idx < text_len) | image_ok)

    sparse.__name__ = f"{kind}_mask"
    return sparse
