"""Best-of-N distillation of the transformer, for the shared engine: rejection-sampling fine-tuning (the
"rejection sampling" stage of Llama 2's RLHF, Touvron et al. 2023; RAFT, Dong et al. 2023; BOND, Sessa et al.
2024 distils the same best-of-N distribution by other means).

Each step draws `n` images per prompt (from the frozen supervised model, or from the policy itself), keeps the
one the frozen reward model scores highest, and maximises the policy's log-likelihood of it. With samples from
the supervised model the policy is fitted to the best-of-n distribution, whose KL from the supervised model is
at most log n - (n - 1) / n. Its image tokens that the reward does not depend on keep the supervised model's
distribution in expectation, which a policy gradient's noisy advantages do not. There is no KL term in the
loss: `beta` only weighs the held-out KL in the objective that picks checkpoints/best, as in GRPO.

With `loss: dpo` the step learns a preference instead of a target: DPO between the reward model's pick and its
lowest-scored candidate of the same n (DPO on fresh samples labelled by a reward model: the best-against-worst
pairs of Dong et al. 2024, "RLHF Workflow", online when `source: policy`). The rejected image
gives the gradient a direction away from what the reward model dislikes, which the likelihood of the pick
alone does not, and `dpo_beta` bounds how far the policy moves, as DPO's implicit KL constraint. With
`dpo_pairs: k` the k best candidates meet the k worst, rank for rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dalle.feedback.losses import distribution_kl, dpo_loss
from dalle.train.tasks.grpo import RewardSampling, guidance_distillation
from dalle.transformer.model import DALLE
from dalle.transformer.sampling import empty_text, token_logprobs

SOURCES = ("reference", "policy")
LOSSES = ("nll", "dpo")
REJECTED = ("same", "unguided")


@dataclass(frozen=True)
class BoNObjective:
    n: int = 16  # candidates per prompt; the best by the reward model is the step's target
    # reference: candidates from the frozen supervised model (distils its best-of-n); policy: from the policy
    # itself (expert iteration: each step's best-of-n moves with the policy, and so does the KL)
    source: str = "reference"
    # nll: maximise the likelihood of the pick; dpo: DPO between the pick and the lowest-scored candidate
    loss: str = "nll"
    dpo_beta: float = 0.1  # DPO's beta (loss: dpo): smaller lets the policy move further from the reference
    # loss: dpo: pairs per prompt, the i-th best against the i-th worst (i < dpo_pairs); more of each prompt's n
    # samples teach the step, at the cost of a larger forward and backward pass
    dpo_pairs: int = 1
    # the training candidates are drawn with classifier-free guidance at this scale (1: none), so the pairs come
    # from the guided distribution, while the loss scores them unguided; the held-out evaluation still samples
    # the policy unguided. What that teaches shows under guidance more than without it (docs/feedback-experiments.md)
    cond_scale: float = 1.0
    # loss: dpo: where the rejected image comes from. same: the lowest-scored of the same n candidates; unguided:
    # the lowest-scored of n more drawn from the source without guidance, so with cond_scale > 1 each pair sets a
    # guided pick against the policy's own unguided failure (n more samples a step)
    rejected: str = "same"
    # loss: dpo with cond_scale != 1: this many more pairs per prompt from n more draws without guidance (their
    # best against their worst), so each step teaches the unguided sample beside the guided one (n more samples)
    unguided_pairs: int = 0
    # loss: dpo: weight of KL(reference || policy) of the caption-free next-token distributions on the step's pair
    # images, added to the loss. DPO's pairs always carry their caption, so the unconditional branch that
    # classifier-free guidance extrapolates from is otherwise left to drift with the shared weights
    uncond_kl: float = 0.0
    # loss: dpo: weight of KL(guided reference || policy) of the captioned next-token distributions on the step's
    # pair images, added to the loss: the reference's classifier-free guidance at `distill_cond_scale`, distilled
    # into the policy's plain sample (on-policy, exact over the vocabulary at each position). Mild guidance buys
    # accuracy for little KL (docs/feedback-experiments.md), and the policy keeps it without a second stream at
    # sampling time
    distill_guidance: float = 0.0
    distill_cond_scale: float = 1.2
    beta: float = 0.05  # weight of the held-out KL in the objective checkpoints/best follows (not in the loss)
    val_fraction: float = 0.2
    split_seed: int = 0
    eval_prompts: int = 32
    eval_samples: int = 1
    eval_seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 2 or self.source not in SOURCES or self.loss not in LOSSES or self.beta < 0 \
                or self.dpo_beta <= 0 or not 0 < self.val_fraction < 1 or min(self.eval_prompts, self.eval_samples) < 1:
            raise ValueError(f"need n >= 2, source in {SOURCES}, loss in {LOSSES}, beta >= 0, dpo_beta > 0, "
                             f"val_fraction in (0, 1), eval_prompts >= 1 and eval_samples >= 1; got {self.n}, "
                             f"{self.source!r}, {self.loss!r}, {self.beta}, {self.dpo_beta}, {self.val_fraction}, "
                             f"{self.eval_prompts}, {self.eval_samples}")
        if not 1 <= self.dpo_pairs <= self.n // 2:
            raise ValueError(f"dpo_pairs must be in [1, n // 2 = {self.n // 2}] (each pair takes one of the best and "
                             f"one of the worst of the n candidates); got {self.dpo_pairs}")
        if self.cond_scale < 0:
            raise ValueError(f"cond_scale must be >= 0 (1 samples the candidates unguided); got {self.cond_scale}")
        if self.uncond_kl < 0 or (self.uncond_kl > 0 and self.loss != "dpo"):
            raise ValueError(f"uncond_kl must be >= 0, and above 0 only with loss: dpo; got {self.uncond_kl} with "
                             f"loss {self.loss!r}")
        if self.distill_guidance < 0 or (self.distill_guidance > 0 and (
                self.loss != "dpo" or self.distill_cond_scale <= 0 or self.distill_cond_scale == 1)):
            raise ValueError(f"distill_guidance must be >= 0, and above 0 only with loss: dpo and a "
                             f"distill_cond_scale > 0 other than 1; got {self.distill_guidance} with loss "
                             f"{self.loss!r}, distill_cond_scale {self.distill_cond_scale}")
        if self.rejected not in REJECTED or (self.rejected != "same" and self.loss != "dpo"):
            raise ValueError(f"rejected must be one of {REJECTED}, and other than 'same' only with loss: dpo; got "
                             f"{self.rejected!r} with loss {self.loss!r}")
        if self.unguided_pairs:
            if not 0 < self.unguided_pairs <= self.n // 2 or self.loss != "dpo" or self.rejected != "same":
                raise ValueError(f"unguided_pairs must be in [0, n // 2 = {self.n // 2}], and above 0 only with "
                                 f"loss: dpo and rejected: same; got {self.unguided_pairs} with loss {self.loss!r}, "
                                 f"rejected {self.rejected!r}")
            if self.cond_scale == 1:
                raise ValueError("unguided_pairs needs cond_scale != 1: without guidance the n candidates are "
                                 "unguided already (raise dpo_pairs instead)")


def pairs(reward: Tensor, first: Tensor, k: int, worst: bool = False) -> Tensor:
    """Row indices of each prompt's k best (or k worst) candidates, rank by rank: (B * k,). `reward` is (B, n),
    `first` the row of each prompt's first candidate. Stable sorts pick the first of equals, as argmax does."""
    order = reward.argsort(dim=-1, descending=not worst, stable=True)[:, :k].to(first.device)
    return (first[:, None] + order).flatten()


