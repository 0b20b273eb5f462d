"""Fine-tuning the transformer against a reward: GRPO (its KL penalties, distilled guidance, resume) and best-of-N
distillation (NLL and DPO forms, guided candidates, resume), on a reward whose optimum is known (low codes)."""

import json
import math

import pytest
import torch
from feedback_toys import PROMPTS, LowCodes, make_parts, task_tok

from dalle.checkpoint import load_pretrained
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer
from dalle.train.tasks.bon import BoNObjective, BoNTask
from dalle.train.tasks.grpo import GRPOObjective, GRPOTask


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("feedback"))


def test_grpo_raises_a_known_reward_and_logs_its_kl(parts, tmp_path):
    torch.manual_seed(0)
    model = load_pretrained(parts / "dalle").train()
    prompts = PROMPTS * 4 + [f"a red circle {i}" for i in range(8)]
    task = GRPOTask(model, GRPOObjective(beta=0.01, group_size=4, val_fraction=0.3, eval_prompts=8, eval_samples=3),
                    task_tok(parts), prompts, LowCodes(), task_tok(parts))
    trainer = Trainer(task, TrainConfig(steps=12, batch_size=4, lr=1e-2, lr_schedule="constant", log_every=4,
                                        eval_every=100, save_every=100), tmp_path, progress=False)
    start = trainer.evaluate()
    assert start["val_kl"] == 0.0  # policy == reference
    assert task.reward_model.scored == 8 * 3  # eval_samples images for each of eval_prompts prompts
    end = trainer.fit()
    assert end["val_reward"] > start["val_reward"] + 0.3, (start, end)  # mean code down by more than 2.4
    assert end["val_kl"] > 0
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert {"reward", "kl", "objective"} <= set(logs[-1])


