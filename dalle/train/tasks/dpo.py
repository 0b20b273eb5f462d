"""Direct Preference Optimisation of the transformer for the shared engine (Rafailov et al. 2023), on pairs of
the model's own samples that people (or the simulated rater) compared.

Loss: -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), each log-probability
summed over the image's tokens given the prompt; ref is a frozen copy of the supervised (SFT) model the policy
starts from. Ties carry no preference and are left out. Both images of a pair go through the policy in one
batch; the reference's log-probabilities are computed once per batch without gradients.
Evaluation: the held-out DPO loss and implicit-reward accuracy, and KL(pi || pi_SFT) estimated by Monte Carlo:
`kl_samples` images sampled from the policy (plain sampling, no guidance, so the samples are the policy's own
distribution) for held-out prompts, sum over tokens of log pi - log pi_SFT, averaged.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dalle.feedback.data import PairDataset, Selection, load_samples, select
from dalle.feedback.losses import dpo_loss, sequence_kl
from dalle.feedback.store import Store
from dalle.tokenizer import TextTokenizer
from dalle.train.engine import matrix_decay_groups
from dalle.transformer.model import DALLE
from dalle.transformer.sampling import token_logprobs

if TYPE_CHECKING:
    from dalle.train.engine import EvalSink


@dataclass(frozen=True)
class DPOObjective(Selection):
    beta: float = 0.1  # strength of the implicit KL constraint: smaller lets the policy move further
    kl_samples: int = 16  # policy samples drawn at each evaluation to estimate KL(pi || pi_SFT)
    kl_seed: int = 0
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0 or self.kl_samples < 0:
            raise ValueError(f"beta must be > 0 and kl_samples >= 0, got {self.beta}, {self.kl_samples}")


@dataclass(frozen=True)
class DPOInputs:
    """Files DPO reads: the store of compared samples and the supervised model (policy start and reference)."""

    store: str = ""  # the comparisons store (SQLite) of tools/feedback.py
    init: str = ""  # the supervised transformer (model or run directory) that made the samples


def sequence_logprob(model: nn.Module, text: Tensor, codes: Tensor) -> Tensor:
    """log p(codes | text) summed over the image's tokens: (B, T), (B, N) -> (B,), fp32."""
    return token_logprobs(model(text, codes)[1], codes).sum(-1)


class DPOTask:
    best_metric = ("val_loss", "min")  # held-out DPO loss: checkpoints/best and early stopping

    def __init__(self, model: DALLE, objective: DPOObjective, tokenizer: TextTokenizer, store: Store,
                 dvae_path: str = "") -> None:
        cfg = model.config
        self.model, self.objective, self.tokenizer, self.dvae_path = model, objective, tokenizer, dvae_path
        # The reference is the policy as it starts: the supervised model, frozen.
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.train_judgements, self.val_judgements = select(store, objective, decided_only=True)
        ids = {s for j in self.train_judgements + self.val_judgements for s in (j.winner_id, j.loser_id)}
        self.table = load_samples(store, ids, tokenizer, cfg.text_seq_len, pixels=False)
        codes = self.table.codes
        if codes.shape[1] != cfg.image_seq_len or int(codes.max()) >= cfg.image_vocab_size:
            raise ValueError(f"the store's samples have {codes.shape[1]} codes up to {int(codes.max())}, but the "
                             f"model reads {cfg.image_seq_len} codes below {cfg.image_vocab_size}: fine-tune the "
                             "transformer that made the samples")
        self.tokens_per_sample = 2 * cfg.seq_len
        self.train = PairDataset(self.train_judgements, self.table)

    def train_dataset(self) -> Dataset:
        return self.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return matrix_decay_groups(model)

    def _logratios(self, model: nn.Module, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """log pi - log ref of the winners and of the losers, (B,) each."""
        device = next(model.parameters()).device
        rows = torch.cat([first, second])
        text, codes = self.table.text[rows].to(device), self.table.codes[rows].to(device)
        policy = sequence_logprob(model, text, codes)
        with torch.no_grad():
            ref = sequence_logprob(self.ref.to(device), text, codes)
        ratio = policy - ref
        return ratio[: len(first)], ratio[len(first) :]

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        chosen, rejected = self._logratios(model, batch["first"], batch["second"])
        zero = torch.zeros_like(chosen)
        loss = dpo_loss(chosen, rejected, zero, zero, self.objective.beta)  # the ratios already hold the reference
        margin = (chosen - rejected).detach()
        return loss, {"implicit_accuracy": (margin > 0).float().mean().item(),
                      "margin": self.objective.beta * margin.mean().item(),
                      # On the supervised model's samples: -mean(log pi/ref) is a (biased) estimate of KL(ref || pi).
                      "sft_sample_logratio": torch.cat([chosen, rejected]).detach().mean().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        val = PairDataset(self.val_judgements, self.table)
        losses, hits, n = 0.0, 0.0, 0
        for start in range(0, len(val), self.objective.eval_batch_size):
            idx = slice(start, start + self.objective.eval_batch_size)
            chosen, rejected = self._logratios(model, val.first[idx], val.second[idx])
            zero = torch.zeros_like(chosen)
            losses += dpo_loss(chosen, rejected, zero, zero, self.objective.beta).item() * len(chosen)
            hits += (chosen > rejected).float().sum().item()
            n += len(chosen)
        metrics = {"val_loss": losses / n, "val_implicit_accuracy": hits / n}
        if self.objective.kl_samples:
            metrics["kl"] = self.kl(model)
        return metrics

    @torch.no_grad()
    def kl(self, model: nn.Module) -> float:
        """Monte-Carlo KL(pi || pi_SFT) in nats per image, over `kl_samples` policy samples of held-out prompts."""
        from dalle.transformer.sampling import sample

        o, device = self.objective, next(model.parameters()).device
        rows = torch.tensor(sorted({self.table.row[j.winner_id] for j in self.val_judgements}))
        text = self.table.text[rows[torch.arange(o.kl_samples) % len(rows)]].to(device)  # (K, T)
        g = torch.Generator(device=device).manual_seed(o.kl_seed)
        codes = sample(model, text, generator=g)  # (K, N)
        return sequence_kl(token_logprobs(model(text, codes)[1], codes),
                           token_logprobs(self.ref.to(device)(text, codes)[1], codes)).mean().item()

    def save_extra(self, directory: Any) -> None:
        """The fine-tuned transformer loads as any other: its tokenizer, and the dVAE that decodes its codes."""
        self.tokenizer.save(directory / "tokenizer.json")
        if self.dvae_path:
            (directory / "dvae.json").write_text(json.dumps({"path": self.dvae_path}) + "\n")
