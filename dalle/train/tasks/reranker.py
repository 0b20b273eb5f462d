"""The reranker's contrastive training objective for the shared engine (paper sec. 2.5; Reranker).

Loss: symmetric InfoNCE over a batch of (image, caption) pairs, each pair's partner the positive and every
other item of the batch a negative. Captions are tokenised per sample with BPE dropout, as the transformer's,
but never dropped to the empty prompt: in a contrastive batch every empty caption would be a tie.
Evaluation on held-out pairs, in batches of `val_batch_size`: zero-shot retrieval top-1 accuracy in both
directions, the mean cosine of matching pairs (the "Reranker score") and the held-out loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dalle.data.sources import eval_batches
from dalle.reranker.model import Reranker, contrastive_loss
from dalle.tokenizer import TextTokenizer
from dalle.train.engine import matrix_decay_groups, mix_seed
from dalle.train.tasks.transformer import DALLEObjective, captioned

if TYPE_CHECKING:
    from dalle.train.engine import EvalSink


@dataclass(frozen=True)
class RerankerObjective:
    bpe_dropout: bool = True  # the tokenizer's BPE dropout on training captions
    val_samples: int = 1024  # held-out pairs for the retrieval metrics
    val_batch_size: int = 128  # retrieval picks among this many pairs: the larger, the harder
    seed: int = 0  # tokenisation of captions that arrive untokenised (webdataset streams)

    def __post_init__(self) -> None:
        if self.val_samples < 1 or self.val_batch_size < 2:
            raise ValueError(f"val_samples must be >= 1 and val_batch_size >= 2 (retrieval needs a choice), "
                             f"got {self.val_samples}, {self.val_batch_size}")


@dataclass(frozen=True)
class RerankerInputs:
    """Files the reranker's training reads besides its data."""

    tokenizer: str = ""  # tokenizer.json from tools/train_bpe.py (the transformer's, so prompts agree)


class RerankerTask:
    best_metric = ("val_loss", "min")  # held-out contrastive loss: checkpoints/best and early stopping

    def __init__(self, model: Reranker, objective: RerankerObjective, tokenizer: TextTokenizer, train: Dataset,
                 val: Dataset) -> None:
        cfg = model.config
        if tokenizer.vocab_size != cfg.text_vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.text_vocab_size is "
                             f"{cfg.text_vocab_size}; set model.text_vocab_size to {tokenizer.vocab_size}")
        self.model, self.objective, self.tokenizer = model, objective, tokenizer
        # Captioned (the transformer's) tokenises with each sample's seed; no caption is ever dropped here.
        captions = DALLEObjective(caption_drop=0.0, bpe_dropout=objective.bpe_dropout)

        self.train = captioned(train, tokenizer, cfg.text_seq_len, captions, True)
        self.val = captioned(val, tokenizer, cfg.text_seq_len, captions, False)

    def train_dataset(self) -> Dataset:
        return self.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return matrix_decay_groups(model)  # the <cls> slots and the temperature are not decayed

    def _text(self, batch: dict[str, Any], step: int, train: bool) -> Tensor:
        if "text" in batch:
            return batch["text"]
        # A stream replays the same batches on resume, so a (seed, step) rng keeps resumed runs exact.
        rng = random.Random(mix_seed(self.objective.seed, step, 2))
        ids, _ = self.tokenizer.encode_batch(batch["caption"], self.model.config.text_seq_len,
                                             dropout=train and self.objective.bpe_dropout, rng=rng,
                                             truncate_warn=False)
        return ids

    def _inputs(self, model: nn.Module, batch: dict[str, Any], step: int, train: bool) -> tuple[Tensor, Tensor]:
        device = next(model.parameters()).device
        return self._text(batch, step, train).to(device), batch["image"].to(device)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        ids, images = self._inputs(model, batch, step, train=True)
        logits = model(ids, images)[0].float()  # (B, B)
        hits = logits.argmax(1) == torch.arange(len(logits), device=logits.device)
        return contrastive_loss(logits), {"batch_i2t_top1": hits.float().mean().item(),
                                   "temperature": model.scale().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        o = self.objective
        sums = dict.fromkeys(("i2t_top1", "t2i_top1", "i2t_top1_exact", "t2i_top1_exact", "clip_score",
                              "val_loss"), 0.0)
        n = 0
        for batch in eval_batches(self.val, o.val_samples, batch_size=o.val_batch_size):
            ids, images = self._inputs(model, batch, step, train=False)
            if len(ids) < 2:  # a lone pair has nothing to be told apart from
                continue
            image_emb, text_emb = model.encode_image(images).float(), model.encode_text(ids).float()
            cosines = image_emb @ text_emb.T  # (B, B)
            logits, b = model.scale().float() * cosines, len(ids)
            # Two captions with the same ids describe their images equally well (shapes repeats short
            # captions), so retrieving either counts as a hit; the _exact figures demand the pair itself.
            same = (ids[:, None, :] == ids[None, :, :]).all(-1)  # (B, B) caption i == caption j
            rows = torch.arange(b, device=logits.device)
            i2t, t2i = logits.argmax(1), logits.argmax(0)
            sums["i2t_top1"] += same[rows, i2t].sum().item()
            sums["t2i_top1"] += same[rows, t2i].sum().item()
            sums["i2t_top1_exact"] += (i2t == rows).sum().item()
            sums["t2i_top1_exact"] += (t2i == rows).sum().item()
            sums["clip_score"] += cosines.diagonal().sum().item()
            sums["val_loss"] += contrastive_loss(logits).item() * b
            n += b
        return {k: v / max(n, 1) for k, v in sums.items()}

    def save_extra(self, directory: Any) -> None:
        """A reranker checkpoint carries its tokenizer: prompts must be tokenised as in training."""
        self.tokenizer.save(directory / "tokenizer.json")