@pytest.mark.parametrize("extra", [{}, {"best_of_n": 4, "reference_samples": 2}], ids=["score", "best_of_n"])
def test_grpo_resume_equals_uninterrupted(parts, tmp_path, extra):
    """Sampling inside the step draws from the engine's per-step seed, so a resumed run samples the same images
    (best_of_n: the reference's too)."""
    def task(seed):
        torch.manual_seed(seed)
        return GRPOTask(load_pretrained(parts / "dalle").train(), GRPOObjective(group_size=2, eval_prompts=2, **extra),
                        task_tok(parts), PROMPTS * 2, LowCodes(), task_tok(parts))
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, log_every=2, eval_every=100, save_every=2)
    full = Trainer(task(0), cfg, tmp_path / "a", progress=False)
    full.fit()
    Trainer(task(0), cfg, tmp_path / "b", progress=False).fit(stop_at=2)
    resumed = Trainer(task(5), cfg, tmp_path / "b", progress=False)
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_grpo_distill_guidance_adds_the_guided_references_kl(parts):
    """distill_guidance: w adds w x KL(guided reference || policy) of the next-token distributions on the step's
    own samples (the reference guided at distill_cond_scale), to the same policy-gradient loss: checked by hand
    from the same draws."""
    from dalle.transformer.sampling import empty_text, sample

    torch.manual_seed(0)
    model = load_pretrained(parts / "dalle").eval()  # no dropout: every forward here sees the same network
    with torch.no_grad():  # as reading_text does: the briefly trained toy barely reads its text
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))

    def task(**extra):
        return GRPOTask(model, GRPOObjective(group_size=2, eval_prompts=2, **extra), task_tok(parts), PROMPTS * 2,
                        LowCodes(), task_tok(parts))

    plain, distilled = task(), task(distill_guidance=2.0, distill_cond_scale=1.5)
    batch = {"prompt": plain.train.rows[:3]}
    torch.manual_seed(3)
    loss, logs = plain.loss(model, batch, 0)
    torch.manual_seed(3)
    loss_d, logs_d = distilled.loss(model, batch, 0)
    torch.manual_seed(3)  # the draws both losses made
    text = plain.text[batch["prompt"].repeat_interleave(2)]
    codes = sample(model, text)
    with torch.no_grad():
        cond, uncond = model(text, codes)[1], model(empty_text(model, len(codes), "cpu"), codes)[1]
        target = torch.log_softmax(uncond + 1.5 * (cond - uncond), dim=-1)
        kl = (target.exp() * (target - torch.log_softmax(cond, dim=-1))).sum(dim=(-1, -2)).mean()
    assert kl > 1e-3  # the reference reads its text, so guidance moves its distribution
    assert "distill_kl" not in logs and logs_d["distill_kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert logs_d["reward"] == logs["reward"]  # the same samples
    torch.testing.assert_close(loss_d.detach(), loss.detach() + 2.0 * kl, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distill_cond_scale > 0 other than 1"):
        GRPOObjective(distill_guidance=1.0, distill_cond_scale=1.0)


def test_grpo_best_of_n_reward_by_hand(parts):
    """best_of_n: N: each sample's reward is (N - 1) log F(score), F from the reference's own draws of its prompt in the
    same step (drawn after the policy's), then the same policy gradient; logs keep the raw score as `reward`, and
    the held-out evaluation reports both. Checked by hand from the same draws."""
    from dalle.feedback.losses import best_of_n_reward
    from dalle.transformer.sampling import sample

    torch.manual_seed(0)
    model = load_pretrained(parts / "dalle").eval()
    task = GRPOTask(model, GRPOObjective(beta=0.0, group_size=2, eval_prompts=2, eval_samples=2, best_of_n=4,
                                         reference_samples=3), task_tok(parts), PROMPTS * 2, LowCodes(),
                    task_tok(parts))
    batch = {"prompt": task.train.rows[:3]}
    torch.manual_seed(3)
    loss, logs = task.loss(model, batch, 0)
    torch.manual_seed(3)
    text = task.text[batch["prompt"].repeat_interleave(2)]
    codes = sample(model, text)
    ref_codes = sample(task.ref, task.text[batch["prompt"].repeat_interleave(3)])
    with torch.no_grad():
        score = LowCodes()(None, codes)
        reference = LowCodes()(None, ref_codes).view(3, 3)
        reward = best_of_n_reward(score.view(3, 2), reference, 4)  # (3, 2)
        logp = torch.log_softmax(model(text, codes)[1], dim=-1).gather(-1, codes[..., None])[..., 0]
        advantage = (reward - reward.flip(1)).flatten()[:, None].expand_as(logp)  # beta 0: the return is the reward
        expect = -(advantage / advantage.std() * logp).mean()
    assert logs["reward"] == pytest.approx(score.mean().item())
    assert logs["bon_reward"] == pytest.approx(reward.mean().item())
    assert logs["reference_reward"] == pytest.approx(reference.mean().item())
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-4, atol=1e-6)
    metrics = task.evaluate(model, 0, None)
    assert metrics["val_kl"] == 0.0 and metrics["val_bon_reward"] < 0  # log F < 0 always
    assert metrics["val_objective"] == pytest.approx(metrics["val_bon_reward"])
    for bad in ({"best_of_n": 1}, {"best_of_n": 4, "reference_samples": 0}):
        with pytest.raises(ValueError, match="best_of_n 0"):
            GRPOObjective(**bad)


def test_grpo_exact_kl_penalty_by_hand(parts):
    """kl_penalty: exact: token t's return is the reward - beta x the exact KL(pi || pi_SFT) over the vocabulary
    at the positions after t, its advantage that minus the other sample's of its prompt (groups of two), scaled by
    the advantages' standard deviation; the loss adds beta / scale x the mean exact KL over positions. Checked by
    hand from the same draws, with the policy moved off the reference so that the KL is not zero."""
    from dalle.transformer.sampling import sample

    torch.manual_seed(0)

    def task(**extra):
        t = GRPOTask(load_pretrained(parts / "dalle").eval(), GRPOObjective(group_size=2, eval_prompts=2, **extra),
                     task_tok(parts), PROMPTS * 2, LowCodes(), task_tok(parts))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in t.model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        return t

    plain, exact = task(beta=0.0), task(beta=0.5, kl_penalty="exact")
    torch.testing.assert_close(plain.model.state_dict(), exact.model.state_dict())
    batch = {"prompt": plain.train.rows[:3]}
    torch.manual_seed(3)
    _, logs = plain.loss(plain.model, batch, 0)
    torch.manual_seed(3)
    loss_e, logs_e = exact.loss(exact.model, batch, 0)
    torch.manual_seed(3)
    rows = batch["prompt"].repeat_interleave(2)
    text = plain.text[rows]
    codes = sample(plain.model, text)
    with torch.no_grad():
        logits = plain.model(text, codes)[1]
        pol, ref = torch.log_softmax(logits, dim=-1), torch.log_softmax(plain.ref(text, codes)[1], dim=-1)
        kl = (pol.exp() * (pol - ref)).sum(-1)  # (6, N)
        logp = pol.gather(-1, codes[..., None])[..., 0]
        after = kl.flip(-1).cumsum(-1).flip(-1) - kl  # the KL of the positions after each token
        returns = (LowCodes()(None, codes)[:, None] - 0.5 * after).view(3, 2, -1)
        advantage = (returns - returns.flip(1)).flatten(0, 1)  # leave-one-out in groups of two
        scale = advantage.std()
        expect = -(advantage / scale * logp).mean() + 0.5 / scale * kl.mean()
    assert kl.sum(-1).mean() > 1e-2 and "kl_exact" not in logs
    assert logs_e["kl_exact"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-4)
    assert logs_e["reward"] == logs["reward"]  # the same samples
    torch.testing.assert_close(loss_e.detach(), expect, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="kl_penalty must be"):
        GRPOObjective(kl_penalty="k3")


def test_grpo_exact_kl_penalty_pulls_the_policy_back_where_the_reward_is_flat(parts, tmp_path):
    """With a reward that no sample changes, the exact penalty's gradient is all there is: training brings a
    policy moved off the reference back toward it."""
    class Flat(LowCodes):
        def forward(self, text, codes):
            return torch.zeros(len(codes))

    torch.manual_seed(0)
    task = GRPOTask(load_pretrained(parts / "dalle").train(),
                    GRPOObjective(beta=0.1, group_size=2, eval_prompts=4, eval_samples=2, kl_penalty="exact"),
                    task_tok(parts), PROMPTS * 2, Flat(), task_tok(parts))
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    trainer = Trainer(task, TrainConfig(steps=10, batch_size=4, lr=3e-3, lr_schedule="constant", log_every=1,
                                        eval_every=100, save_every=100), tmp_path, progress=False)
    trainer.fit()
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"kl_exact"' in x]
    assert logs[-1]["kl_exact"] < 0.5 * logs[0]["kl_exact"], (logs[0], logs[-1])


def bon_task(parts, seed=0, **objective):
    torch.manual_seed(seed)
    return BoNTask(load_pretrained(parts / "dalle").train(), BoNObjective(**objective), task_tok(parts),
                   PROMPTS * 4 + [f"a red circle {i}" for i in range(8)], LowCodes(), task_tok(parts))


def reading_text(task):
    """`task` with its reference perturbed: a briefly trained reference barely reads its text, so guided draws
    would equal unguided ones and a test of guidance could not fail."""
    with torch.no_grad():
        for p in task.ref.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return task


def bon_step_by_hand(task):
    """One step of `task` on 3 prompts of 4 candidates by a policy moved off the reference (so that sampling from
    the wrong one shows), and the same step's candidates sampled by hand: (loss, logs, codes (3, 4, N), their
    rewards (3, 4), the prompts' text)."""
    from dalle.transformer.sampling import sample

    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {"prompt": torch.tensor(task.train.rows[:3].tolist())}
    torch.manual_seed(7)
    loss, logs = task.loss(task.model, batch, 0)
    torch.manual_seed(7)
    rows = batch["prompt"].repeat_interleave(4)
    with torch.inference_mode():
        codes = sample(task.ref, task.text[rows], cond_scale=task.objective.cond_scale).clone()
    return loss, logs, codes.view(3, 4, -1), LowCodes()(None, codes).view(3, 4), task.text[batch["prompt"]]


def test_bon_loss_is_the_nll_of_the_best_candidate(parts):
    """The step's target is, per prompt, the candidate of the reference with the highest reward; the loss is the
    policy's mean negative log-likelihood of its image tokens."""
    from dalle.transformer.sampling import token_logprobs

    task = bon_task(parts, n=4, val_fraction=0.3)
    loss, logs, codes, scores, text = bon_step_by_hand(task)
    best = codes[torch.arange(3), scores.argmax(-1)]
    expect = -token_logprobs(task.model(text, best)[1], best).mean()
    torch.testing.assert_close(loss, expect)
    assert logs["reward_best"] == pytest.approx(scores.max(-1).values.mean().item())
    assert logs["reward"] == pytest.approx(scores.mean().item())


def test_bon_guided_candidates_are_sampled_at_the_cond_scale(parts):
    """cond_scale: 3 draws the step's candidates with classifier-free guidance, and the target is the best of
    those, not the best of the unguided draws of the same seed."""
    from dalle.transformer.sampling import sample, token_logprobs

    task = reading_text(bon_task(parts, n=4, val_fraction=0.3, cond_scale=3.0))
    loss, logs, codes, scores, text = bon_step_by_hand(task)

    def nll_of_best(candidates):
        best = candidates[torch.arange(3), LowCodes()(None, candidates.flatten(0, 1)).view(3, 4).argmax(-1)]
        return -token_logprobs(task.model(text, best)[1], best).mean()

    torch.testing.assert_close(loss, nll_of_best(codes))
    torch.manual_seed(7)
    with torch.inference_mode():
        unguided = sample(task.ref, text.repeat_interleave(4, dim=0)).clone().view(3, 4, -1)
    assert (loss - nll_of_best(unguided)).abs() > 1e-3
    with pytest.raises(ValueError, match="cond_scale must be >= 0"):
        BoNObjective(cond_scale=-1.0)


def step_by_hand(task, scales):
    """One DPO step of `task` on 3 prompts of 4 candidates, and the same step's draws by hand: 4 a prompt from
    the reference at each cond scale of `scales` in turn, from the RNG the step started with. Returns (loss, logs,
    the prompts' text, [draws (3, 4, N) per scale], pick) with pick(codes, worst) each prompt's best (or worst)
    of `codes` by the reward."""
    from dalle.transformer.sampling import sample

    batch = {"prompt": torch.tensor(task.train.rows[:3].tolist())}
    torch.manual_seed(7)
    loss, logs = task.loss(task.model.eval(), batch, 0)
    torch.manual_seed(7)
    text = task.text[batch["prompt"]]
    with torch.inference_mode():
        draws = [sample(task.ref, text.repeat_interleave(4, dim=0), cond_scale=s).clone().view(3, 4, -1)
                 for s in scales]

    def pick(codes, worst=False):
        scores = LowCodes()(None, codes.flatten(0, 1)).view(3, 4)
        return codes[torch.arange(3), scores.argmin(-1) if worst else scores.argmax(-1)]

    return loss, logs, text, draws, pick


def guided_step_by_hand(task):
    """step_by_hand for a step at cond_scale 3 that draws n more unguided: (loss, logs, text, guided, unguided,
    pick)."""
    loss, logs, text, (guided, unguided), pick = step_by_hand(task, (3.0, 1.0))
    assert logs["reward_unguided"] == pytest.approx(LowCodes()(None, unguided.flatten(0, 1)).mean().item())
    return loss, logs, text, guided, unguided, pick


def dpo_by_hand(task, text, chosen, rejected, beta):
    from dalle.feedback.losses import dpo_loss
    from dalle.transformer.sampling import token_logprobs

    text = text.repeat(len(chosen) // len(text), 1)

    def logp(net, c):
        return token_logprobs(net(text, c)[1], c).sum(-1)

    with torch.no_grad():
        return dpo_loss(logp(task.model, chosen), logp(task.model, rejected), logp(task.ref, chosen),
                        logp(task.ref, rejected), beta)


def test_bon_dpo_rejects_the_worst_unguided_draw(parts):
    """rejected: unguided sets the best of the guided candidates against the worst of n more drawn without
    guidance (after the guided ones, from the same RNG), both scored against the frozen reference."""
    task = reading_text(bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5, cond_scale=3.0,
                                 rejected="unguided"))
    loss, logs, text, guided, unguided, pick = guided_step_by_hand(task)
    expect = dpo_by_hand(task, text, pick(guided), pick(unguided, worst=True), 0.5)
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="other than 'same' only with loss: dpo"):
        BoNObjective(rejected="unguided")


