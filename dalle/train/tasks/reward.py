"""The reward model's training objective for the shared engine (Stiennon et al. 2020, sec. 3.4; RewardModel).

Loss: Bradley-Terry on the store's comparisons, -log sigmoid(r(winner) - r(loser)), a tie half a win for
each side; skipped comparisons are never read. Both images of a comparison go through the model in one
batch. Evaluation on the held-out pairs: the loss, pairwise accuracy on the decided judgements (of the
training rater, and of `reference_rater` when set, e.g. the noiseless simulated rater), and the offset:
the mean raw reward of the supervised model's samples in the store, set on the model at every evaluation
so that each checkpoint's rewards average 0 on those samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from dalle.feedback.data import PairDataset, SampleTable, Selection, images_of, load_samples, pairwise_accuracy, select
from dalle.feedback.losses import bradley_terry_loss
from dalle.feedback.reward import RewardModel
from dalle.feedback.store import Judgement, Store
from dalle.tokenizer import TextTokenizer
from dalle.train.engine import matrix_decay_groups

if TYPE_CHECKING:
    from dalle.train.engine import EvalSink


@dataclass(frozen=True)
class RewardObjective(Selection):
    reference_rater: str = ""  # also report held-out accuracy against this rater's labels ("": none)
    sft_model: str = ""  # model id of the supervised model's samples ("": the store's first sample's model)
    eval_batch_size: int = 64  # samples scored at once in evaluation
    # Train the head only: the body keeps what it learned (the reranker's sense of which image fits the text),
    # which a few thousand comparisons, most decided by small differences, otherwise wear away.
    freeze_body: bool = False


@dataclass(frozen=True)
class RewardInputs:
    """Files the reward model's training reads."""

    store: str = ""  # the comparisons store (SQLite) of tools/feedback.py
    init: str = ""  # the trained reranker or transformer (model or run directory) the reward model starts from


class RewardTask:
    best_metric = ("val_loss", "min")  # held-out Bradley-Terry loss: checkpoints/best and early stopping

    def __init__(self, model: RewardModel, objective: RewardObjective, tokenizer: TextTokenizer, store: Store) -> None:
        self.model, self.objective, self.tokenizer = model, objective, tokenizer
        self.pixels = model.config.reads_pixels
        if objective.freeze_body:
            model.body.requires_grad_(False)
        self.train_judgements, self.val_judgements = select(store, objective)
        self.reference: list[Judgement] = []
        if objective.reference_rater:
            self.reference = [j for j in store.judgements() if j.rater == objective.reference_rater
                              and j.pair_id in {v.pair_id for v in self.val_judgements}]
        self.sft_ids = sft_samples(store, objective.sft_model)
        ids = {s for j in self.train_judgements + self.val_judgements + self.reference
               for s in (j.winner_id, j.loser_id)} | set(self.sft_ids)
        self.table = load_samples(store, ids, tokenizer, model.config.text_seq_len, pixels=self.pixels)
        check_fit(model, self.table)
        self.train = PairDataset(self.train_judgements, self.table)

    def train_dataset(self) -> Dataset:
        return self.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return matrix_decay_groups(model)

    def raw_rewards(self, model: nn.Module, rows: Tensor) -> Tensor:  # table rows (B,) -> (B,)
        device = next(model.parameters()).device
        image = images_of(self.table, rows, pixels=self.pixels).to(device)
        if self.pixels:
            image = fit_size(image, model)
        return unwrap(model).raw(self.table.text[rows].to(device), image)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        b = len(batch["target"])
        rewards = self.raw_rewards(model, torch.cat([batch["first"], batch["second"]])).float()  # (2B,)
        first, second = rewards[:b], rewards[b:]
        target = batch["target"].to(rewards.device)
        decided = target == 1
        accuracy = (first > second)[decided].float().mean().item() if decided.any() else float("nan")
        return bradley_terry_loss(first, second, target), {"accuracy": accuracy,
                                                            "reward_std": rewards.detach().std().item()}

    @torch.no_grad()
    def scores(self, model: nn.Module, sample_ids: list[int]) -> dict[int, float]:
        """Raw rewards of samples, by id."""
        out: dict[int, float] = {}
        rows = torch.tensor([self.table.row[s] for s in sample_ids], dtype=torch.long)
        for chunk, ids in zip(rows.split(self.objective.eval_batch_size),
                              torch.tensor(sample_ids).split(self.objective.eval_batch_size)):
            out.update(zip(ids.tolist(), self.raw_rewards(model, chunk).float().tolist()))
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        val = self.val_judgements
        ids = sorted({s for j in val + self.reference for s in (j.winner_id, j.loser_id)} | set(self.sft_ids))
        scores = self.scores(model, ids)
        first = torch.tensor([scores[j.winner_id] for j in val])
        second = torch.tensor([scores[j.loser_id] for j in val])
        target = torch.tensor([0.5 if j.tie else 1.0 for j in val])
        accuracy, n = pairwise_accuracy(scores, val)
        metrics = {"val_loss": bradley_terry_loss(first, second, target).item(), "val_accuracy": accuracy,
                   "val_decided": float(n)}
        if self.reference:
            metrics["val_reference_accuracy"] = pairwise_accuracy(scores, self.reference)[0]
        offset = sum(scores[s] for s in self.sft_ids) / len(self.sft_ids)
        for m in {unwrap(model), unwrap(self.model)}:  # the evaluated weights, and the live ones under an EMA
            m.offset.fill_(offset)
        metrics["offset"] = offset
        return metrics

    def save_extra(self, directory: Any) -> None:
        """A reward checkpoint carries its tokenizer: prompts must be tokenised as in training."""
        self.tokenizer.save(directory / "tokenizer.json")


def unwrap(model: nn.Module) -> RewardModel:
    return getattr(model, "module", model)  # DDP wraps it


def fit_size(images: Tensor, model: nn.Module) -> Tensor:
    """Pixels at the reranker's size (the dVAE's output may differ), as `dalle.reranker.score.rerank` does."""
    s = unwrap(model).config.reranker.image_size
    if images.shape[-1] == s and images.shape[-2] == s:
        return images
    return F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def sft_samples(store: Store, model_id: str) -> list[int]:
    """Ids of the supervised model's samples: those of `model_id`, or of the store's first sample's model."""
    if not model_id:
        first = store.db.execute("SELECT model_id FROM samples ORDER BY id LIMIT 1").fetchone()
        model_id = first[0] if first else ""
    try:
        return store.samples_of(model_id)
    except ValueError as e:
        raise ValueError(f"sft_model: {e}") from None


def check_fit(model: RewardModel, table: SampleTable) -> None:
    """The store's samples must be images this reward model can read."""
    cfg = model.config
    if not cfg.reads_pixels:
        t = cfg.transformer
        if table.codes.shape[1] != t.image_seq_len or int(table.codes.max()) >= t.image_vocab_size:
            raise ValueError(f"the store's samples have {table.codes.shape[1]} codes up to {int(table.codes.max())}, "
                             f"but the transformer reads {t.image_seq_len} codes below {t.image_vocab_size}: "
                             "initialise from the transformer that made the samples")
