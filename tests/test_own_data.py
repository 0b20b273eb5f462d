"""Your own images end to end: every caption line reaches the token shards, and threads never oversubscribe."""

from __future__ import annotations

import json
import os

import torch
from PIL import Image

from dalle import cli
from dalle.data.tokens import TokenShards
from dalle_tools import pretokenize


def _folder(root, n: int = 3) -> dict[str, list[str]]:
    root.mkdir()
    lines = {}
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(root / f"img{i}.png")
        lines[f"img{i}"] = [f"picture {i} caption {j}" for j in range(3)]
        (root / f"img{i}.txt").write_text("\n\n".join(lines[f"img{i}"]) + "\n  \n")
    return lines


def test_pretokenize_keeps_every_caption_line(tmp_path, tiny_parts) -> None:
    want = _folder(tmp_path / "imgs")
    out = tmp_path / "tok"
    assert pretokenize.main(["--dvae", str(tiny_parts / "dvae"), "--source", "folder", "--path",
                             str(tmp_path / "imgs"), "--out", str(out), "--device", "cpu"]) == 0
    shards = TokenShards(out)
    assert len(shards) == len(want)
    for i in range(len(shards)):
        key = shards[(i, 0)]["key"]
        assert sorted(shards.records[i]["captions"]) == sorted(want[key])
        # The training order seeds each epoch's draw differently, so over epochs every line is seen.
        assert {shards[(i, epoch_seed)]["caption"] for epoch_seed in range(40)} == set(want[key])


def test_default_threads_never_exceeds_free_cores(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for load, want in [(0.0, 2), (0.6, 1), (1.4, 1), (2.0, 1), (9.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert cli.default_threads() == want
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert cli.default_threads() == 13


def _picked(grid: torch.Tensor, k: int) -> list[int]:
    return [round(float(img.mean()) * 40) for img in grid[:k]]


def test_eval_dvae_grid_seed_draws_a_seeded_random_sample(tmp_path, tiny_parts) -> None:
    from dalle.checkpoint import load_pretrained
    from dalle_tools import eval_dvae

    model = load_pretrained(tiny_parts / "dvae", expect="dvae")
    data = [{"image": torch.full((3, 32, 32), i / 40)} for i in range(40)]
    first = _picked(eval_dvae.random_grid(model, data, 40, 4, seed=1), 4)
    assert first == _picked(eval_dvae.random_grid(model, data, 40, 4, seed=1), 4)
    assert first != [0, 1, 2, 3] and len(set(first)) == 4
    assert first != _picked(eval_dvae.random_grid(model, data, 40, 4, seed=2), 4)
    assert max(_picked(eval_dvae.random_grid(model, data, 10, 4, seed=1), 4)) < 10  # only the --n evaluated

    _folder(tmp_path / "imgs", n=6)
    assert eval_dvae.main(["--model", str(tiny_parts / "dvae"), "--source", "folder", "--path", str(tmp_path / "imgs"),
                           "--n", "6", "--grid", str(tmp_path / "g.png"), "--grid-images", "3", "--grid-seed", "5",
                           "--device", "cpu", "--threads", "1"]) == 0
    assert (tmp_path / "g.png").is_file()


class ScriptedEval:
    """A tiny dVAE task whose held-out PSNR follows a script: up, then down (overfitting)."""

    def __init__(self, psnrs: list[float]) -> None:
        from tiny import tiny_config

        from dalle.data.shapes import ShapesDataset
        from dalle.train.tasks.dvae import DVAEObjective, DVAETask
        from dvae.model import DiscreteVAE

        torch.manual_seed(0)
        data = ShapesDataset("train", size=64, image_size=32), ShapesDataset("val", size=4, image_size=32)
        self.task = DVAETask(DiscreteVAE(tiny_config("dvae")), DVAEObjective(temp_steps=20, kl_steps=10), *data)
        self.psnrs = iter(psnrs)
        self.task.evaluate = lambda model, step, sink: {"psnr": next(self.psnrs)}


def _train(run, psnrs, **kw):
    from dalle.train.config import TrainConfig
    from dalle.train.engine import Trainer

    cfg = TrainConfig(**{**dict(steps=12, batch_size=4, lr=2e-3, log_every=2, eval_every=2, save_every=6,
                                keep_checkpoints=1), **kw})
    trainer = Trainer(ScriptedEval(psnrs).task, cfg, run, progress=False)
    trainer.fit()
    return trainer


def test_best_checkpoint_survives_retention_and_is_what_model_run_loads(tmp_path) -> None:
    from dalle.checkpoint import load_pretrained, resolve_model_dir
    from dalle.train import checkpoints as ckpt
    from dalle.train.best import best_checkpoint

    run = tmp_path / "run"
    _train(run, [10.0, 12.0, 11.0, 9.0, 8.0, 7.0])
    best, latest = best_checkpoint(run), ckpt.latest_checkpoint(run)
    assert best is not None and best.name == "step-0000004"  # saved at the improving eval, not a save_every step
    assert latest.name == "step-0000012"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000012"]
    state = json.loads((best / "train" / "state.json").read_text())
    assert state["best"] == {"metric": "psnr", "mode": "max", "value": 12.0, "step": 4, "evals_since": 0}
    assert resolve_model_dir(run) == best  # --model RUN loads the best ...
    assert resolve_model_dir(run / "checkpoints" / "best") == best  # ... and so does the pointer the log names
    assert resolve_model_dir(run / "checkpoints" / "latest") == latest
    model = load_pretrained(run, expect="dvae")
    want = load_pretrained(best, expect="dvae").state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    resumed = _train(run, [6.0], steps=14)  # ... while --resume auto continues from the latest
    assert resumed.step == 14 and best_checkpoint(run).name == "step-0000004"


def test_early_stopping_stops_after_evals_without_improvement(tmp_path) -> None:
    from dalle.train import checkpoints as ckpt

    trainer = _train(tmp_path / "run", [10.0, 12.0, 11.0, 9.0, 13.0, 14.0], early_stop_evals=2, steps=100)
    assert trainer.step == 8  # evals at 2, 4 (best), 6, 8: two without a better PSNR
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-0000008"