def test_bon_dpo_unguided_pairs_add_the_best_and_worst_unguided_draws(parts):
    """unguided_pairs: 1 adds, beside each prompt's guided best against its guided worst, the best against the
    worst of n more drawn without guidance (after the guided ones, from the same RNG): DPO over both pairs."""
    task = reading_text(bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5, cond_scale=3.0,
                                 unguided_pairs=1))
    loss, logs, text, guided, unguided, pick = guided_step_by_hand(task)
    chosen = torch.cat([pick(guided), pick(unguided)])
    rejected = torch.cat([pick(guided, worst=True), pick(unguided, worst=True)])
    torch.testing.assert_close(loss.detach(), dpo_by_hand(task, text, chosen, rejected, 0.5), rtol=1e-4, atol=1e-5)
    guided_only = dpo_by_hand(task, text, chosen[:3], rejected[:3], 0.5)
    assert (loss.detach() - guided_only).abs() > 1e-4  # the unguided pair counts
    with pytest.raises(ValueError, match="unguided_pairs needs cond_scale != 1"):
        BoNObjective(n=4, loss="dpo", unguided_pairs=1)
    with pytest.raises(ValueError, match="above 0 only with loss: dpo and rejected: same"):
        BoNObjective(n=4, loss="dpo", cond_scale=3.0, unguided_pairs=1, rejected="unguided")