class BoNTask(RewardSampling):
    def __init__(self, model: DALLE, objective: BoNObjective, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, objective, *args, **kwargs)
        self.tokens_per_sample = objective.n * model.config.seq_len

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        o, device = self.objective, next(model.parameters()).device
        prompts = batch["prompt"]
        rows = prompts.repeat_interleave(o.n)  # (B * n,)
        text = self.text[rows].to(device)
        source = self.ref.to(device) if o.source == "reference" else model
        codes = self._sample(source, text, cond_scale=o.cond_scale)  # the engine seeded the global RNG for this step
        reward = self.rewards(rows, codes).view(len(prompts), o.n)
        first = torch.arange(len(prompts), device=device) * o.n
        best = first + reward.argmax(-1).to(device)
        logs = {"reward": reward.mean().item(), "reward_best": reward.max(-1).values.mean().item()}
        if o.loss == "dpo":  # the k best against the k worst, rank for rank
            k, low = o.dpo_pairs, reward
            if o.rejected == "unguided" or o.unguided_pairs:  # n more unguided draws, indexed after the first B * n
                more = self._sample(source, text)
                low = self.rewards(rows, more).view(len(prompts), o.n)
                logs["reward_unguided"] = low.mean().item()
                text, codes, first_low = torch.cat([text, text]), torch.cat([codes, more]), first + len(rows)
            chosen, rejected = pairs(reward, first, k), pairs(reward, first, k, worst=True)
            if o.rejected == "unguided":
                rejected = pairs(low, first_low, k, worst=True)
            elif o.unguided_pairs:
                u = o.unguided_pairs
                chosen = torch.cat([chosen, pairs(low, first_low, u)])
                rejected = torch.cat([rejected, pairs(low, first_low, u, worst=True)])
            return self._dpo(model, text, codes, chosen, rejected, logs)
        text, codes = text[best], codes[best]
        logp = token_logprobs(model(text, codes)[1], codes)  # (B, image tokens)
        with torch.no_grad():
            log_ratio = (logp.detach() - token_logprobs(self.ref.to(device)(text, codes)[1], codes)).sum(-1)
        return -logp.mean(), {"nll": -logp.detach().sum(-1).mean().item(), **logs,
                              "log_ratio_best": log_ratio.mean().item()}

    def _dpo(self, model: nn.Module, text: Tensor, codes: Tensor, best: Tensor, worst: Tensor,
             logs: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
        both = torch.cat([best, worst])  # one forward for the chosen and the rejected images
        text, codes = text[both], codes[both]
        logits = model(text, codes)[1]
        logp = token_logprobs(logits, codes).sum(-1)
        with torch.no_grad():
            ref_logits = self.ref.to(codes.device)(text, codes)[1]
            ref = token_logprobs(ref_logits, codes).sum(-1)
        chosen, rejected = logp.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        margin = ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.objective.dpo_beta)
        logs = {**logs, "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item(),
                "log_ratio_best": (chosen - ref_chosen).detach().mean().item()}
        o = self.objective
        ref_uncond = None
        if o.uncond_kl > 0:
            empty = empty_text(self.ref, len(codes), codes.device)
            with torch.no_grad():
                ref_uncond = self.ref(empty, codes)[1]  # shared with the guidance term below
            kl = distribution_kl(ref_uncond, model(empty, codes)[1]).mean()
            loss = loss + o.uncond_kl * kl
            logs["uncond_kl"] = kl.item()
        if o.distill_guidance > 0:
            kl = guidance_distillation(self.ref, codes, logits, ref_logits, o.distill_cond_scale, ref_uncond)
            loss = loss + o.distill_guidance * kl
            logs["distill_kl"] = kl.item()
        return loss, logs
