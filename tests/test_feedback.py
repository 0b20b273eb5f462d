"""The feedback package's foundations: the comparisons store, the simulated rater, and the losses."""

import json
import math
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import torch

from dalle.data.shapes import render
from dalle.evaluation.compositional import shapes_prompts
from dalle.feedback.losses import (
    best_of_n_kl,
    best_of_n_reward,
    bradley_terry_loss,
    distribution_kl,
    dpo_loss,
    kl_shaped_rewards,
    sequence_kl,
)
from dalle.feedback.raters import SimulatedRater
from dalle.feedback.store import Store, export_jsonl, import_jsonl
from dalle.transformer.sampling import token_logprobs


def _filled(path, n_pairs=3):
    store = Store(path)
    pid = store.prompt("a red circle", "train")
    samples = [store.add_sample(pid, "m@1", seed, {"cond_scale": 3.0}, [seed, 1, 2], f"png{seed}".encode())
               for seed in range(2 * n_pairs)]
    pairs = [store.add_pair(samples[2 * i], samples[2 * i + 1], gold="a" if i == 0 else None) for i in range(n_pairs)]
    return store, samples, pairs


def test_store_records_undoes_and_reads_judgements_winner_first(tmp_path):
    store, samples, pairs = _filled(tmp_path / "c.db")
    store.record(pairs[0], left_id=samples[1], choice="right", rater="ann")  # b shown left, a chosen
    store.record(pairs[1], left_id=samples[2], choice="tie", rater="ann")
    store.record(pairs[2], left_id=samples[4], choice="skip", rater="ann")
    j = store.judgements()
    assert [(x.winner_id, x.loser_id, x.tie) for x in j] == [(samples[0], samples[1], False),
                                                            (samples[2], samples[3], True)]
    assert store.next_pair("ann") is None and store.next_pair("bob") == pairs[0]
    assert store.undo("ann") == pairs[2] and store.next_pair("ann") == pairs[2]
    assert store.undo("nobody") is None
    with pytest.raises(ValueError, match="choice"):
        store.record(pairs[0], samples[0], "both", "ann")
    with pytest.raises(ValueError, match="does not hold"):
        store.record(pairs[0], samples[5], "left", "ann")
    other = store.add_sample(store.prompt("a blue square"), "m@1", 0, {}, [0], b"x")
    with pytest.raises(ValueError, match="share one prompt"):
        store.add_pair(samples[0], other)


def test_rater_stats_count_gold_and_agreement(tmp_path):
    store, samples, pairs = _filled(tmp_path / "c.db")
    store.record(pairs[0], samples[0], "left", "ann")  # a: the gold answer
    store.record(pairs[0], samples[0], "right", "bob")  # b: wrong, and disagrees with ann
    store.record(pairs[1], samples[2], "left", "ann")
    store.record(pairs[1], samples[3], "right", "bob")  # a again, as shown the other way round: agrees
    stats = store.rater_stats()
    assert stats["ann"]["gold_accuracy"] == 1.0 and stats["bob"]["gold_accuracy"] == 0.0
    assert stats["ann"]["agreement"] == 0.5 and stats["ann"]["shared_judgements"] == 2
    assert stats["bob"]["comparisons"] == 2


def _write_forever(path, ready):
    store = Store(path)
    pid = store.prompt("p")
    ready.set()
    i = 0
    while True:  # killed from outside, mid-transaction at some point
        with store.transaction() as db:
            for _ in range(50):
                db.execute("INSERT INTO samples (prompt_id, model_id, seed, settings, codes, png, created) "
                           "VALUES (?, 'm', ?, '{}', x'00', zeroblob(20000), 0)", (pid, i))
                i += 1


def test_store_survives_a_kill_mid_write(tmp_path):
    path = tmp_path / "c.db"
    ready = mp.get_context("fork").Event()
    proc = mp.get_context("fork").Process(target=_write_forever, args=(path, ready))
    proc.start()
    assert ready.wait(30)
    import time

    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = Store(path)  # opens, recovers from the WAL, and holds only whole transactions
    n = store.counts()["samples"]
    assert n > 0 and n % 50 == 0
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_jsonl_round_trip(tmp_path):
    store, samples, pairs = _filled(tmp_path / "a.db")
    store.record(pairs[0], samples[1], "left", "ann")
    store.record(pairs[1], samples[2], "tie", "bob")
    assert export_jsonl(store, tmp_path / "c.jsonl") == 2
    other = Store(tmp_path / "b.db")
    assert import_jsonl(other, tmp_path / "c.jsonl", render=lambda codes: json.dumps(codes).encode()) == 2
    assert [(j.tie, j.rater) for j in other.judgements()] == [(False, "ann"), (True, "bob")]
    first = other.judgements()[0]
    assert other.codes(first.winner_id) == [1, 1, 2]  # sample 1 (seed 1) was chosen on the left
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a comparison"):
        import_jsonl(other, tmp_path / "bad.jsonl", render=lambda c: b"")
    assert other.counts()["comparisons"] == 2  # nothing of the bad file kept