def test_bon_dpo_uncond_kl_adds_the_caption_free_branchs_kl(parts):
    """uncond_kl: w adds w x KL(reference || policy) of the caption-free next-token distributions on the pair's
    images to DPO's loss (the same draws, so the difference is exactly that term); it is 0 at the start."""
    plain = bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5)
    anchored = bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5, uncond_kl=2.0)
    batch = {"prompt": torch.tensor(anchored.train.rows[:3].tolist())}
    torch.manual_seed(7)
    assert anchored.loss(anchored.model.eval(), batch, 0)[1]["uncond_kl"] == pytest.approx(0.0, abs=1e-5)
    for task in (plain, anchored):
        torch.manual_seed(3)
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(7)
    base, _ = plain.loss(plain.model.eval(), batch, 0)
    torch.manual_seed(7)
    loss, logs = anchored.loss(anchored.model.eval(), batch, 0)
    assert logs["uncond_kl"] > 0
    torch.testing.assert_close(loss.detach(), base.detach() + 2.0 * logs["uncond_kl"], rtol=1e-4, atol=1e-5)
    base.backward()  # the same weights: the gradients differ by the term's, so it trains the policy
    loss.backward()
    assert not torch.allclose(plain.model.image_head.weight.grad, anchored.model.image_head.weight.grad)
    with pytest.raises(ValueError, match="above 0 only with loss: dpo"):
        BoNObjective(uncond_kl=1.0)


