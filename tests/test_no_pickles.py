"""Nothing is executed on load: a pickle whose unpickling would run code (here: create a marker file) is
refused, with one line naming the file, wherever a file of a checkpoint or of the FID weights is read:
a DeepSpeed shard on export and on resume, the --inception-weights file, a model.safetensors that is
really a pickle, and a plain run's optimizer state of the old format (the new one is safetensors)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle.checkpoint import load_weights, save_pretrained
from dalle.train import checkpoints as ckpt
from dalle_tools import eval_fid, export

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": Payload(marker), "weights": torch.zeros(2)}, path)


def one_line_naming(message: str, path: Path) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert str(path) in message and "refusing to unpickle" in message, message


def test_the_payload_runs_when_unpickled(tmp_path):
    """The control: the same file does run code under weights_only=False (what DeepSpeed passes)."""
    plant(tmp_path / "x.pt", tmp_path / "ran")
    torch.load(tmp_path / "x.pt", weights_only=False)["module"].close()
    assert (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    """A one-step single-process DeepSpeed ZeRO-1 run of the tiny dVAE (a subprocess: its process group)."""
    run = tmp_path_factory.mktemp("ds") / "run"
    cmd = [sys.executable, "tools/train_dvae.py", "--config", "configs/dvae/tiny.yaml", "--out", str(run),
           "--deepspeed", "configs/deepspeed/zero1.json", "--set", "train.steps=1", "--set",
           "train.channels_last=false", "--set", "data.train_size=16", "--no-progress"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(run.parent / "ext")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def planted_copy(run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shard = ckpt.latest_checkpoint(copy) / ckpt.DEEPSPEED_DIR / "mp_rank_00_model_states.pt"
    plant(shard, tmp_path / "ran")
    return copy, shard, tmp_path / "ran"


def test_a_real_deepspeed_checkpoint_exports_with_weights_only(ds_run, tmp_path):
    """The allow-list covers what a genuine ZeRO shard holds (loss scaler, stage enum, fragment addresses)."""
    assert export.main([str(ds_run), "--out", str(tmp_path / "model"), "--live"]) == 0
    assert (tmp_path / "model" / ckpt.WEIGHTS_NAME).is_file()


def test_export_refuses_a_planted_deepspeed_shard(ds_run, tmp_path):
    run, shard, marker = planted_copy(ds_run, tmp_path)
    with pytest.raises(SystemExit) as e:
        export.main([str(run), "--out", str(tmp_path / "model"), "--live"])
    assert not marker.exists()
    one_line_naming(str(e.value), shard)


def test_resume_refuses_a_planted_deepspeed_shard(ds_run, tmp_path):
    run, shard, marker = planted_copy(ds_run, tmp_path)
    cmd = [sys.executable, "tools/train_dvae.py", "--config", "configs/dvae/tiny.yaml", "--out", str(run),
           "--deepspeed", "configs/deepspeed/zero1.json", "--set", "train.steps=2", "--set",
           "train.channels_last=false", "--set", "data.train_size=16", "--no-progress"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not marker.exists()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cannot start training: ")
    one_line_naming(last, shard)


def test_inception_weights_that_are_a_pickle_are_refused(tiny_parts, tmp_path):
    weights = tmp_path / "pt_inception.pth"
    plant(weights, tmp_path / "ran")
    args = ["--model", str(tiny_parts / "model"), "--source", "shapes", "--split", "zeroshot", "--n", "2",
            "--out", str(tmp_path / "fid"), "--inception-weights", str(weights), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        eval_fid.main(args)
    assert not (tmp_path / "ran").exists()
    one_line_naming(str(e.value), weights)


def test_fid_inception_is_pytorch_fids_network_from_a_plain_state_dict(tmp_path, monkeypatch):
    """Built without pytorch-fid's hub loader, the network is the same module for module, and it takes a
    state dict of tensors key by key (random values here: the real file is not downloaded in tests)."""
    from pytorch_fid import inception

    from dalle.evaluation.fid import fid_inception

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, state: None)
    reference = inception.fid_inception_v3()
    monkeypatch.undo()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    net = fid_inception(tmp_path / "w.pth")
    assert [type(m) for m in net.modules()] == [type(m) for m in reference.modules()]
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    del state["fc.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not match the FID Inception-v3.*fc.weight"):
        fid_inception(tmp_path / "w.pth")


def test_a_pickle_posing_as_safetensors_is_one_clear_error(tmp_path):
    from tiny import tiny_config

    from dvae.model import DiscreteVAE

    model = DiscreteVAE(tiny_config("dvae"))
    save_pretrained(model, tmp_path / "m")
    plant(tmp_path / "m" / ckpt.WEIGHTS_NAME, tmp_path / "ran")
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        load_weights(model, tmp_path / "m" / ckpt.WEIGHTS_NAME)
    assert str(tmp_path / "m" / ckpt.WEIGHTS_NAME) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()


def test_a_planted_optimizer_state_of_the_old_format_is_refused(tmp_path):
    """Checkpoints from before the safetensors optimizer state hold optimizer.pt: still read, weights only."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    plant(tmp_path / ckpt.LEGACY_OPTIMIZER, tmp_path / "ran")
    with pytest.raises(ValueError) as e:
        ckpt.load_optimizer(opt, tmp_path)
    assert not (tmp_path / "ran").exists()
    one_line_naming(str(e.value), tmp_path / ckpt.LEGACY_OPTIMIZER)


def test_a_plain_run_writes_no_pickle_and_resumes_its_optimizer_exactly(tmp_path):
    """A checkpoint's optimizer state is safetensors + JSON: no file of a plain run's checkpoint is a pickle
    or a torch.save zip, and the state read back equals the state written (AdamW steps on identically)."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW([{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias]}], lr=1e-2,
                              betas=(0.9, 0.96)) for m in models]
    x = torch.randn(5, 4)
    for _ in range(3):
        models[0](x).square().sum().backward()
        opts[0].step()
        opts[0].zero_grad()
    models[1].load_state_dict(models[0].state_dict())
    ckpt.save_optimizer(opts[0], tmp_path)
    for f in tmp_path.iterdir():
        head = f.read_bytes()[:2]
        assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), f"{f.name} is a pickle or a torch.save"
    ckpt.load_optimizer(opts[1], tmp_path)
    for m, opt in zip(models, opts):
        m(x).square().sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))

    (tmp_path / ckpt.OPTIMIZER_TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable optimizer state") as e:
        ckpt.load_optimizer(opts[1], tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / ckpt.OPTIMIZER_META).unlink()
    with pytest.raises(ValueError, match="optimizer.json: missing from the checkpoint"):
        ckpt.load_optimizer(opts[1], tmp_path)