def test_simulated_rater_prefers_the_correct_image_and_flips_at_its_noise_rate(monkeypatch):
    from dalle.feedback import raters

    prompts = shapes_prompts("train", 24)
    right = [np.asarray(render(p.sample.scene)) for p in prompts]
    wrong = [right[(i + 1) % len(right)] for i in range(len(right))]  # another scene's image
    clean = SimulatedRater()
    choices = [clean.choose(p, a, b) for p, a, b in zip(prompts, right, wrong)]
    assert choices.count("left") >= 21  # the detector reads renders right; another scene rarely fits
    assert clean.choose(prompts[0], wrong[0], right[0]) == "right"
    assert clean.choose(prompts[0], right[0], right[0]) == "tie"
    seen = {}

    def once(p, im):  # the same images again: detect each once
        key = (p.caption, im.tobytes())
        if key not in seen:
            seen[key] = raters.detect_correctness(p, im)
        return seen[key]
    monkeypatch.setattr(raters, "correctness", once)
    noisy = SimulatedRater(noise=0.25, seed=1)
    flips = [noisy.choose(p, a, b) != c for p, a, b, c in zip(prompts * 10, right * 10, wrong * 10, choices * 10)
             if c != "tie"]
    assert 0.15 < sum(flips) / len(flips) < 0.35
    with pytest.raises(ValueError, match="noise"):
        SimulatedRater(noise=0.7)


def test_gold_reward_scores_the_detectors_verdict():
    from dalle.feedback.raters import ShapesGoldReward, detect_correctness

    prompts = shapes_prompts("train", 8) + shapes_prompts("zeroshot", 2)
    captions = [p.caption for p in prompts]
    right = torch.stack([torch.from_numpy(np.array(render(p.sample.scene))).permute(2, 0, 1).float() / 255
                         for p in prompts])
    wrong = right.roll(1, 0)  # another scene's image
    gold = ShapesGoldReward(captions)  # both splits' captions are found
    got_right, got_wrong = gold(captions, right), gold(captions, wrong)
    for p, r, w, im_r, im_w in zip(prompts, got_right, got_wrong, right, wrong):
        for got, image in ((r, im_r), (w, im_w)):
            correct, checks, _ = detect_correctness(p, image)
            assert got.item() == pytest.approx(correct + 0.1 * checks)
    assert (got_right >= 1).sum() >= 8 and (got_right > got_wrong).sum() >= 8
    with pytest.raises(ValueError, match="'a plaid dodecahedron' is not one of shapes train, zeroshot"):
        ShapesGoldReward([captions[0], "a plaid dodecahedron"])


def test_bradley_terry_loss_and_ties():
    r1, r2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    loss = bradley_terry_loss(r1, r2, torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2)
    # A tie is half a win each: its loss is least when the rewards are equal, and symmetric.
    tie = torch.tensor([0.5])
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]), tie) < bradley_terry_loss(
        torch.tensor([1.0]), torch.tensor([0.0]), tie)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), tie).item() == pytest.approx(
        bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1.0]), tie).item())
    # Trained on its judgements, a reward learns the preferred side.
    r = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([r], lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        bradley_terry_loss(r[:1], r[1:], torch.tensor([1.0])).backward()
        opt.step()
    assert r[0] > r[1]


def test_dpo_loss_on_a_toy_case():
    ref = torch.tensor([-5.0]), torch.tensor([-5.0])
    assert dpo_loss(torch.tensor([-5.0]), torch.tensor([-5.0]), *ref, beta=0.1).item() == pytest.approx(math.log(2))
    better = dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), *ref, beta=0.1)
    worse = dpo_loss(torch.tensor([-6.0]), torch.tensor([-4.0]), *ref, beta=0.1)
    assert better.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2)))) and worse > better
    # Its gradient raises the chosen sample's log-probability and lowers the rejected one's.
    chosen, rejected = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(chosen, rejected, *ref, beta=0.5).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(chosen, rejected, *ref, beta=0.0)


def test_kl_penalty_and_best_of_n_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    shaped = kl_shaped_rewards(torch.tensor([3.0]), logp, ref, beta=0.1)
    torch.testing.assert_close(shaped, torch.tensor([[-0.05, 0.0, 3.0 - 0.05]]))
    assert sequence_kl(logp, ref).item() == pytest.approx(1.0)
    assert sequence_kl(ref, ref).item() == 0.0
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))


