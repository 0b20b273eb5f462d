"""Reinforcement learning of the transformer against a reward model, for the shared engine (Stiennon et al. 2020,
sec. 3.4 "Human feedback policies"; the group baseline of GRPO, Shao et al. 2024).

Each step samples `group_size` images per prompt from the policy itself (inside the step, from the engine's
per-step seed, so a resumed run draws the same images), scores them with the frozen reward model, and shapes
the paper's per-token reward R_t = -beta * log(pi / pi_SFT) at every image token, plus the reward model's
score at the image's last token. The return of token t is the sum of R from t to the end; its advantage is
that return minus the mean return of the other samples of the same prompt at the same token (a leave-one-out
group baseline instead of a value network), scaled by the batch's standard deviation. The loss is the policy
gradient -A_t * log pi(token t). There is one gradient step per sampled batch, so PPO's probability ratio is
1 and its clipping would never act: it is left out. With `distill_guidance` the loss also pulls the plain
sample toward the reference's mildly guided one (an exact KL over the vocabulary on the step's samples).
With `kl_penalty: exact` each sampled token's log-ratio is replaced by its expectation, the exact KL(pi || pi_SFT)
over the vocabulary at its position: token t's return carries -beta x the exact KL of the positions after it,
and beta x the exact KL at each position enters the loss directly. That is the gradient of the same objective
with less noise (the direct term reaches every code of the distribution, not only the one drawn).
With `best_of_n: N` the reward model's score r becomes (N - 1) log F(r), F the reference's distribution of r on
the same prompt, estimated from its own samples drawn in the same step: at beta 1 the objective's optimum is then
the reward model's best of N (Amini et al. 2024), whatever the reward model's scale.
Evaluation samples one image per held-out prompt (fixed seed) and reports the reward, the KL(pi || pi_SFT)
estimate and the KL-penalised objective reward - beta * KL.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from dalle.feedback.losses import best_of_n_reward, distribution_kl, kl_shaped_rewards, position_kl
from dalle.tokenizer import TextTokenizer
from dalle.train.engine import matrix_decay_groups
from dalle.transformer.model import DALLE
from dalle.transformer.sampling import empty_text, token_logprobs

if TYPE_CHECKING:
    from dalle.train.engine import EvalSink
    from dvae.model import DiscreteVAE


@dataclass(frozen=True)
class GRPOObjective:
    beta: float = 0.05  # the per-token KL penalty's weight
    group_size: int = 4  # samples per prompt in a step; each is judged against the others of its prompt
    val_fraction: float = 0.2  # share of the store's prompts held out for evaluation
    split_seed: int = 0
    eval_prompts: int = 32  # held-out prompts sampled at each evaluation
    # Images per held-out prompt: one image's reward is noisy enough that checkpoints/best, which follows the
    # held-out objective, would pick among checkpoints by chance.
    eval_samples: int = 1
    eval_seed: int = 0
    # Weight of KL(guided reference || policy) of the next-token distributions on the step's samples, added to
    # the loss: the reference's classifier-free guidance at `distill_cond_scale` distilled into the plain sample,
    # as best-of-N distillation's option of the same name does beside DPO (docs/feedback.md)
    distill_guidance: float = 0.0
    distill_cond_scale: float = 1.3
    # "sampled": the paper's penalty, -beta * log(pi / pi_SFT) of each sampled token in the returns; "exact": the
    # exact per-position KL over the vocabulary in its place, later positions' in the returns and each position's
    # own in the loss (the module's docstring)
    kl_penalty: str = "sampled"
    # N >= 2: the reward model's score r is replaced by (N - 1) log F(r), F the KL reference's distribution of r on
    # the same prompt, estimated in each step from `reference_samples` of its images a prompt. At beta 1 the
    # optimum is then the reward model's best of N (losses.best_of_n_reward); a lower beta goes past it. 0: r as is
    best_of_n: int = 0
    reference_samples: int = 8

    def __post_init__(self) -> None:
        evals = min(self.eval_prompts, self.eval_samples)
        if self.beta < 0 or self.group_size < 2 or not 0 < self.val_fraction < 1 or evals < 1:
            raise ValueError(f"need beta >= 0, group_size >= 2 (a group baseline), val_fraction in (0, 1), "
                             f"eval_prompts >= 1 and eval_samples >= 1; got {self.beta}, {self.group_size}, "
                             f"{self.val_fraction}, {self.eval_prompts}, {self.eval_samples}")
        if self.distill_guidance < 0 or (self.distill_guidance > 0 and (
                self.distill_cond_scale <= 0 or self.distill_cond_scale == 1)):
            raise ValueError(f"need distill_guidance >= 0 and, above 0, a distill_cond_scale > 0 other than 1; got "
                             f"{self.distill_guidance}, {self.distill_cond_scale}")
        if self.best_of_n == 1 or self.best_of_n < 0 or self.reference_samples < 1:
            raise ValueError(f"need best_of_n 0 (off) or >= 2, and reference_samples >= 1; got {self.best_of_n}, "
                             f"{self.reference_samples}")
        if self.kl_penalty not in ("sampled", "exact"):
            raise ValueError(f"kl_penalty must be 'sampled' or 'exact', got {self.kl_penalty!r}")


@dataclass(frozen=True)
class GRPOInputs:
    store: str = ""  # the comparisons store: its prompts are what the policy is trained on
    # a file with one prompt per line, trained on instead of the store's prompts where set: sampling against a
    # reward model needs prompts only (tools/make_shapes.py --captions writes the shapes split's)
    prompts: str = ""
    init: str = ""  # the supervised transformer: the policy's start and the KL reference
    # the reward model (tools/train_feedback.py reward), frozen; "gold:shapes": the shapes detector's verdict
    # instead (raters.ShapesGoldReward), an experiment's upper bound, not learning from feedback
    reward: str = ""


class PromptRows(Dataset):
    def __init__(self, rows: list[int]) -> None:
        self.rows = torch.tensor(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"prompt": self.rows[i]}


def split_prompts(prompts: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (training, held-out) prompts, by a hash of the text so the split never moves."""
    out: tuple[list[int], list[int]] = ([], [])
    for i, p in enumerate(prompts):
        out[zlib.crc32(f"{seed}/{p}".encode()) % 10_000 < fraction * 10_000].append(i)
    return out


