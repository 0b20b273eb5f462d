"""Learning from the store's comparisons: the reward model (each body), its normalisation, exact resume, DPO,
and tools/train_feedback.py (every method through the tool, its errors and help), on toy stores whose preference
is known (bright images and low codes win). GRPO and best-of-N distillation in detail: test_feedback_policy.py."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from feedback_toys import PROMPTS, make_parts, task_tok, toy_store
from tiny import tiny_config

from dalle.checkpoint import load_pretrained
from dalle.feedback.pairs import png_bytes
from dalle.feedback.reward import RewardConfig, RewardModel, body_field
from dalle.feedback.store import Store
from dalle.tokenizer import TextTokenizer
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer
from dalle.train.tasks.dpo import DPOObjective, DPOTask, sequence_logprob
from dalle.train.tasks.grpo import split_prompts
from dalle.train.tasks.reward import RewardObjective, RewardTask
from dalle.transformer.model import DALLE
from dalle_tools import train_feedback

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "feedback"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("feedback"))


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
    # its best-of-N form (configs/feedback/grpo-bon-shapes.yaml): the reward against the reference's own draws
    assert train_feedback.main(["grpo", "--config", "configs/feedback/grpo-bon-shapes.yaml", "--out",
                                str(tmp_path / "grpo-bon"), "--no-progress", "--set",
                                f"inputs.store={parts / 'toy.db'}", "--set", f"inputs.init={reader}", "--set",
                                f"inputs.reward={tmp_path / 'reward'}", *small, "--set",
                                "objective.reference_samples=2"]) == 0
    lines = (tmp_path / "grpo-bon" / "log.jsonl").read_text().splitlines()
    assert "val_bon_reward" in json.loads([x for x in lines if '"eval"' in x][-1])
    assert {"bon_reward", "reference_reward"} <= set(json.loads([x for x in lines if '"train"' in x][-1]))
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
