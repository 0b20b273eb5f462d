"""The training signals of learning from preferences, as plain functions over log-probabilities and rewards.

bradley_terry_loss   the reward model's loss on comparisons (Stiennon et al. 2020, eq. 1): -log sigmoid(r_w - r_l),
                     a tie counting as half a win for each side
dpo_loss             Direct Preference Optimisation (Rafailov et al. 2023) on pairs of the policy's own samples
kl_shaped_rewards    the per-token reward of RL fine-tuning: -beta * log(pi / pi_SFT) at every token, and the
                     reward model's score added at the last (the image's 64th or 1024th token)
distribution_kl      KL(p || q) of whole next-token distributions, summed over a sequence: KL(ref || policy) anchors
                     a branch of the policy (e.g. its caption-free one) to the reference; KL(policy || ref) is the
                     exact form of RL's penalty; position_kl the same before the sum over positions
best_of_n_kl         the KL of best-of-N sampling from the policy it samples: log N - (N - 1) / N
best_of_n_reward     the reward whose KL-penalised optimum at beta 1 is best-of-N sampling: (N - 1) log F(r), F the
                     reference's distribution function of the reward on the same prompt (Amini et al. 2024)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(r_first: Tensor, r_second: Tensor, first_wins: Tensor) -> Tensor:
    """Mean negative log-likelihood of the judgements under P(first preferred) = sigmoid(r_first - r_second).
    first_wins: 1 where the first won, 0 where the second did, 0.5 for a tie (half a win each)."""
    margin = r_first - r_second
    return -(first_wins * F.logsigmoid(margin) + (1 - first_wins) * F.logsigmoid(-margin)).mean()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> Tensor:
    """-log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), averaged. Each
    argument is a sequence log-probability (B,), summed over the image's tokens."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def kl_shaped_rewards(reward: Tensor, logp_policy: Tensor, logp_ref: Tensor, beta: float) -> Tensor:
    """Per-token rewards R (B, N) = -beta * (log pi - log pi_SFT) at each sampled token, plus the reward
    model's score reward (B,) at the last token. logp_*: (B, N) log-probabilities of the sampled tokens."""
    if logp_policy.shape != logp_ref.shape or logp_policy.shape[0] != reward.shape[0]:
        raise ValueError(f"shapes differ: reward {tuple(reward.shape)}, log-probs {tuple(logp_policy.shape)} "
                         f"and {tuple(logp_ref.shape)}")
    shaped = -beta * (logp_policy - logp_ref)
    shaped[:, -1] += reward
    return shaped


def sequence_kl(logp_policy: Tensor, logp_ref: Tensor) -> Tensor:
    """Monte-Carlo KL(pi || pi_ref) per sample (B,) from sampled tokens' log-probabilities (B, N)."""
    return (logp_policy - logp_ref).sum(dim=-1)


def position_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) at each position (B, N) from next-token logits (B, N, V), exact over the vocabulary, in fp32.
    Differentiable in both."""
    p = F.log_softmax(logits_p.float(), dim=-1)
    return (p.exp() * (p - F.log_softmax(logits_q.float(), dim=-1))).sum(dim=-1)


def distribution_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per sequence (B,): position_kl summed over positions (unlike sequence_kl, no sampled-token
    estimate)."""
    return position_kl(logits_p, logits_q).sum(dim=-1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || base) = log N - (N - 1) / N nats (Stiennon et al. 2020, appendix G.3)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_reward(reward: Tensor, reference: Tensor, n: int) -> Tensor:
    """(N - 1) log F(reward), F estimated per prompt from the reference's rewards on it: reward (B, G) of the policy's
    samples, reference (B, M) of the reference's samples of the same B prompts, -> (B, G).

    Best of N draws from pi_SFT has density pi_SFT(y) N F(r(y))^(N-1), so the optimum of E[r'] - KL(pi || pi_SFT)
    with r' = (N - 1) log F is best of N itself (Amini et al. 2024, "Variational Best-of-N Alignment"): unlike a
    raw score's, that optimum sits at best of N's KL whatever the score's scale. F counts a tie as
    half and adds half a sample to each side, F = (below + ties / 2 + 1/2) / (M + 1), so log F stays finite."""
    if n < 2 or reward.dim() != 2 or reference.dim() != 2 or reward.shape[0] != reference.shape[0]:
        raise ValueError(f"need n >= 2 and rewards (B, G) against reference rewards (B, M) of the same prompts; got n "
                         f"{n}, {tuple(reward.shape)} and {tuple(reference.shape)}")
    ref, r = reference.unsqueeze(1), reward.unsqueeze(2)  # (B, 1, M), (B, G, 1)
    below = (ref < r).sum(-1).to(torch.float32)
    ties = (ref == r).sum(-1).to(torch.float32)
    return (n - 1) * torch.log((below + 0.5 * ties + 0.5) / (reference.shape[1] + 1))
