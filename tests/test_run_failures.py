"""Runs that go wrong keep what was good and say so in one line: a diverged run never writes non-finite
weights and names its last good checkpoint, impossible optimizer settings are refused up front, and a
full or read-only disk ends a training tool with one line that says so, what was kept and how to resume."""

import errno
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_engine import NaNTask, make_task, train_cfg

from dalle.train import checkpoints as ckpt
from dalle.train import engine
from dalle.train.config import TrainConfig
from dalle_tools import train_dvae

ROOT = Path(__file__).resolve().parents[1]


def blow_up_at(monkeypatch, step: int) -> None:
    """One AdamW update with lr 1e6 at `step`: its loss is finite, the weights it leaves are not usable."""
    real = engine.lr_at
    monkeypatch.setattr(engine, "lr_at", lambda cfg, k: 1e6 if k == step else real(cfg, k))


def all_finite(checkpoint: Path) -> bool:
    files = [checkpoint / ckpt.WEIGHTS_NAME, *checkpoint.glob("train/*.safetensors")]
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


def test_a_diverged_run_keeps_and_names_its_last_good_checkpoint(tmp_path, monkeypatch):
    blow_up_at(monkeypatch, 5)
    trainer = engine.Trainer(make_task(), train_cfg(steps=12, save_every=2, max_nonfinite=3), tmp_path, progress=False)
    good = tmp_path / "checkpoints" / "step-0000004"
    with pytest.raises(engine.NonFiniteLossError, match=f"rejected-step-0000006.*last good checkpoint is {good}"):
        trainer.fit()
    # Step 6 was saved from the blown-up weights (finite, with step 5's finite loss); every step after it
    # was non-finite, so it was set aside; step 8 fell inside the streak and was never written.
    assert ckpt.latest_checkpoint(tmp_path) == good
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert steps == ["step-0000002", "step-0000004"]
    assert all(all_finite(tmp_path / "checkpoints" / name) for name in steps)
    assert (tmp_path / "checkpoints" / "rejected-step-0000006").is_dir()


def test_divergence_at_the_first_step_saves_nothing(tmp_path, monkeypatch, capsys):
    """The issue's repro: step 0 applies a destructive update with a finite loss, then every loss is NaN.
    Skipped steps still count, but the saves they reach are refused, and the tool says there is no good one."""
    blow_up_at(monkeypatch, 0)
    args = ["--config", str(ROOT / "configs/dvae/tiny.yaml"), "--out", str(tmp_path / "run"), "--set",
            "train.steps=30", "--set", "train.save_every=1", "--set", "data.train_size=32", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        train_dvae.main(args)
    message = str(e.value)
    assert message.startswith("training stopped: 5 non-finite steps in a row") and "\n" not in message
    assert "No good checkpoint was written" in message
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpt.latest_checkpoint(tmp_path / "run") is None


def test_a_run_that_ends_inside_a_nonfinite_streak_is_an_error(tmp_path):
    """Its final state is not saved, so ending quietly would present an older checkpoint as the result."""
    trainer = engine.Trainer(NaNTask(make_task(), {5}), train_cfg(steps=6, save_every=2), tmp_path, progress=False)
    good = tmp_path / "checkpoints" / "step-0000004"
    with pytest.raises(engine.NonFiniteLossError, match=f"training ended at step 6, but the last 1 step.*{good}"):
        trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path) == good


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("lr", 1e39, "(0, 1]"), ("lr", 0.0, "(0, 1]"), ("lr", float("nan"), "(0, 1]"),
    ("min_lr", 1.0, "[0, train.lr"), ("betas", (0.9, 1.0), "[0, 1)"), ("betas", (0.9,), "two numbers"),
    ("eps", 0.0, "(0, 1]"), ("weight_decay", -0.1, "[0, 1/train.lr)"), ("grad_clip", -1.0, ">= 0"),
    ("grad_clip", float("inf"), ">= 0"), ("ema_decay", 1.0, "[0, 1)"), ("steps", 0, ">= 1"),
    ("max_nonfinite", 0, ">= 1"), ("warmup_steps", -1, ">= 0"), ("precision", "fp8", "'fp32', 'bf16', 'fp16'"),
])
def test_impossible_train_settings_are_refused_up_front(key, value, allowed):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{key: value})
    assert str(e.value).startswith(f"train.{key} must be") and allowed in str(e.value)


def test_the_tool_refuses_an_absurd_lr_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        train_dvae.main(["--config", str(ROOT / "configs/dvae/tiny.yaml"), "--out", str(tmp_path),
                         "--set", "train.lr=1e39"])
    assert str(e.value) == "config error: train.lr must be a number in (0, 1], got 1e+39"


# -- full and read-only disks ------------------------------------------------------------------------


def run_args(out: Path) -> list[str]:
    return ["--config", str(ROOT / "configs/dvae/tiny.yaml"), "--out", str(out), "--set", "train.steps=4",
            "--set", "train.save_every=2", "--set", "train.eval_every=100", "--set", "data.train_size=32",
            "--no-progress"]


def fail_second_save(monkeypatch, error: BaseException) -> None:
    real, calls = ckpt.save_optimizer, []

    def save_optimizer(optimizer, path):
        calls.append(path)
        if len(calls) == 2:
            raise error
        real(optimizer, path)
    monkeypatch.setattr(ckpt, "save_optimizer", save_optimizer)


def free_space(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 41024 vs 40916"),
    SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)'),
], ids=["enospc", "torch-writer", "safetensors"])
def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    fail_second_save(monkeypatch, error)
    free_space(monkeypatch, 48 * 1024)
    with pytest.raises(SystemExit) as e:
        train_dvae.main(run_args(out))
    kept = out / "checkpoints" / "step-0000002"
    message = str(e.value)
    assert message.startswith("training stopped: the disk is full (48 KiB free)") and "\n" not in message
    assert str(out / "checkpoints") in message and f"last good checkpoint {kept} is intact" in message
    assert "re-run the same command" in message
    assert ckpt.latest_checkpoint(out) == kept and all_finite(kept)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()  # space freed: the same command finishes the run
    assert train_dvae.main(run_args(out)) == 0
    assert ckpt.latest_checkpoint(out).name == "step-0000004"


def test_a_torch_writer_error_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    fail_second_save(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"))
    free_space(monkeypatch, 50 * 2**30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        train_dvae.main(run_args(tmp_path / "run"))


def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: the file system's refusal is simulated."""
    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(ckpt, "write_json", read_only)
    with pytest.raises(SystemExit) as e:
        train_dvae.main(run_args(tmp_path / "run"))
    assert str(e.value) == (f"training stopped: cannot write {tmp_path / 'run' / 'run.json'}: the file system is "
                            "read-only and nothing was written. Pass a writable --out, or remount it writable and "
                            "re-run the same command")


def test_a_disk_turning_read_only_mid_run_names_the_kept_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_second_save(monkeypatch, OSError(errno.EROFS, "Read-only file system", str(out / "checkpoints")))
    with pytest.raises(SystemExit) as e:
        train_dvae.main(run_args(out))
    kept = out / "checkpoints" / "step-0000002"
    assert f"read-only; the last checkpoint {kept} is intact" in str(e.value) and "\n" not in str(e.value)
    assert f"--resume {kept}" in str(e.value) and ckpt.latest_checkpoint(out) == kept
