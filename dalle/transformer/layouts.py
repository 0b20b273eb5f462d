"""The stream layouts one transformer learns, and which of their text tokens a loss or a score counts.

    t2i      [text][image]               today's DALL-E stream: the caption, then the image it describes
    caption  [image][caption]            reads an image, writes its caption
    qa       [image][question][answer]   reads an image and a question, writes the answer

A row's layout is its index in LAYOUTS (the `layout` tensors of `DALLE.forward`). In the reading layouts the
text slots hold one sequence of T ids: the caption, or the question's ids then the answer's, padded with the
per-position pad ids (appendix B.2) as a prompt is. The first pad after the generated part is its end-of-text
token, and the answer starts at text slot `answer_at` (the question's length; 0 for a caption).
"""

from __future__ import annotations

import torch
from torch import Tensor

T2I, CAPTION, QA = "t2i", "caption", "qa"
LAYOUTS: tuple[str, ...] = (T2I, CAPTION, QA)


def layout_index(name: str) -> int:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {list(LAYOUTS)}")
    return LAYOUTS.index(name)


def text_end(text: Tensor, vocab_size: int) -> Tensor:
    """(B, T) ids -> (B,) the slot of each row's first pad id (its end-of-text), T where there is none."""
    pads = text >= vocab_size
    t = text.shape[1]
    slots = torch.arange(t, device=text.device).expand_as(text)
    return torch.where(pads, slots, t).amin(dim=1)


def generated_mask(text: Tensor, answer_at: Tensor, vocab_size: int) -> Tensor:
    """(B, T) bool: the text slots a reading row generates, and so the only ones its loss and its score count:
    from answer_at (0 for a caption) through the end-of-text token (the first pad at or after answer_at)."""
    t = text.shape[1]
    slots = torch.arange(t, device=text.device)[None]  # (1, T)
    after = slots >= answer_at[:, None]
    end = torch.where((text >= vocab_size) & after, slots, t).amin(dim=1)  # (B,) first pad of the answer
    return after & (slots <= end[:, None])


def pack_qa(question: list[int], answer: list[int], text_len: int, vocab_size: int) -> tuple[list[int], int]:
    """One row of text ids for the qa layout: question ids then answer ids, then each slot's pad; and the
    slot where the answer starts. The question keeps at most text_len - 1 ids (room for one answer token)
    and the answer what is left, so a long pair loses its tail, never its start."""
    if text_len < 2:
        raise ValueError(f"the qa layout needs text_seq_len >= 2, got {text_len}")
    question = question[: text_len - 1]
    ids = (question + answer)[:text_len]
    return ids + list(range(vocab_size + len(ids), vocab_size + text_len)), len(question)
