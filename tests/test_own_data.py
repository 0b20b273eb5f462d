"""Your own images end to end: every caption line reaches the token shards, and threads never oversubscribe."""

from __future__ import annotations

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
                             str(tmp_path / "imgs"), "--out", str(out), "--device", "cpu", "--threads", "1"]) == 0
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
