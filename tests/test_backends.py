"""Training at scale on the CPU: data sharding, the DeepSpeed config, gradient accumulation, and 2-process
runs under torchrun (DDP) and the deepspeed launcher (ZeRO 1/2/3 in fp32 and bf16) that resume exactly
and export to model directories the rest of the project loads."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_config

from dalle.data.order import ResumableSampler
from dalle.data.tokens import TokenShards
from dalle.pipeline import load_pipeline
from dalle.tokenizer import TextTokenizer
from dalle.train import checkpoints as ckpt
from dalle.train.backends import deepspeed_config
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer
from dalle.train.tasks.transformer import DALLEObjective, DALLETask
from dalle.transformer.model import DALLE, DALLEConfig
from dalle_tools import estimate, export, make_shapes, pretokenize, train_bpe
from dvae.model import DiscreteVAE

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = ROOT / "configs" / "deepspeed"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    dvae = DiscreteVAE(tiny_config("dvae", downsample=8))  # the tiny transformer's 4x4 grid
    ckpt.save_pretrained(dvae, root / "dvae")
    for split, n in (("train", 64), ("val", 16)):
        assert pretokenize.main(["--dvae", str(root / "dvae"), "--split", split, "--n", str(n), "--out",
                                 str(root / f"tok-{split}"), "--batch-size", "32", "--shard-size", "32",
                                 "--device", "cpu"]) == 0
    assert train_bpe.main(["--shapes", "400", "--vocab", "300", "--out", str(root / "tokenizer.json")]) == 0
    return root


# -- in-process ------------------------------------------------------------------------------------


def test_ranks_read_disjoint_parts_of_one_stream():
    one = iter(ResumableSampler(10, seed=4, start=6))
    stream = [next(one) for _ in range(30)]  # three epochs from position 6
    ranks = [iter(ResumableSampler(10, seed=4, start=6, rank=r, world=2)) for r in (0, 1)]
    parts = [[next(it) for _ in range(15)] for it in ranks]
    assert parts[0] == stream[0::2] and parts[1] == stream[1::2]
    epoch1 = [i for i, _ in parts[0][2:7] + parts[1][2:7]]  # stream positions 4..13, all of epoch 1
    assert sorted(epoch1) == list(range(10))  # between them the ranks read each sample once
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, seed=0, rank=2, world=2)


def test_webdataset_shards_split_over_ranks_and_workers(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from dalle.data.readers import collate_skip_bad, webdataset_pairs
    from dalle.data.transforms import transform_from_name

    make_shapes.main(["--n", "16", "--out", str(tmp_path), "--image-size", "16", "--shards", "--shard-size", "4"])
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = webdataset_pairs(str(tmp_path / "shapes-{000000..000003}.tar"), transform_from_name("eval", 16), shuffle=0)
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_bad)
        keys.append([k for batch in loader for k in batch["key"]])
    assert len(keys[0]) == len(keys[1]) == 8  # 4 shards = 2 ranks x 2 workers, one shard each
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0] + keys[1])) == 16


def test_deepspeed_config_is_filled_from_the_train_config(tmp_path):
    cfg = TrainConfig(batch_size=4, grad_accum=3, grad_clip=2.0, precision="bf16")
    assert sorted(p.name for p in DS_CONFIGS.glob("*.json")) == ["zero1.json", "zero2.json", "zero3.json"]
    for path in sorted(DS_CONFIGS.glob("*.json")):
        for precision in ("fp32", "bf16", "fp16"):  # one JSON per ZeRO stage serves every precision
            ds = deepspeed_config(path, TrainConfig(precision=precision, batch_size=4, grad_accum=3), world=2)
            assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
            assert ds["zero_optimization"]["stage"] == int(path.stem[4])
            assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
            assert (ds["fp16"].get("initial_scale_power") == 16) is (precision == "fp16")
    base = json.loads((DS_CONFIGS / "zero2.json").read_text())
    def check(extra, match, train=cfg):
        p = tmp_path / "ds.json"
        p.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ValueError, match=match):
            deepspeed_config(p, train, world=2)

    check({"optimizer": {"type": "AdamW"}}, "optimizer.*train section")
    check({"scheduler": {"type": "WarmupLR"}}, "scheduler")
    check({"train_micro_batch_size_per_gpu": 8}, r"train_micro_batch_size_per_gpu is 8, but train.batch_size gives 4")
    check({"gradient_clipping": 1.0}, "train.grad_clip gives 2.0")
    check({"bf16": {"enabled": True}}, "bf16.enabled is true, but train.precision is fp32", train=TrainConfig())
    check({"fp16": {"enabled": False}}, "fp16.enabled is false, but train.precision is fp16",
          train=TrainConfig(precision="fp16"))


def _tiny_task(assets, *, seed=0):
    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    torch.manual_seed(seed)
    model = DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2))
    return DALLETask(model, DALLEObjective(caption_drop=0.3, val_samples=8), tok, TokenShards(assets / "tok-train"),
                     TokenShards(assets / "tok-val"))


def test_gradient_accumulation_equals_the_larger_batch(assets, tmp_path):
    common = dict(steps=4, lr=3e-3, warmup_steps=1, weight_decay=0.1, eval_every=100, save_every=100)
    big = Trainer(_tiny_task(assets), TrainConfig(batch_size=8, **common), tmp_path / "a", progress=False)
    big.fit()
    acc = Trainer(_tiny_task(assets), TrainConfig(batch_size=4, grad_accum=2, **common), tmp_path / "b",
                  progress=False)
    acc.fit()
    assert acc.global_batch == 8 and acc.data_position == 32
    # Two half-batch gradients summed round differently from one batch's, and Adam divides by the root of a tiny
    # second moment where a gradient is near 0: up to 2e-6 apart after 4 steps on some CPUs. An accumulation that
    # dropped or double-counted a micro-batch moves weights by about the learning rate (3e-3) a step.
    for (k, a), b in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=k)
    start = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["effective_batch_size"] == 8 and start["grad_accum"] == 2


def test_a_zero_checkpoint_is_refused_with_the_export_command(assets, tmp_path):
    Trainer(_tiny_task(assets), TrainConfig(steps=2, batch_size=4), tmp_path, progress=False).fit()
    step = ckpt.latest_checkpoint(tmp_path)
    (step / ckpt.WEIGHTS_NAME).unlink()
    (step / ckpt.DEEPSPEED_DIR).mkdir()  # what a DeepSpeed checkpoint looks like from outside
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO .* python tools/export.py .*step-0000002 --out"):
        ckpt.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="written by the DeepSpeed back end and this run is without --deepspeed"):
        Trainer(_tiny_task(assets), TrainConfig(steps=4, batch_size=4), tmp_path, progress=False)


def test_plain_back_end_never_imports_deepspeed(tmp_path):
    args = ["--config", "configs/dvae/tiny.yaml", "--out", str(tmp_path), "--no-progress", "--set", "train.steps=2"]
    code = (f"import runpy, sys\nsys.argv = {['train_dvae.py', *args]!r}\n"
            "try:\n    runpy.run_path('tools/train_dvae.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'deepspeed' not in sys.modules, 'the plain back end imported deepspeed'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_deepspeed_run_releases_its_process_groups(tmp_path):
    # A group still referenced when the interpreter shuts down takes its gloo threads with it and the
    # process aborts after a good run ("terminate called without an active exception", exit -6).
    args = ["--config", "configs/dvae/tiny.yaml", "--out", str(tmp_path), "--no-progress", "--set", "train.steps=2",
            "--deepspeed", str(DS_CONFIGS / "zero1.json"), "--set", "train.precision=bf16"]
    code = ("import gc, runpy, sys, weakref\nimport torch.distributed as dist\nrefs = []\n"
            "new_group, init = dist.new_group, dist.init_process_group\n"
            "def recording_new_group(*a, **k):\n    g = new_group(*a, **k)\n    refs.append(weakref.ref(g))\n"
            "    return g\n"
            "def recording_init(*a, **k):\n    init(*a, **k)\n    refs.append(weakref.ref(dist.group.WORLD))\n"
            "dist.new_group, dist.init_process_group = recording_new_group, recording_init\n"
            f"sys.argv = {['train_dvae.py', *args]!r}\n"
            "try:\n    runpy.run_path('tools/train_dvae.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "gc.collect()\nassert refs, 'no process group was created'\n"
            "alive = [r() for r in refs if r() is not None]\nassert not alive, f'still referenced: {alive}'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_estimate_plans_a_zero3_run(capsys):
    assert estimate.main(["--config", "configs/dalle/paper-12b.yaml", "--gpus", "64", "--zero", "3"]) == 0
    out = capsys.readouterr().out
    assert "12,293.8 M" in out and "ZeRO-3 over 64 GPUs" in out and "1,024 sequences" in out
    with torch.device("meta"):
        n = sum(p.numel() for p in DALLE(DALLEConfig()).parameters())  # the paper's config is the default
    rows = [line for line in out.splitlines() if line.startswith("  ") and line[48:].strip()[:1].isdigit()]
    gib = {row[:48].strip(): float(row[48:].split()[0].replace(",", "")) for row in rows}
    assert gib["optimizer state"] == pytest.approx(12 * n / 64 / 2**30, abs=0.01)  # fp32 master + 2 moments / 64
    assert gib["weights"] == pytest.approx(2 * n / 64 / 2**30, abs=0.01)
    assert gib["activations, block checkpointing"] < gib["activations, stored in full"]
    n_gpu = estimate.zero_memory(1000, 4, 2, mixed=True)
    assert n_gpu == {"weights": 2000, "gradients": 500, "optimizer state": 3000}


# -- 2-process launches -----------------------------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, assets: Path, out: Path, *extra: str, timeout: int = 150) -> str:
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    else:
        ds = bin_dir / "deepspeed"
        cmd = [str(ds)] if ds.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd += ["--num_gpus", "2", "--master_port", str(_port())]
    cmd += ["tools/train_dalle.py", "--config", "configs/dalle/tiny.yaml", "--out", str(out), "--no-progress",
            "--device", "cpu", "--threads", "1", "--set", f"data.path={assets / 'tok-train'}",
            "--set", f"data.val_path={assets / 'tok-val'}", "--set", f"inputs.tokenizer={assets / 'tokenizer.json'}",
            "--set", f"inputs.dvae={assets / 'dvae'}", "--set", "train.steps=8", "--set", "train.batch_size=2",
            "--set", "train.grad_accum=2", "--set", "train.save_every=4", "--set", "train.eval_every=8",
            "--set", "train.log_every=2", "--set", "train.keep_checkpoints=3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(out.parent / "torch-extensions"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-20000:]}"
    return proc.stdout


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e["event"] == kind]


def _check_run(run: Path, stdout: str, *, zero3: bool = False) -> None:
    assert "effective batch size 8 = 2 per rank x 2 accumulation x 2 ranks" in stdout
    train = _events(run, "train")
    assert train[-1]["step"] == 8 and train[-1]["loss"] < train[0]["loss"]  # the loss falls
    assert train[-1]["nonfinite_steps"] == 0 and train[-1]["samples_per_s"] > 0 and train[-1]["tokens_per_s"] > 0
    assert {"val_text_loss", "val_image_loss"} <= set(_events(run, "eval")[-1])
    ranks = _events(run, "ranks")
    assert (ranks == []) if zero3 else (ranks[-1]["weight_spread"] == 0)  # replicas identical (ZeRO 0-2)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / ckpt.WEIGHTS_NAME))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


_RUNS: dict[tuple[int, str], Path] = {}  # uninterrupted 8-step runs, shared by the tests below


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    _RUNS.clear()
    return tmp_path_factory.mktemp("runs")


def _ddp_run(assets: Path, root: Path) -> Path:
    if (0, "ddp") not in _RUNS:
        run = root / "ddp"
        _check_run(run, _launch("torchrun", assets, run))
        _RUNS[0, "ddp"] = run
    return _RUNS[0, "ddp"]


def test_torchrun_ddp_trains_and_resumes_exactly(assets, runs_root, tmp_path):
    full = _ddp_run(assets, runs_root)
    assert _events(full, "start")[0]["backend"] == "DDP over 2 processes"
    resumed = tmp_path / "resumed"  # a new process group picks up the run's step-4 checkpoint
    _launch("torchrun", assets, resumed, "--resume", str(full / "checkpoints" / "step-0000004"))
    _assert_same(_weights(ckpt.latest_checkpoint(full)), _weights(ckpt.latest_checkpoint(resumed)))
    assert isinstance(ckpt.load_pretrained(full), DALLE)


def _deepspeed_run(assets: Path, root: Path, stage: int, precision: str) -> Path:
    if (stage, precision) not in _RUNS:
        config = json.loads((DS_CONFIGS / f"zero{stage}.json").read_text())
        if stage == 3:  # below this size ZeRO-3 keeps parameters whole; 0 splits even the tiny model's
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = root / f"zero{stage}_{precision}.json"
        path.write_text(json.dumps(config))
        run = root / f"zero{stage}-{precision}"
        extra = ["--set", "train.gradient_checkpointing=true"] if stage == 3 and precision == "bf16" else []
        stdout = _launch("deepspeed", assets, run, "--deepspeed", str(path), "--set", f"train.precision={precision}",
                         *extra)
        _check_run(run, stdout, zero3=stage == 3)
        assert "make a model directory with: python tools/export.py" in stdout
        _RUNS[stage, precision] = run
    return _RUNS[stage, precision]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_trains_and_exports(assets, runs_root, tmp_path, stage, precision):
    run = _deepspeed_run(assets, runs_root, stage, precision)
    latest = ckpt.latest_checkpoint(run)
    assert (latest / ckpt.DEEPSPEED_DIR).is_dir() and not (latest / ckpt.WEIGHTS_NAME).exists()
    assert export.main([str(run), "--out", str(tmp_path / "model")]) == 0
    model = load_pipeline(tmp_path / "model").model  # what generate.py and the eval tools load
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if stage == 2 and precision == "fp32":  # same data, optimizer and schedule as DDP: the same weights
        for k, v in _weights(ckpt.latest_checkpoint(_ddp_run(assets, runs_root))).items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16"), (3, "fp32")])
def test_deepspeed_resumes_exactly(assets, runs_root, tmp_path, stage, precision):
    full = _deepspeed_run(assets, runs_root, stage, precision)
    config = runs_root / f"zero{stage}_{precision}.json"
    extra = ["--set", "train.gradient_checkpointing=true"] if stage == 3 and precision == "bf16" else []
    resumed = tmp_path / "resumed"
    _launch("deepspeed", assets, resumed, "--deepspeed", str(config), "--set", f"train.precision={precision}",
            "--resume", str(full / "checkpoints" / "step-0000004"), *extra)
    for run in (full, resumed):
        assert export.main([str(run), "--out", str(tmp_path / f"export-{run.name}")]) == 0
    _assert_same(_weights(tmp_path / f"export-{full.name}"), _weights(tmp_path / "export-resumed"))


def test_bench_train_and_the_gpu_check_script(tmp_path):
    from dalle_tools import bench_train

    out = tmp_path / "bench.json"
    assert bench_train.main(["--config", "configs/dalle/tiny.yaml", "--out", str(tmp_path / "run"), "--json", str(out),
                             "--no-progress", "--device", "cpu", "--warmup", "1", "--set", "model.text_vocab_size=100",
                             "--set", "train.steps=4", "--set", "train.log_every=1"]) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and result["applied_steps"] == 4 and result["overflow_steps"] == 0
    assert result["tokens_per_s"] > 0 and result["seq_len"] == 28 and result["model_flops_per_token"] > 0
    subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=ROOT, check=True)  # GPU-only: syntax here
    _check_gpu_report(result, tmp_path / "gpu")


def _check_gpu_report(bf16: dict, out: Path) -> None:
    """gpu_check.sh's report on its files: this CPU run's summary as the bf16 run, and an fp16 run whose
    loss scale falls from 2^24 on overflows and rises again, then one whose scale never recovers."""
    from dalle_tools import gpu_report

    out.mkdir()
    fp16 = {**bf16, "overflow_steps": 3, "applied_steps": 27, "loss_scales": [2.0**24, 2.0**23, 2.0**22, 2.0**21,
                                                                                2.0**21, 2.0**22]}
    files = {"peak.json": {"card": "Test Card", "tflops": 1.0}, "bf16.json": bf16, "fp16.json": fp16,
             "gpu-bench.json": {"ours": {"gpu:attention": {"median_s": 0.1}}}}
    for name, data in files.items():
        (out / name).write_text(json.dumps(data))
    (out / "gpu-bench.md").write_text("| case | median |\n|---|---|\n| gpu:attention | 0.1 s |\n")
    log = out / "performance.md"
    assert gpu_report.main([str(out), "--steps", "4", "--append", str(log)]) == 0
    text = log.read_text()
    assert "## GPU check" in text and "Test Card" in text and "| bf16 | " in text and "| fp16 | " in text
    assert "skipped and recovered: yes" in text and "2^24 2^23 2^22 2^21 2^21 2^22" in text
    mfu = bf16["tokens_per_s"] * bf16["model_flops_per_token"] / 1e12
    assert f"{mfu:.1%}" in text  # MFU against the measured peak
    (out / "fp16.json").write_text(json.dumps({**fp16, "loss_scales": [2.0**24, 2.0**23, 2.0**22]}))
    assert gpu_report.main([str(out)]) == 1  # never raised again: no recovery
    (out / "fp16.json").write_text(json.dumps(fp16))
    (out / "gpu-bench.json").write_text(json.dumps({"ours": {"gpu:generate": {"error": "OOM"}}}))
    assert gpu_report.main([str(out)]) == 1
    assert text == log.read_text()  # only --append writes
