"""Nothing lost, nothing executed: prompts in any script, bad flags, and data that is broken in the ways
real data is (captions missing, blank or not UTF-8; images whose header promises billions of pixels).

Bad flags are checked in-process (`main([...])` raises SystemExit 2 with argparse's message); a few
subprocesses check what a user sees: one line on stderr, no Python traceback unless --debug.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

import generate
from dalle import cli
from dalle.data.readers import ImageTextFolder, WebDatasetReader, collate_skip_bad
from dalle.data.sources import DataConfig
from dalle.data.transforms import EvalTransform
from dalle.train.checkpoints import latest_checkpoint
from dalle.train.config import TrainConfig
from dalle_tools import (
    bench,
    bench_train,
    console,
    estimate,
    eval_dvae,
    eval_fid,
    eval_shapes,
    make_shapes,
    make_shards,
    pretokenize,
    train_bpe,
    train_dalle,
    train_dvae,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "A RED CIRCLE!", "🔴🟦", "中文", "دائرة حمراء", "עיגול אדום", "a red circle", "🔴🟦"]


def _gen(tiny_parts: Path, *argv: str) -> int:
    return generate.main([*argv, "--model", str(tiny_parts / "model"), "--device", "cpu", "--no-progress"])


def test_every_prompt_in_any_script_keeps_its_images(tiny_parts, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--prompts", str(prompts), "--num-images", "1", "--candidates", "1", "--out", str(out)]
    assert _gen(tiny_parts, *args) == 0
    pngs, sidecars = sorted(out.glob("*.png")), sorted(out.glob("*.json"))
    assert len(pngs) == len(sidecars) == len(PROMPTS)  # duplicates and emoji-only prompts too
    metas = sorted((json.loads(p.read_text(encoding="utf-8")) for p in sidecars), key=lambda m: m["position"])
    assert [(m["position"], m["prompt"]) for m in metas] == list(enumerate(PROMPTS, 1))
    for sidecar in sidecars:
        assert sidecar.with_suffix(".png").is_file()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="--overwrite"):
        _gen(tiny_parts, *args, "--seed", "7")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused, and wrote nothing
    assert _gen(tiny_parts, *args, "--seed", "7", "--overwrite") == 0
    assert {p.name for p in out.iterdir()} == set(before)
    assert all(json.loads(p.read_text(encoding="utf-8"))["seed"] == 7 for p in sidecars)


BIG_SEED = str(2**64 + 3)
GENERATE_BAD = [
    ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
    ("--temperature", "1e-45"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-5"), ("--top-k", "2.5"),
    ("--seed", "20000000000000000000"), ("--seed", "-1"), ("--cond-scale", "nan"), ("--cond-scale", "-inf"),
    ("--prime-rows", "-1"), ("--num-images", "0"), ("--batch-size", "-1"), ("--batch-memory", "0"),
    ("--candidates", "-2"),
]


@pytest.mark.parametrize("flag,value", GENERATE_BAD)
def test_generate_rejects_bad_flags_at_parse_time(flag, value, tiny_parts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _gen(tiny_parts, "a red circle", f"{flag}={value}", "--out", str(tmp_path / "out"))  # = lets "-inf" in
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected a" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


TOOLS_BAD = [
    (make_shapes, ["--n", "0"]), (make_shapes, ["--seed", "-3"]), (make_shapes, ["--shard-size", "0"]),
    (make_shards, ["--shard-size", "-1"]),
    (train_bpe, ["--vocab", "10"]), (train_bpe, ["--min-frequency", "0"]), (train_bpe, ["--seed", BIG_SEED]),
    (pretokenize, ["--workers", "-1"]), (pretokenize, ["--batch-size", "0"]), (pretokenize, ["--n", "-4"]),
    (eval_dvae, ["--n", "0"]), (eval_dvae, ["--grid-images", "0"]), (eval_dvae, ["--detector", "-1"]),
    (eval_shapes, ["--temperature", "nan"]), (eval_shapes, ["--cond-scale", "1", "nan"]),
    (eval_shapes, ["--candidates", "0"]), (eval_shapes, ["--jpeg", "101"]), (eval_shapes, ["--top-p", "2"]),
    (eval_fid, ["--n", "1"]), (eval_fid, ["--blur", "nan"]), (eval_fid, ["--cond-scale", "inf"]),
    (eval_fid, ["--top-k", "-1"]), (estimate, ["--gpus", "0"]), (bench, ["--threads", "0"]),
    (bench, ["--max-wait", "nan"]), (bench_train, ["--warmup", "-1"]), (train_dvae, ["--threads", "-1"]),
    (train_dalle, ["--local_rank", "-2"]),
]


@pytest.mark.parametrize("tool,argv", TOOLS_BAD, ids=[f"{t.__name__.split('.')[-1]}{a[0]}" for t, a in TOOLS_BAD])
def test_tools_reject_bad_numeric_flags(tool, argv, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[0]}" in err and "expected a" in err, err


def test_generate_checks_prime_rows_against_the_model_grid(tiny_parts, tmp_path):
    image = tmp_path / "prime.png"
    Image.new("RGB", (32, 32), "red").save(image)
    with pytest.raises(SystemExit, match=r"--prime-rows 4: .* 4x4 code grid, so 1\.\.3 rows"):
        _gen(tiny_parts, "x", "--prime-image", str(image), "--prime-rows", "4", "--out", str(tmp_path / "o"))
    with pytest.raises(SystemExit) as e:  # seeds SEED + c for c < candidates must stay within torch's range
        generate.main(["x", "--seed", str(2**64 - 1), "--candidates", "2", "--num-images", "1"])
    assert e.value.code == 2


def test_generate_names_the_file_and_line_of_a_prompt_that_is_not_utf8(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\n中文\n".encode() + b"caf\xe9 au lait\n")
    with pytest.raises(SystemExit):
        generate.main(["--prompts", str(prompts)])
    err = capsys.readouterr().err
    assert f"--prompts {prompts}: line 3 is not UTF-8" in err and "Traceback" not in err


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_users_mistake_is_one_line_without_a_traceback_unless_debug(tmp_path):
    proc = _run("generate.py", "a red circle", "--cond-scale", "nan", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "argument --cond-scale" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    missing = tmp_path / "missing.yaml"
    proc = _run("tools/train_dvae.py", "--config", str(missing), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"train_dvae.py: error: config file {missing} does not exist "
                                                "(--debug shows the traceback)"]
    proc = _run("tools/train_dvae.py", "--config", str(missing), "--out", str(tmp_path / "run"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_run_turns_user_errors_into_exit_2_and_keeps_bugs(capsys):
    def bad_value(argv):
        raise ValueError("data.path\nis empty")

    def missing_file(argv):
        raise FileNotFoundError(2, "No such file or directory", "/no/such.yaml")

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    for main, message in ((bad_value, "data.path is empty"), (missing_file, "/no/such.yaml: No such file")):
        with pytest.raises(SystemExit) as e:
            cli.run(main, [])
        assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError):
        cli.run(bad_value, ["--debug"])
    with pytest.raises(KeyError):
        cli.run(bug, [])


def test_console_entry_points_run_their_tool_under_the_wrapper(monkeypatch, capsys):
    scripts = re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
    assert len(scripts) >= 14
    for name, module, attr in scripts:
        entry = getattr(__import__(module, fromlist=[attr]), attr)
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as e:
            entry()
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
        assert e.value.code == 0 and "--debug" in out, name
        # a default is shown where it says something: not a path on this machine, not None, False, "" or []
        assert str(ROOT) not in out and not re.search(r"\(default: (None|False|\[\])?\)", out), name
    monkeypatch.setattr(sys, "argv", ["dalle-estimate", "--config", "/no/such.yaml"])  # raises FileNotFoundError
    with pytest.raises(SystemExit) as e:
        console.estimate()
    assert e.value.code == 2
    assert capsys.readouterr().err == "dalle-estimate: error: config file /no/such.yaml does not exist " \
                                      "(--debug shows the traceback)\n"


def test_help_shows_the_defaults_that_say_something():
    import argparse

    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="steps (0: until the budget)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate")
    p.add_argument("--model", default="/home/me/model", help="model (default: the shipped one)")
    p.add_argument("--name", default="", help="run name")
    p.add_argument("--dvae", default=None, help="dVAE directory")
    p.add_argument("--tag", action="append", default=[], help="a tag")
    p.add_argument("--grid", action="store_true", help="write a grid")
    text = " ".join(p.format_help().split())
    assert "steps (0: until the budget) (default: 0)" in text and "learning rate (default: 0.0003)" in text
    assert "model (default: the shipped one) --name" in text and "/home/me" not in text
    for flag in ("run name", "dVAE directory", "a tag", "write a grid"):
        assert f"{flag} (default" not in text


# ------------------------------------------------------------------------------------------------ data


def _folder(tmp_path: Path, n: int = 24) -> Path:
    data = tmp_path / "data"
    assert make_shapes.main(["--n", str(n), "--out", str(data), "--image-size", "32"]) == 0
    return data


def test_folder_edge_cases_are_warned_once_and_counted(tmp_path, caplog):
    data = _folder(tmp_path)
    pngs = sorted(data.glob("*.png"))
    pngs[0].with_suffix(".txt").unlink()  # missing caption
    pngs[1].with_suffix(".txt").write_text("  \n\n", encoding="utf-8")  # blank caption
    pngs[2].with_suffix(".txt").write_bytes(b"a red caf\xe9 circle\n")  # Latin-1, not UTF-8
    # 6000 x 6000 = 36 MP, over the default limit of 2**25 (33.5 MP) at image_size 32: a 1-bit PNG of a few KB
    Image.new("1", (6000, 6000)).save(pngs[3])
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="dalle"):
        assert train_dvae.main(["--config", "configs/dvae/tiny.yaml", "--out", str(run), "--no-progress",
                                "--set", "data.source=folder", "--set", f"data.path={data}",
                                "--set", "train.steps=6", "--set", "train.eval_every=6"]) == 0
    state = json.loads((latest_checkpoint(run) / "train" / "state.json").read_text())
    # 2 dropped at scan (missing, blank) + the 36 MP image each time it was drawn (48 draws of 22 images)
    assert state["counters"]["skipped_samples"] >= 3
    assert state["counters"]["non_utf8_captions"] >= 1
    for png in pngs[:2]:  # the training folder is scanned again for validation: still one warning each
        assert sum(str(png) in r.getMessage() and "without caption" in r.getMessage() for r in caplog.records) == 1
    assert sum(str(pngs[2].with_suffix(".txt")) in r.getMessage() and "not UTF-8" in r.getMessage()
               for r in caplog.records) == 1
    assert any(str(pngs[3]) in r.getMessage() and "6000x6000" in r.getMessage() and "data.max_pixels" in
               r.getMessage() for r in caplog.records)


def test_oversized_images_are_skipped_before_decoding(tmp_path, monkeypatch, caplog):
    data = _folder(tmp_path, 2)
    big, small = sorted(data.glob("*.png"))
    Image.new("RGB", (40, 40)).save(big)  # 1600 pixels
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    ds = ImageTextFolder(data, EvalTransform(32), max_pixels=32 * 32)
    with caplog.at_level(logging.WARNING, logger="dalle.data"):
        batch = collate_skip_bad([ds[0], ds[1]])
    assert batch["skipped"] == 1 and batch["image"].shape == (1, 3, 32, 32)
    assert (40, 40) not in loads and (32, 32) in loads  # the big one was never decoded
    assert "40x40 = 1,600 pixels, over data.max_pixels 1,024" in caplog.text
    with pytest.raises(ValueError, match="max_pixels"):
        DataConfig(max_pixels=-1)


def test_webdataset_caption_that_is_not_utf8_is_warned_and_counted(tmp_path, caplog):
    shard = tmp_path / "shard-000000.tar"
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(png, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("a", b"a blue square"), ("b", b"caf\xe9 bleu")):
            for ext, payload in (("png", png.getvalue()), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = WebDatasetReader(str(shard), EvalTransform(32), shuffle=0)
    with caplog.at_level(logging.WARNING, logger="dalle.data"):
        batch = collate_skip_bad(list(ds))
    assert batch["non_utf8_captions"] == 1 and batch["skipped"] == 0 and len(batch["caption"]) == 2
    assert batch["caption"][1] == "caf\ufffd bleu" and "non_utf8_caption" not in batch
    assert "'b'" in caplog.text and "not UTF-8" in caplog.text


# ------------------------------------------------------------------------------------ collective timeout


def test_collective_timeout_reaches_the_process_group(monkeypatch, tmp_path):
    import torch.distributed as dist

    from dalle.train import engine

    with pytest.raises(ValueError, match="collective_timeout_minutes"):
        TrainConfig(collective_timeout_minutes=0)
    seen = {}

    class Reached(Exception):
        pass

    def init_process_group(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise Reached

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Reached):  # the Trainer builds its back end first, before it touches the task
        engine.Trainer(None, TrainConfig(collective_timeout_minutes=2.5), tmp_path, device="cpu")
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=2.5)}


@pytest.mark.parametrize("damage", ["pickle", "truncated", "wrong_rows"])
def test_a_damaged_token_shard_is_named_before_training_starts(tmp_path, damage):
    from dalle.data.tokens import TokenShards, TokenShardWriter

    out = tmp_path / "tok"
    writer = TokenShardWriter(out, grid=4, image_vocab_size=64, shard_size=3)
    writer.add([f"k{i}" for i in range(5)], [["a red circle"]] * 5, torch.randint(0, 64, (5, 4, 4)))
    writer.close()
    shard = out / "tokens-000001.safetensors"
    if damage == "pickle":
        torch.save({"codes": torch.zeros(2, 4, 4)}, shard)  # a pickle under a safetensors name
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    else:
        (out / "tokens-000001.jsonl").write_text('{"key": "k3", "captions": ["x"]}\n')
    with pytest.raises(ValueError, match=r"tokens-000001\.safetensors .*tools/pretokenize\.py"):
        TokenShards(out)


def test_a_stage_input_that_is_missing_names_its_key_and_the_tool_that_makes_it(tiny_parts, tmp_path):
    from dalle_tools import train_dalle, train_reranker

    for tool, config, key, maker, extra in (
            (train_dalle, "configs/dalle/tiny.yaml", "inputs.tokenizer", "train_bpe.py", []),
            (train_dalle, "configs/dalle/tiny.yaml", "inputs.dvae", "train_dvae.py",
             ["--set", f"inputs.tokenizer={tiny_parts / 'model' / 'tokenizer.json'}"]),
            (train_reranker, "configs/reranker/tiny.yaml", "inputs.tokenizer", "train_bpe.py", [])):
        missing = tmp_path / "missing"
        with pytest.raises(SystemExit, match=rf"^{key} {missing} does not exist: train one with tools/{maker}"):
            tool.main(["--config", config, "--out", str(tmp_path / "run"), "--set", f"{key}={missing}", *extra])
        assert not (tmp_path / "run").exists()