def guidance_distillation(ref: DALLE, codes: Tensor, logits: Tensor, ref_logits: Tensor, cond_scale: float,
                          ref_uncond: Tensor | None = None) -> Tensor:
    """Mean over images and positions of KL(ref guided at cond_scale || policy), exact over the vocabulary: the
    reference's classifier-free guidance distilled into the policy's captioned logits (B, N, V) on the images
    `codes` (B, N). ref_logits: the reference's captioned logits on them; ref_uncond: its caption-free ones,
    computed here unless given."""
    if ref_uncond is None:
        with torch.no_grad():
            ref_uncond = ref(empty_text(ref, len(codes), codes.device), codes)[1]
    guided = torch.lerp(ref_uncond.float(), ref_logits.float(), cond_scale)
    return distribution_kl(guided, logits).mean()


class RewardSampling:
    """What GRPO and best-of-N distillation share: the store's prompts split by a hash, a frozen copy of the
    starting transformer (the KL reference), a frozen reward model, sampling inside the step, and the held-out
    evaluation (reward, KL from the start, reward - beta * KL, which checkpoints/best follows)."""

    best_metric = ("val_objective", "max")  # held-out reward - beta * KL

    def __init__(self, model: DALLE, objective: Any, tokenizer: TextTokenizer, prompts: list[str],
                 reward_model: nn.Module | Callable[[list[str], Tensor], Tensor],
                 reward_tokenizer: TextTokenizer | None, dvae: DiscreteVAE | None = None, dvae_path: str = "") -> None:
        """reward_model: a RewardModel and its tokenizer, or a callable gold reward of (captions, decoded images)
        (`raters.ShapesGoldReward`) and None."""
        self.model, self.objective, self.tokenizer, self.dvae = model, objective, tokenizer, dvae
        self.dvae_path, self.prompts = dvae_path, prompts
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.gold = not isinstance(reward_model, nn.Module)
        self.reward_model = reward_model if self.gold else reward_model.eval().requires_grad_(False)
        self.pixels = self.gold or reward_model.config.reads_pixels
        if self.pixels and dvae is None:
            raise ValueError("the reward reads pixels: the policy's dVAE is needed to decode its samples")
        train, val = split_prompts(prompts, objective.val_fraction, objective.split_seed)
        if not train or not val:
            raise ValueError(f"{len(prompts)} prompts give {len(train)} for training and {len(val)} held out: add "
                             "prompts to the store, or change val_fraction")
        self.text = tokenizer.encode_batch(prompts, model.config.text_seq_len, truncate_warn=False)[0]
        self.reward_text = None if self.gold else reward_tokenizer.encode_batch(
            prompts, reward_model.config.text_seq_len, truncate_warn=False)[0]
        self.train, self.val = PromptRows(train), val[: objective.eval_prompts]

    def train_dataset(self) -> Dataset:
        return self.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return matrix_decay_groups(model)

    @torch.no_grad()
    def rewards(self, rows: Tensor, codes: Tensor) -> Tensor:  # prompt rows (B,), codes (B, N) -> (B,)
        device = codes.device
        image = codes
        if self.pixels:
            g = self.ref.config.image_grid_size
            image = self.dvae.to(device).decode(codes.view(-1, g, g)).float()
            if self.gold:
                return self.reward_model([self.prompts[r] for r in rows.tolist()], image.clamp(0, 1)).to(device)
            s = self.reward_model.config.reranker.image_size
            if image.shape[-1] != s:
                image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            image = image.clamp(0, 1)
        return self.reward_model.to(device)(self.reward_text[rows].to(device), image).float()

    def _sample(self, model: nn.Module, text: Tensor, generator: torch.Generator | None = None,
                cond_scale: float = 1.0) -> Tensor:
        from dalle.transformer.sampling import sample

        policy = getattr(model, "module", model)
        was = policy.training
        policy.eval()  # no dropout while sampling: the samples are the policy's own distribution
        codes = sample(policy, text, generator=generator, cond_scale=cond_scale)
        policy.train(was)
        return codes.clone()  # out of inference mode, so it can feed a forward with gradients

    @torch.no_grad()
    def held_out(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """Rewards and KL estimates (P * eval_samples,) of the model's samples of the held-out prompts, grouped by
        prompt, from a fixed seed."""
        o, device = self.objective, next(model.parameters()).device
        rows = torch.tensor(self.val).repeat_interleave(o.eval_samples)
        text = self.text[rows].to(device)
        codes = self._sample(model, text, torch.Generator(device=device).manual_seed(o.eval_seed))
        kl = (token_logprobs(model(text, codes)[1], codes)
              - token_logprobs(self.ref.to(device)(text, codes)[1], codes)).sum(-1)
        return self.rewards(rows, codes), kl

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        reward, kl = self.held_out(model)
        return {"val_reward": reward.mean().item(), "val_kl": kl.mean().item(),
                "val_objective": (reward - self.objective.beta * kl).mean().item()}

    def save_extra(self, directory: Any) -> None:
        """The fine-tuned transformer loads as any other: its tokenizer, and the dVAE that decodes its codes."""
        self.tokenizer.save(directory / "tokenizer.json")
        if self.dvae_path:
            (directory / "dvae.json").write_text(json.dumps({"path": self.dvae_path}) + "\n")


class GRPOTask(RewardSampling):
    def __init__(self, model: DALLE, objective: GRPOObjective, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, objective, *args, **kwargs)
        self.tokens_per_sample = objective.group_size * model.config.seq_len
        self._val_reference: Tensor | None = None

    @torch.no_grad()
    def reference_rewards(self, prompts: Tensor, device: torch.device,
                          generator: torch.Generator | None = None) -> Tensor:
        """Rewards (B, reference_samples) of the KL reference's own samples of the prompt rows (B,): best_of_n's
        estimate of the reward's distribution under the supervised model."""
        m = self.objective.reference_samples
        rows = prompts.repeat_interleave(m)
        codes = self._sample(self.ref.to(device), self.text[rows].to(device), generator)
        return self.rewards(rows, codes).view(-1, m)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        o = self.objective
        if not o.best_of_n:
            return super().evaluate(model, step, sink)
        score, kl = self.held_out(model)
        if self._val_reference is None:  # the reference is frozen and its seed fixed: drawn once a run
            device = next(model.parameters()).device
            self._val_reference = self.reference_rewards(
                torch.tensor(self.val), device, torch.Generator(device=device).manual_seed(o.eval_seed + 1))
        reward = best_of_n_reward(score.view(-1, o.eval_samples), self._val_reference, o.best_of_n).flatten()
        return {"val_reward": score.mean().item(), "val_kl": kl.mean().item(), "val_bon_reward": reward.mean().item(),
                "val_objective": (reward - o.beta * kl).mean().item()}

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        o, device = self.objective, next(model.parameters()).device
        rows = batch["prompt"].repeat_interleave(o.group_size)  # (B * G,)
        text = self.text[rows].to(device)
        codes = self._sample(model, text)  # the engine seeded the global RNG for this step
        score = reward = self.rewards(rows, codes)  # (BG,)
        if o.best_of_n:
            reference = self.reference_rewards(batch["prompt"], device)
            reward = best_of_n_reward(score.view(-1, o.group_size), reference, o.best_of_n).flatten()
        logits = model(text, codes)[1]
        logp = token_logprobs(logits, codes)  # (BG, N)
        with torch.no_grad():
            ref_logits = self.ref.to(device)(text, codes)[1]
            logp_ref = token_logprobs(ref_logits, codes)
        exact = o.kl_penalty == "exact"
        shaped = kl_shaped_rewards(reward, logp.detach(), logp_ref, 0.0 if exact else o.beta)  # (BG, N)
        if exact:
            kl_pos = position_kl(logits, ref_logits)  # (BG, N)
            # token t's return carries the exact KL of the positions after it (what choosing it leads to); its own
            # position's KL enters the loss below, differentiated directly
            shaped[:, :-1] -= o.beta * kl_pos.detach()[:, 1:]
        returns = shaped.flip(-1).cumsum(-1).flip(-1).view(-1, o.group_size, shaped.shape[-1])  # (B, G, N)
        others = (returns.sum(1, keepdim=True) - returns) / (o.group_size - 1)  # leave-one-out group baseline
        advantage = (returns - others).flatten(0, 1)
        scale = advantage.std() + 1e-8
        loss = -(advantage / scale * logp).mean()
        kl = (logp.detach() - logp_ref).sum(-1)  # (BG,) per-sample KL estimate
        logs = {"reward": score.mean().item(), "kl": kl.mean().item(), "kl_max": kl.max().item(),
                "objective": (reward - o.beta * kl).mean().item()}
        if o.best_of_n:
            logs |= {"bon_reward": reward.mean().item(), "reference_reward": reference.mean().item()}
        if exact:
            # divided by the advantage's scale as the sampled penalty is, and averaged over tokens as the policy
            # gradient is, so beta weighs reward against nats as there
            loss = loss + o.beta / scale.clamp_min(1e-3) * kl_pos.mean()
            logs["kl_exact"] = kl_pos.sum(-1).mean().item()
        if o.distill_guidance > 0:
            distill = guidance_distillation(self.ref, codes, logits, ref_logits, o.distill_cond_scale)
            loss = loss + o.distill_guidance * distill
            logs["distill_kl"] = distill.item()
        return loss, logs