def test_bon_dpo_distill_guidance_adds_the_guided_references_kl(parts):
    """distill_guidance: w adds w x KL(guided reference || policy) of the captioned next-token distributions on
    the pair's images, the reference guided at distill_cond_scale (exact over the vocabulary, summed over image
    positions, averaged over the pair images): computed here by hand from the same draws."""
    from dalle.transformer.sampling import empty_text

    task = reading_text(bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5, distill_guidance=2.0,
                                 distill_cond_scale=1.5))
    with torch.no_grad():  # a policy apart from its reference, so the DPO term is not log 2 and its gradient not 0
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, logs, text, (codes,), pick = step_by_hand(task, (1.0,))
    chosen, rejected = pick(codes), pick(codes, worst=True)
    both, text2 = torch.cat([chosen, rejected]), text.repeat(2, 1)
    with torch.no_grad():
        cond, uncond = task.ref(text2, both)[1], task.ref(empty_text(task.ref, 6, "cpu"), both)[1]
        target = torch.log_softmax(uncond + 1.5 * (cond - uncond), dim=-1)
        policy = torch.log_softmax(task.model(text2, both)[1], dim=-1)
        kl = (target.exp() * (target - policy)).sum(dim=(-1, -2)).mean()
    assert kl > 1e-3  # the reference reads its text, so guidance moves its distribution
    assert logs["distill_kl"] == pytest.approx(kl.item(), rel=1e-4)
    expect = dpo_by_hand(task, text, chosen, rejected, 0.5) + 2.0 * kl
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-4, atol=1e-5)
    anchored = reading_text(bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5, distill_guidance=2.0,
                                     distill_cond_scale=1.5, uncond_kl=1.0))
    with torch.no_grad():  # the same weights as `task` (bon_task reseeds), with the caption-free term as well
        for p in anchored.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(7)
    _, logs2 = anchored.loss(anchored.model.eval(), {"prompt": torch.tensor(anchored.train.rows[:3].tolist())}, 0)
    assert logs2["distill_kl"] == pytest.approx(logs["distill_kl"], rel=1e-5)  # each term reads its own logits
    assert logs2["uncond_kl"] > 0
    with pytest.raises(ValueError, match="above 0 only with loss: dpo"):
        BoNObjective(distill_guidance=1.0)
    with pytest.raises(ValueError, match="distill_cond_scale > 0 other than 1"):
        BoNObjective(loss="dpo", distill_guidance=1.0, distill_cond_scale=1.0)


