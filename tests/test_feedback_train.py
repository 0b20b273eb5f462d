"""Learning from the store's comparisons: the reward model (both bodies), its normalisation, exact resume, DPO,
GRPO, best-of-N distillation and tools/train_feedback.py, on toy stores whose preference is known (bright images
and low codes win)."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import tiny_config

from dalle.checkpoint import load_pretrained
from dalle.feedback.pairs import png_bytes
from dalle.feedback.reward import RewardConfig, RewardModel, body_field
from dalle.feedback.store import Store
from dalle.reranker.model import Reranker
from dalle.tokenizer import TextTokenizer
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer
from dalle.train.tasks.bon import BoNObjective, BoNTask
from dalle.train.tasks.dpo import DPOObjective, DPOTask, sequence_logprob
from dalle.train.tasks.grpo import GRPOObjective, GRPOTask, split_prompts
from dalle.train.tasks.reward import RewardObjective, RewardTask
from dalle.transformer.model import DALLE
from dalle_tools import train_feedback
from dvae.model import DiscreteVAE

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "feedback"
PROMPTS = [f"a {size} {color} {shape}" for size in ("small", "big") for color in ("red", "blue", "green")
           for shape in ("circle", "square", "star", "triangle")]


def toy_store(path, pairs=48, model_id="sft@1", ties=4, seed=0):
    """Pairs of a good sample (bright pixels, codes below 32) and a bad one (dark, codes 32 and up), judged by
    rater "r": the good one wins, except `ties` ties; one skip. 16 codes (the tiny transformer's 4x4 grid)."""
    rng = np.random.default_rng(seed)
    store = Store(path)
    for i in range(pairs):
        pid = store.prompt(PROMPTS[i % len(PROMPTS)], "train")
        ids = []
        for good in (True, False):
            level = rng.uniform(0.6, 1.0) if good else rng.uniform(0.0, 0.4)
            image = torch.from_numpy(np.clip(level + rng.normal(0, 0.1, (3, 32, 32)), 0, 1)).float()
            codes = (rng.integers(0, 32, 16) + (0 if good else 32)).tolist()
            ids.append(store.add_sample(pid, model_id, i, {}, codes, png_bytes(image)))
        pair = store.add_pair(*ids)
        left = ids[i % 2]  # sides alternate
        choice = "tie" if i < ties else "left" if left == ids[0] else "right"
        store.record(pair, left, choice, "r")
    store.record(pair, left, "skip", "r2")
    return store


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tokenizer, a tiny reranker and a tiny transformer saved as model directories."""
    from dalle.checkpoint import save_pretrained
    from dalle_tools import train_bpe

    root = tmp_path_factory.mktemp("feedback")
    assert train_bpe.main(["--shapes", "300", "--vocab", "300", "--out", str(root / "tokenizer.json")]) == 0
    tok = TextTokenizer.from_file(root / "tokenizer.json")
    torch.manual_seed(0)
    save = lambda d: tok.save(d / "tokenizer.json")  # noqa: E731
    save_pretrained(Reranker(tiny_config("reranker", text_vocab_size=tok.vocab_size, layers=1)), root / "reranker",
                    extra=save)
    save_pretrained(DiscreteVAE(tiny_config("dvae", downsample=8)), root / "dvae")  # the tiny transformer's 4x4 grid

    def extra(d):
        save(d)
        (d / "dvae.json").write_text(json.dumps({"path": str(root / "dvae")}))
    save_pretrained(DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2)), root / "dalle", extra=extra)
    save_pretrained(DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2, layouts=("t2i", "caption"))),
                    root / "reader", extra=extra)
    toy_store(root / "toy.db").close()
    return root


def reward_task(parts, body="reranker", seed=0, **objective):
    torch.manual_seed(seed)
    init = load_pretrained(parts / {"reranker": "reranker", "transformer": "dalle", "reader": "reader"}[body])
    model = RewardModel(RewardConfig(body=body, **{body_field(body): init.config}))
    model.load_body(init)
    tok = TextTokenizer.from_file(parts / "tokenizer.json")
    return RewardTask(model, RewardObjective(val_fraction=0.25, **objective), tok, Store(parts / "toy.db"))


TRAIN = TrainConfig(steps=16, batch_size=8, lr=3e-3, lr_schedule="constant", log_every=8, eval_every=100,
                    save_every=8)


@pytest.mark.parametrize("body", ["reranker", "transformer", "reader"])
def test_reward_model_learns_a_known_preference(parts, tmp_path, body):
    task = reward_task(parts, body)
    assert len(task.train) + len(task.val_judgements) == 48  # skips never counted, ties kept (half a win)
    assert sorted(set(task.train.target.tolist())) == [0.5, 1.0]
    trainer = Trainer(task, TRAIN, tmp_path, progress=False)
    before = trainer.evaluate()
    after = trainer.fit()
    assert after["val_loss"] < before["val_loss"]
    assert after["val_accuracy"] >= 0.9, after
    saved = load_pretrained(tmp_path / "checkpoints", expect="reward")
    assert saved.config == task.model.config and float(saved.offset) == pytest.approx(after["offset"])


def test_the_reader_body_starts_as_self_reranking(parts):
    """Before training, the reader's reward is the model's own log p(prompt | image) (generate.py --rerank self)."""
    from dalle.transformer.layouts import CAPTION
    from dalle.transformer.reading import text_logprob

    task = reward_task(parts, "reader")
    rows = torch.arange(12)
    text, codes = task.table.text[rows], task.table.codes[rows]
    expected = text_logprob(task.model.body, codes, text, CAPTION, torch.zeros(12, dtype=torch.long))
    with torch.no_grad():
        assert torch.allclose(task.model.raw(text, codes), expected, atol=1e-5)
    assert task.model.raw(text, codes).std() > 0  # not a constant


def test_a_reader_needs_a_transformer_that_reads(parts):
    t2i = load_pretrained(parts / "dalle").config
    with pytest.raises(ValueError, match="reads images.*caption"):
        RewardConfig(body="reader", transformer=t2i)


def test_a_frozen_body_keeps_its_weights_and_the_head_still_learns(parts, tmp_path):
    task = reward_task(parts, freeze_body=True)
    body = {k: v.clone() for k, v in task.model.body.state_dict().items()}
    head = task.model.head.weight.detach().clone()
    trainer = Trainer(task, TRAIN, tmp_path, progress=False)
    before = trainer.evaluate()
    after = trainer.fit()
    assert all(torch.equal(v, trainer.model.body.state_dict()[k]) for k, v in body.items())
    assert not torch.equal(head, trainer.model.head.weight) and after["val_loss"] < before["val_loss"]


def test_reward_normalisation_gives_mean_zero_on_the_sft_samples(parts, tmp_path):
    shutil.copy(parts / "toy.db", tmp_path / "mixed.db")  # the toy store, plus samples of another model
    store = Store(tmp_path / "mixed.db")
    pid = store.prompt(PROMPTS[0], "train")
    bright = png_bytes(torch.ones(3, 32, 32))
    for seed in range(4):
        store.add_sample(pid, "dpo@2", seed, {}, list(range(16)), bright)
    task = RewardTask(reward_task(parts).model, RewardObjective(val_fraction=0.25), task_tok(parts), store)
    assert len(task.sft_ids) == 96  # the first sample's model's
    Trainer(task, TrainConfig(steps=4, batch_size=8, lr=3e-3, eval_every=4, save_every=4), tmp_path / "run",
            progress=False).fit()
    rows = torch.tensor([task.table.row[s] for s in task.sft_ids])
    rewards = task.model(task.table.text[rows], task.table.pixels[rows].float() / 255)
    assert abs(rewards.mean().item()) < 1e-4
    assert rewards.std().item() > 0.1  # normalised, not collapsed


def task_tok(parts):
    return TextTokenizer.from_file(parts / "tokenizer.json")


def test_reward_resume_equals_uninterrupted(parts, tmp_path):
    cfg = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, weight_decay=0.1, log_every=4, eval_every=100,
                      save_every=4)
    full = Trainer(reward_task(parts), cfg, tmp_path / "a", progress=False)
    full.fit()
    Trainer(reward_task(parts), cfg, tmp_path / "b", progress=False).fit(stop_at=4)
    resumed = Trainer(reward_task(parts, seed=9), cfg, tmp_path / "b", progress=False)
    assert resumed.step == 4
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_reranker_reward_starts_as_the_raw_reranker(parts):
    task = reward_task(parts)
    rows = torch.arange(6)
    text, images = task.table.text[rows], task.table.pixels[rows].float() / 255
    body = task.model.body
    expected = body.scale() * (body.encode_image(images) * body.encode_text(text)).sum(-1)
    torch.testing.assert_close(task.model.raw(text, images), expected)


def dpo_task(parts, **objective):
    torch.manual_seed(0)
    model = load_pretrained(parts / "dalle").train()
    return DPOTask(model, DPOObjective(val_fraction=0.25, **objective), task_tok(parts), Store(parts / "toy.db"))


def test_dpo_moves_the_policy_toward_the_preferred_samples(parts, tmp_path):
    task = dpo_task(parts, beta=0.5, kl_samples=8)
    assert all(not j.tie for j in task.train_judgements + task.val_judgements)  # ties carry no preference
    trainer = Trainer(task, TrainConfig(steps=10, batch_size=8, lr=3e-3, lr_schedule="constant", log_every=5,
                                        eval_every=100, save_every=10), tmp_path, progress=False)
    start = trainer.evaluate()
    assert start["kl"] == 0.0 and start["val_loss"] == pytest.approx(np.log(2))  # policy == reference
    end = trainer.fit()
    assert end["val_loss"] < 0.5 and end["val_implicit_accuracy"] == 1.0
    assert end["kl"] > 0
    # Held-out winners gained log-probability against the losers, relative to the frozen reference.
    val = task.val_judgements
    win, lose = (torch.tensor([task.table.row[getattr(j, k)] for j in val]) for k in ("winner_id", "loser_id"))
    with torch.no_grad():
        gain = [sequence_logprob(m, task.table.text[win], task.table.codes[win])
                - sequence_logprob(m, task.table.text[lose], task.table.codes[lose]) for m in (task.model, task.ref)]
    assert (gain[0] > gain[1]).all()


def test_dpo_kl_is_the_mean_log_ratio_of_policy_samples(parts):
    from dalle.transformer.sampling import sample, token_logprobs

    task = dpo_task(parts, kl_samples=4, kl_seed=3)
    with torch.no_grad():
        for p in task.model.image_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    task.model.eval()
    rows = torch.tensor(sorted({task.table.row[j.winner_id] for j in task.val_judgements}))[torch.arange(4) % 4]
    text = task.table.text[rows]
    codes = sample(task.model, text, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        by_hand = (token_logprobs(task.model(text, codes)[1], codes)
                   - token_logprobs(task.ref(text, codes)[1], codes)).sum(-1).mean().item()
        assert task.kl(task.model) == pytest.approx(by_hand, rel=1e-5)


def _run(parts, tmp_path, method, *extra):
    config = f"configs/feedback/{method}-tiny.yaml"
    init = parts / ("dalle" if method == "dpo" else "reranker")
    return train_feedback.main([method, "--config", config, "--out", str(tmp_path / method), "--no-progress",
                                "--set", f"inputs.store={parts / 'toy.db'}", "--set", f"inputs.init={init}", *extra])


def test_train_feedback_tool_trains_a_reader_reward_model_and_grpo_against_it(parts, tmp_path, caplog):
    reader = parts / "reader"
    assert _run(parts, tmp_path, "reward", "--set", "model.body=reader", "--set", f"inputs.init={reader}") == 0
    model = load_pretrained(tmp_path / "reward", expect="reward")
    assert model.config.body == "reader" and model.config.transformer.layouts == ("t2i", "caption")
    # the shipped model's feedback stage (tools/train_default.sh): its GRPO config, cut to a few steps of the toy
    # store, against the reader just trained (codes in: no dVAE decode), from the transformer it started from
    small = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=2", "--set",
             "objective.group_size=3", "--set", "objective.val_fraction=0.4", "--set", "objective.eval_prompts=2"]
    assert train_feedback.main(["grpo", "--config", "configs/feedback/grpo-reader-shapes.yaml", "--out",
                                str(tmp_path / "grpo"), "--no-progress", "--set", f"inputs.store={parts / 'toy.db'}",
                                "--set", f"inputs.init={reader}", "--set", f"inputs.reward={tmp_path / 'reward'}",
                                *small]) == 0
    evals = [json.loads(x) for x in (tmp_path / "grpo" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"val_reward", "val_kl", "val_objective"} <= set(evals[-1])
    tuned = load_pretrained(tmp_path / "grpo", expect="dalle")
    assert tuned.config == load_pretrained(reader, expect="dalle").config
    # the same on a prompt file in place of the store (which need not exist): its lines, each once
    lines = PROMPTS[:12] + ["", PROMPTS[0], " a small blue cross "]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    caplog.set_level("INFO")
    assert train_feedback.main(["grpo", "--config", "configs/feedback/grpo-reader-shapes.yaml", "--out",
                                str(tmp_path / "grpo-file"), "--no-progress", "--set",
                                f"inputs.store={tmp_path / 'missing.db'}", "--set",
                                f"inputs.prompts={tmp_path / 'prompts.txt'}", "--set", f"inputs.init={reader}",
                                "--set", f"inputs.reward={tmp_path / 'reward'}", *small]) == 0
    train, _ = split_prompts(PROMPTS[:12] + ["a small blue cross"], 0.4, 0)
    assert f"on {len(train)} prompts" in caplog.text and len(train) > 2
    assert not (tmp_path / "missing.db").exists()
    assert load_pretrained(tmp_path / "grpo-file", expect="dalle").config == tuned.config


def test_grpo_against_the_gold_reward(parts, tmp_path):
    """inputs.reward=gold:shapes: GRPO scores its samples with the shapes detector (no reward model), on shapes
    captions only."""
    from dalle.evaluation.compositional import shapes_prompts

    (tmp_path / "shapes.txt").write_text("\n".join(p.caption for p in shapes_prompts("train", 12)) + "\n")
    args = ["grpo", "--config", "configs/feedback/grpo-tiny.yaml", "--no-progress", "--set",
            f"inputs.store={tmp_path / 'missing.db'}", "--set", f"inputs.init={parts / 'dalle'}", "--set",
            "inputs.reward=gold:shapes", "--set", "train.steps=2", "--set", "train.eval_every=2"]
    assert train_feedback.main([*args, "--out", str(tmp_path / "gold"), "--set",
                                f"inputs.prompts={tmp_path / 'shapes.txt'}"]) == 0
    evals = [json.loads(x) for x in (tmp_path / "gold" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert 0 <= evals[-1]["val_reward"] < 2  # all correct (1) + 0.1 a check right, a few checks at most
    assert isinstance(load_pretrained(tmp_path / "gold", expect="dalle"), DALLE)
    (tmp_path / "other.txt").write_text("\n".join(PROMPTS[:11] + ["a plaid dodecahedron"]) + "\n")
    with pytest.raises(SystemExit, match=r"inputs.reward gold:shapes: .*'a plaid dodecahedron' is not one of shapes"):
        train_feedback.main([*args, "--out", str(tmp_path / "other"), "--set",
                             f"inputs.prompts={tmp_path / 'other.txt'}"])
    assert not (tmp_path / "other").exists()


def test_evaluate_sampled_by_keeps_one_models_pairs(parts, tmp_path, capsys):
    """`evaluate --sampled-by` scores only the held-out pairs of one model's samples: the two models' counts add up
    to the store's, and a model the store lacks is named with the ones it has."""
    path = tmp_path / "two.db"
    toy_store(path).close()
    toy_store(path, pairs=24, model_id="policy@2", ties=0, seed=1).close()
    args = ["evaluate", "--store", str(path), "--reranker", str(parts / "reranker"), "--rater", "r", "--json"]
    counts = {}
    for model in ("", "sft@1", "policy@2"):
        out = tmp_path / f"figures-{model or 'all'}.json"
        assert train_feedback.main([*args, str(out), "--sampled-by", model]) == 0
        counts[model] = json.loads(out.read_text())["held_out_decided"]
    assert counts["sft@1"] > 0 and counts["policy@2"] > 0
    assert counts["sft@1"] + counts["policy@2"] == counts[""]
    with pytest.raises(SystemExit, match=r"--sampled-by: .*no samples of model 'rl@3'.*'sft@1', 'policy@2'"):
        train_feedback.main([*args, str(tmp_path / "no.json"), "--sampled-by", "rl@3"])
    assert not (tmp_path / "no.json").exists()


def test_train_feedback_tool_reward_dpo_and_evaluate(parts, tmp_path, capsys):
    assert _run(parts, tmp_path, "reward") == 0
    model = load_pretrained(tmp_path / "reward", expect="reward")
    assert model.config.body == "reranker" and (tmp_path / "reward" / "checkpoints" / "best").is_file()
    assert _run(parts, tmp_path, "dpo") == 0
    tuned = load_pretrained(tmp_path / "dpo", expect="dalle")
    assert isinstance(tuned, DALLE)
    evals = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"val_loss", "val_implicit_accuracy", "kl"} <= set(evals[-1])
    capsys.readouterr()
    out = tmp_path / "figures.json"
    assert train_feedback.main(["evaluate", "--store", str(parts / "toy.db"), "--reward", str(tmp_path / "reward"),
                                "--reranker", str(parts / "reranker"), "--rater", "r",
                                "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    trained = [json.loads(x) for x in (tmp_path / "reward" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert figures["held_out_decided"] == trained[-1]["val_decided"]  # the training run's split, from its run.json
    assert figures["reward_accuracy"] >= 0.9 and 0 <= figures["reranker_accuracy"] <= 1
    assert "reward_accuracy" in capsys.readouterr().out
    # GRPO against the reward model just trained (it reads pixels: the samples are decoded by the dVAE)
    assert train_feedback.main(["grpo", "--config", "configs/feedback/grpo-tiny.yaml", "--out", str(tmp_path / "grpo"),
                                "--no-progress", "--set", f"inputs.store={parts / 'toy.db'}", "--set",
                                f"inputs.init={parts / 'dalle'}", "--set", f"inputs.reward={tmp_path / 'reward'}"]) == 0
    evals = [json.loads(x) for x in (tmp_path / "grpo" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"val_reward", "val_kl", "val_objective"} <= set(evals[-1])
    assert load_pretrained(tmp_path / "grpo", expect="dalle").config == tuned.config
    # best-of-N distillation against the same reward model
    assert train_feedback.main(["bon", "--config", "configs/feedback/bon-tiny.yaml", "--out", str(tmp_path / "bon"),
                                "--no-progress", "--set", f"inputs.store={parts / 'toy.db'}", "--set",
                                f"inputs.init={parts / 'dalle'}", "--set", f"inputs.reward={tmp_path / 'reward'}"]) == 0
    logs = [json.loads(x) for x in (tmp_path / "bon" / "log.jsonl").read_text().splitlines()]
    assert {"nll", "reward", "reward_best"} <= set(next(x for x in logs if '"train"' in json.dumps(x)))
    assert {"val_reward", "val_kl"} <= set([x for x in logs if "val_kl" in x][-1])
    assert load_pretrained(tmp_path / "bon", expect="dalle").config == tuned.config
    # online DPO: the shipped config, cut to a few steps of the toy store
    small = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=2", "--set",
             "objective.n=3", "--set", "objective.val_fraction=0.4", "--set", "objective.eval_prompts=2"]
    assert train_feedback.main(["bon", "--config", "configs/feedback/bon-online-dpo-shapes.yaml", "--out",
                                str(tmp_path / "odpo"), "--no-progress", "--set", f"inputs.store={parts / 'toy.db'}",
                                "--set", f"inputs.init={parts / 'dalle'}", "--set",
                                f"inputs.reward={tmp_path / 'reward'}", *small]) == 0
    logs = [json.loads(x) for x in (tmp_path / "odpo" / "log.jsonl").read_text().splitlines()]
    assert {"margin", "accuracy", "reward_best"} <= set(next(x for x in logs if '"train"' in json.dumps(x)))
    assert json.loads((tmp_path / "odpo" / "run.json").read_text())["objective"]["source"] == "policy"


class LowCodes(torch.nn.Module):
    """A reward whose optimum is known: the lower the image's codes, the better."""

    config = SimpleNamespace(reads_pixels=False, text_seq_len=12)

    def forward(self, text, codes):
        self.scored = len(codes)
        return -codes.float().mean(-1) / 8


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


def test_grpo_resume_equals_uninterrupted(parts, tmp_path):
    """Sampling inside the step draws from the engine's per-step seed, so a resumed run samples the same images."""
    def task(seed):
        torch.manual_seed(seed)
        return GRPOTask(load_pretrained(parts / "dalle").train(), GRPOObjective(group_size=2, eval_prompts=2),
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


def test_train_feedback_errors_are_one_line(parts, tmp_path):
    empty = tmp_path / "empty.db"
    Store(empty).close()
    with pytest.raises(SystemExit, match="no comparisons"):
        _run(parts, tmp_path, "reward", "--set", f"inputs.store={empty}")
    with pytest.raises(SystemExit, match="does not exist"):
        _run(parts, tmp_path, "reward", "--set", f"inputs.store={tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(SystemExit, match="no usable comparisons by rater 'nobody'"):
        _run(parts, tmp_path, "reward", "--set", "objective.rater=nobody")
    with pytest.raises(SystemExit, match="holds a 'reranker' model, but a 'dalle' model is needed"):
        _run(parts, tmp_path, "reward", "--set", "model.body=transformer")
    with pytest.raises(SystemExit, match=r"inputs.init .*dalle: a 'reader' reward model starts from a transformer that "
                                         r"reads images"):
        _run(parts, tmp_path, "reward", "--set", "model.body=reader", "--set", f"inputs.init={parts / 'dalle'}")
    other = tmp_path / "other"
    from dalle.checkpoint import save_pretrained

    tok = task_tok(parts)
    save_pretrained(DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=1, image_grid_size=2)), other,
                    extra=lambda d: tok.save(d / "tokenizer.json"))
    with pytest.raises(SystemExit, match="16 codes .* but the model reads 4 codes"):
        _run(parts, tmp_path, "dpo", "--set", f"inputs.init={other}")
    with pytest.raises(SystemExit, match="source in"):
        train_feedback.main(["bon", "--config", "configs/feedback/bon-tiny.yaml", "--out", str(tmp_path / "bon"),
                             "--set", "objective.source=nowhere"])
    with pytest.raises(SystemExit, match="loss in"):
        train_feedback.main(["bon", "--config", "configs/feedback/bon-tiny.yaml", "--out", str(tmp_path / "bon"),
                             "--set", "objective.loss=kl"])
    with pytest.raises(SystemExit, match="inputs.init and inputs.reward must be set"):
        train_feedback.main(["bon", "--config", "configs/feedback/bon-tiny.yaml", "--out", str(tmp_path / "bon"),
                             "--set", f"inputs.store={parts / 'toy.db'}"])
    (tmp_path / "blank.txt").write_text("\n  \n")
    given = ["--set", f"inputs.init={parts / 'dalle'}", "--set", f"inputs.reward={parts / 'reranker'}"]
    with pytest.raises(SystemExit, match="blank.txt holds no prompt: give a file with one prompt a line"):
        train_feedback.main(["grpo", "--config", "configs/feedback/grpo-tiny.yaml", "--out", str(tmp_path / "g"),
                             "--set", f"inputs.prompts={tmp_path / 'blank.txt'}", *given])
    with pytest.raises(SystemExit, match="cannot read inputs.prompts .*nowhere.txt"):
        train_feedback.main(["grpo", "--config", "configs/feedback/grpo-tiny.yaml", "--out", str(tmp_path / "g"),
                             "--set", f"inputs.prompts={tmp_path / 'nowhere.txt'}", *given])
    assert not (tmp_path / "g").exists()


def test_train_feedback_help_explains_every_flag(capsys):
    for method in ("reward", "dpo", "grpo", "bon", "evaluate"):
        with pytest.raises(SystemExit):
            train_feedback.main([method, "--help"])
        text = capsys.readouterr().out
        assert "--out" in text or "--store" in text
        assert "--config" in text or method == "evaluate"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_feedback_configs_parse(path):
    from dalle.config import from_dict
    from dalle.train.config import load_yaml

    method = path.stem.split("-")[0]
    data = load_yaml(path)
    assert set(data) == set(train_feedback.SECTIONS[method])
    for name, cls in train_feedback.SECTIONS[method].items():
        from_dict(cls, data[name])


def test_pairwise_accuracy_and_noise_ceiling():
    from dalle.feedback.data import agreement, pairwise_accuracy
    from dalle.feedback.store import Judgement

    noisy = [Judgement(1, 10, 11, False, "n"), Judgement(2, 13, 12, False, "n"), Judgement(3, 14, 15, True, "n"),
             Judgement(4, 16, 17, False, "n")]
    truth = [Judgement(1, 10, 11, False, "t"), Judgement(2, 12, 13, False, "t"), Judgement(3, 15, 14, False, "t"),
             Judgement(4, 17, 16, True, "t")]
    scores = {10: 1.0, 11: 0.0, 12: 2.0, 13: 1.0, 14: 0.0, 15: 0.0, 16: 3.0, 17: 3.0}
    # decided noisy judgements: pair 1 right, pair 2 wrong, pair 4 an equal score (half); the tie is left out
    assert pairwise_accuracy(scores, noisy) == (0.5, 3)
    # pairs decided by both raters: 1 (agree) and 2 (disagree); 3 and 4 have a tie on one side
    assert agreement(noisy, truth) == (0.5, 2)