def test_best_of_n_reward_by_hand_and_its_optimum_is_best_of_n():
    reward = torch.tensor([[0.0, 1.0, 5.0]])
    reference = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # F = (below + ties / 2 + 1/2) / (M + 1): 0.5 / 5, 1 / 5, 4.5 / 5
    torch.testing.assert_close(best_of_n_reward(reward, reference, 4), 3 * torch.log(torch.tensor([[0.1, 0.2, 0.9]])))
    # The optimum of E[r'] - KL(pi || ref) is ref x exp(r') / Z. Over K equally likely outcomes with distinct rewards,
    # F taken from the outcomes themselves, it is best of N: its KL is log N - (N - 1) / N and the top outcome's
    # probability 1 - (1 - 1/K)^N, up to F's 1/K steps.
    k, n = 2000, 16
    outcomes = torch.randperm(k).double()[None]
    tilted = torch.softmax(best_of_n_reward(outcomes, outcomes, n).double()[0], dim=0)
    kl = (tilted * torch.log(tilted * k)).sum().item()
    assert kl == pytest.approx(best_of_n_kl(n), rel=0.01)
    assert tilted[outcomes[0].argmax()].item() == pytest.approx(1 - (1 - 1 / k) ** n, rel=0.02)
    with pytest.raises(ValueError, match="n >= 2"):
        best_of_n_reward(reward, reference, 1)
    with pytest.raises(ValueError, match="same prompts"):
        best_of_n_reward(reward, reference.expand(2, 4), 4)


def test_distribution_kl_is_exact_over_the_vocabulary_and_summed_over_positions():
    ref = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))  # two positions of a two-token vocabulary
    policy = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])) + 7.0  # logits: a shift changes nothing
    expect = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # the second position's KL is 0
    assert distribution_kl(ref, policy).item() == pytest.approx(expect)
    assert distribution_kl(policy, policy).item() == pytest.approx(0.0, abs=1e-6)
    assert distribution_kl(policy, ref).item() != pytest.approx(expect)  # KL is not symmetric: the order is kept


def test_what_decides_a_pair_and_the_accuracy_by_cause(tmp_path):
    from dalle.feedback.evaluate import by_cause
    from dalle.feedback.pairs import png_bytes
    from dalle.feedback.raters import deciding, shapes_prompt

    assert deciding((1, 5, 0.9), (0, 5, 0.9)) == "all_correct"
    assert deciding((0, 4, 0.9), (0, 3, 0.95)) == "checks"
    assert deciding((1, 5, 0.9), (1, 5, 0.8)) == "confidence"
    assert deciding((1, 5, 0.9), (1, 5, 0.9)) is None
    prompts = shapes_prompts("train", 6)
    assert shapes_prompt("train", prompts[2].caption).sample.scene == prompts[2].sample.scene
    with pytest.raises(ValueError, match="not among the first 20000"):
        shapes_prompt("train", "a plaid dodecahedron")
    with pytest.raises(ValueError, match="not a shapes split"):
        shapes_prompt("mine", prompts[0].caption)
    store = Store(tmp_path / "s.db")
    judged = []
    for i, p in enumerate(prompts):  # its own scene's render against another scene's: correctness decides
        pid = store.prompt(p.caption, "train")
        images = [render(p.sample.scene), render(prompts[(i + 1) % len(prompts)].sample.scene)]
        ids = [store.add_sample(pid, "m@1", k, {}, [0], png_bytes(torch.from_numpy(np.array(im)).permute(2, 0, 1)
                                                                 .float() / 255)) for k, im in enumerate(images)]
        store.record(store.add_pair(*ids), ids[0], "left", "r")
        judged.append(ids)
    right = {a: 1.0 for a, _ in judged} | {b: 0.0 for _, b in judged}
    out = by_cause(store, store.judgements(), {"right": right, "wrong": {k: -v for k, v in right.items()}})
    assert out["correctness_scorer_accuracy"] == 1.0
    decided = out["decided_by_all_correct"] + out["decided_by_checks"]
    assert decided >= 5 and out["decided_by_confidence"] + decided == 6
    assert out["right_accuracy_all_correct"] == 1.0 and out["wrong_accuracy_all_correct"] == 0.0
    other = Store(tmp_path / "t.db")
    pid = other.prompt("a plaid dodecahedron", "train")
    ids = [other.add_sample(pid, "m@1", k, {}, [0], png_bytes(torch.zeros(3, 8, 8))) for k in range(2)]
    other.record(other.add_pair(*ids), ids[0], "left", "r")
    with pytest.raises(ValueError, match="dodecahedron"):
        by_cause(other, other.judgements(), {})