def test_bon_dpo_loss_prefers_the_best_candidate_over_the_worst(parts):
    """loss: dpo is DPO with the highest-reward candidate of each prompt chosen and the lowest rejected, both
    scored against the frozen reference; the pick is checked against sampling by hand."""
    from dalle.feedback.losses import dpo_loss
    from dalle.transformer.sampling import token_logprobs

    task = bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5)
    model = task.model.eval()  # no dropout, so the forward by hand sees the same network
    loss, logs, codes, scores, text = bon_step_by_hand(task)
    best, worst = codes[torch.arange(3), scores.argmax(-1)], codes[torch.arange(3), scores.argmin(-1)]

    def logp(net, c):
        return token_logprobs(net(text, c)[1], c).sum(-1)

    with torch.no_grad():
        expect = dpo_loss(logp(model, best), logp(model, worst), logp(task.ref, best), logp(task.ref, worst), 0.5)
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-4, atol=1e-5)
    assert loss.requires_grad
    assert logs["reward_best"] == pytest.approx(scores.max(-1).values.mean().item())


def test_bon_dpo_pairs_take_the_k_best_against_the_k_worst(parts):
    """dpo_pairs: 2 is DPO over two pairs a prompt, the best against the worst and the second best against the
    second worst, averaged over all six pairs."""
    from dalle.feedback.losses import dpo_loss
    from dalle.transformer.sampling import token_logprobs

    task = bon_task(parts, n=4, val_fraction=0.3, loss="dpo", dpo_beta=0.5, dpo_pairs=2)
    model = task.model.eval()
    loss, logs, codes, scores, text = bon_step_by_hand(task)
    order = scores.argsort(-1, descending=True)
    rows = torch.arange(3)
    chosen = torch.cat([codes[rows, order[:, 0]], codes[rows, order[:, 1]]])
    rejected = torch.cat([codes[rows, order[:, 3]], codes[rows, order[:, 2]]])
    text2 = torch.cat([text, text])

    def logp(net, c):
        return token_logprobs(net(text2, c)[1], c).sum(-1)

    with torch.no_grad():
        expect = dpo_loss(logp(model, chosen), logp(model, rejected), logp(task.ref, chosen),
                          logp(task.ref, rejected), 0.5)
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="dpo_pairs must be in \\[1, n // 2 = 2\\]"):
        BoNObjective(n=4, loss="dpo", dpo_pairs=3)


def test_bon_dpo_starts_at_log_2_and_raises_a_known_reward(parts, tmp_path):
    task = bon_task(parts, n=8, val_fraction=0.3, eval_prompts=8, eval_samples=3, loss="dpo", dpo_beta=0.1)
    batch = {"prompt": torch.tensor(task.train.rows[:2].tolist())}
    with torch.no_grad():
        assert task.loss(task.model.eval(), batch, 0)[0].item() == pytest.approx(math.log(2), abs=1e-4)
    task.model.train()
    trainer = Trainer(task, TrainConfig(steps=12, batch_size=4, lr=1e-2, lr_schedule="constant", log_every=4,
                                        eval_every=100, save_every=100), tmp_path, progress=False)
    start = trainer.evaluate()
    end = trainer.fit()
    assert end["val_reward"] > start["val_reward"] + 0.3, (start, end)
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert logs[-1]["accuracy"] > 0.5 and logs[-1]["margin"] > 0


@pytest.mark.parametrize("source", ["reference", "policy"])
def test_bon_raises_a_known_reward(parts, tmp_path, source):
    task = bon_task(parts, n=8, source=source, val_fraction=0.3, eval_prompts=8, eval_samples=3)
    trainer = Trainer(task, TrainConfig(steps=12, batch_size=4, lr=1e-2, lr_schedule="constant", log_every=4,
                                        eval_every=100, save_every=100), tmp_path, progress=False)
    start = trainer.evaluate()
    assert start["val_kl"] == 0.0
    end = trainer.fit()
    assert end["val_reward"] > start["val_reward"] + 0.3, (start, end)
    assert end["val_kl"] > 0
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert logs[-1]["reward_best"] > logs[-1]["reward"]


def test_bon_resume_equals_uninterrupted(parts, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, log_every=2, eval_every=100, save_every=2)
    full = Trainer(bon_task(parts, n=2, source="policy", eval_prompts=2), cfg, tmp_path / "a", progress=False)
    full.fit()
    Trainer(bon_task(parts, n=2, source="policy", eval_prompts=2), cfg, tmp_path / "b", progress=False).fit(stop_at=2)
    resumed = Trainer(bon_task(parts, seed=5, n=2, source="policy", eval_prompts=2), cfg, tmp_path / "b",
                      progress=False)
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
