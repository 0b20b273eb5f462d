"""The shared training engine: exact resume, crash-safe checkpoints, non-finite steps."""

import json
import re

import pytest
import torch
from tiny import tiny_config

from dalle.data.shapes import ShapesDataset
from dalle.train import checkpoints as ckpt
from dalle.train.config import TrainConfig
from dalle.train.engine import NonFiniteLossError, ResumableSampler, Trainer
from dalle.train.tasks.dvae import DVAEObjective, DVAETask
from dvae.model import DiscreteVAE

TINY = tiny_config("dvae")


def make_task(seed=0):
    torch.manual_seed(seed)
    return DVAETask(DiscreteVAE(TINY), DVAEObjective(temp_steps=20, kl_steps=10, eval_images=16),
                    ShapesDataset("train", size=64, image_size=32), ShapesDataset("val", size=16, image_size=32))


def train_cfg(**kw):
    base = dict(steps=12, batch_size=4, lr=2e-3, ema_decay=0.9, log_every=4, eval_every=100, save_every=4,
                keep_checkpoints=5)
    return TrainConfig(**{**base, **kw})


def states(trainer):
    return {**{"live." + k: v for k, v in trainer.model.state_dict().items()},
            **{"ema." + k: v for k, v in trainer.ema.model.state_dict().items()}}


def test_resume_equals_uninterrupted(tmp_path):
    full = Trainer(make_task(), train_cfg(), tmp_path / "a", progress=False)
    full.fit()
    first = Trainer(make_task(), train_cfg(), tmp_path / "b", progress=False)
    first.fit(stop_at=6)  # as if the process died right after the step-6 checkpoint
    assert first.step == 6
    # A new process: fresh model with different init, resumed from disk.
    resumed = Trainer(make_task(seed=123), train_cfg(), tmp_path / "b", progress=False)
    assert resumed.step == 6
    resumed.fit()
    a, b = states(full), states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == full.optimizer.state_dict()["state"][0]["step"]


def test_sampler_resumes_mid_epoch():
    full = ResumableSampler(10, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(25)]
    it2 = iter(ResumableSampler(10, seed=3, start=13))
    assert [next(it2) for _ in range(12)] == stream[13:]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))  # each epoch is a permutation


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(make_task(), train_cfg(steps=8), tmp_path, progress=False)
    trainer.fit(stop_at=4)
    good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "step-0000004"

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_optimizer", boom)
    with pytest.raises(OSError, match="simulated"):
        trainer.fit()  # dies while writing step 8
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "checkpoints" / "step-0000008").exists()
    model = ckpt.load_pretrained(tmp_path)  # a run directory loads its latest checkpoint
    assert isinstance(model, DiscreteVAE)
    # and training resumes from it
    again = Trainer(make_task(), train_cfg(steps=8), tmp_path, progress=False)
    assert again.step == 4
    again.fit()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000008"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


class NaNTask:
    """Wraps a task so chosen steps produce a NaN loss."""

    def __init__(self, task, bad_steps):
        self.inner, self.bad = task, set(bad_steps)
        self.model = task.model

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch, step):
        loss, metrics = self.inner.loss(model, batch, step)
        return (loss * float("nan") if step in self.bad else loss), metrics


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, caplog):
    trainer = Trainer(NaNTask(make_task(), {2, 3}), train_cfg(steps=6, max_nonfinite=3), tmp_path / "a",
                      progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.counters["nonfinite_steps"] == 2
    assert "step 2 skipped: loss is nan" in caplog.text
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r for r in logged if r["event"] == "train"][-1]["nonfinite_steps"] == 2

    stuck = Trainer(NaNTask(make_task(), range(3, 100)), train_cfg(steps=12, max_nonfinite=3, save_every=2),
                    tmp_path / "b", progress=False)
    # Steps 3-5 failed; the save due at step 4 fell inside that streak and was not written, so step 2
    # (the weights of steps 0-1, whose loss was finite) is the last good checkpoint, and the error says so.
    last_good = tmp_path / "b" / "checkpoints" / "step-0000002"
    with pytest.raises(NonFiniteLossError, match=f"3 non-finite steps in a row.*last good checkpoint is {last_good}"):
        stuck.fit()
    assert ckpt.latest_checkpoint(tmp_path / "b") == last_good
    assert not (tmp_path / "b" / "checkpoints" / "step-0000004").exists()
    assert all(torch.isfinite(v).all() for v in ckpt.load_pretrained(last_good).state_dict().values())


def test_mismatched_weights_name_the_tensor(tmp_path):
    model = DiscreteVAE(TINY)
    ckpt.save_pretrained(model, tmp_path / "m")
    other = DiscreteVAE(tiny_config("dvae", vocab_size=32))
    with pytest.raises(ValueError, match=r"encoder\.blocks\.\d+\.weight: file \(64"):
        ckpt.load_weights(other, tmp_path / "m" / "model.safetensors")
    loaded = ckpt.load_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(x), model.eval().encode(x))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ckpt.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'dvae' model"):
        ckpt.load_pretrained(tmp_path / "m", expect="dalle")


def test_resume_refuses_a_different_model(tmp_path):
    Trainer(make_task(), train_cfg(steps=4), tmp_path, progress=False).fit()
    other = DVAETask(DiscreteVAE(tiny_config("dvae", vocab_size=32)), DVAEObjective(), [], [])
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(other, train_cfg(steps=4), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume auto"):
        Trainer(make_task(), train_cfg(steps=4), tmp_path, resume="never", progress=False)


def test_trainable_trains_only_the_parameters_it_names_and_resumes(tmp_path):
    """train.trainable: the decoder alone learns, the encoder keeps its starting weights bit for bit (a run
    without it moves both), and a resumed run equals an uninterrupted one."""
    start = make_task().model.state_dict()
    part = Trainer(make_task(), train_cfg(trainable=r"^decoder\."), tmp_path / "part", progress=False)
    part.fit()
    assert re.search(r"training [\d.]+M of [\d.]+M parameters \(train.trainable '\^decoder\\\\\.'\)$", part.describe())
    whole = Trainer(make_task(), train_cfg(), tmp_path / "whole", progress=False)
    whole.fit()
    moved = {name for name, value in part.model.state_dict().items() if not torch.equal(value, start[name])}
    assert moved and all(name.startswith("decoder.") for name in moved)
    assert "decoder.blocks.7.weight" in moved
    assert not torch.equal(whole.model.state_dict()["encoder.blocks.0.weight"], start["encoder.blocks.0.weight"])
    first = Trainer(make_task(), train_cfg(trainable=r"^decoder\."), tmp_path / "b", progress=False)
    first.fit(stop_at=6)
    resumed = Trainer(make_task(seed=123), train_cfg(trainable=r"^decoder\."), tmp_path / "b", progress=False)
    resumed.fit()
    for k, v in part.model.state_dict().items():
        torch.testing.assert_close(v, resumed.model.state_dict()[k], rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match=r"train.trainable '\^head' matches none of the trained parameters of "
                                         r"DiscreteVAE \(names such as encoder.blocks.0.weight"):
        Trainer(make_task(), train_cfg(trainable="^head"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="train.trainable must be a regular expression"):
        train_cfg(trainable="(")
