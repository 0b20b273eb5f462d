"""data.background and data.preprocess do what docs/own-data.md says; the FID's floor and ceiling; the
training time limit that tools/train_all.py sets from its budget."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dalle.data.sources import DataConfig, build_dataset
from dalle.data.transforms import EvalTransform, to_rgb
from dalle.evaluation.fid import floor_and_ceiling, statistics


def _icon_folder(root, n: int = 4):
    """Transparent 64x64 icons: an opaque blue frame 4 px wide around a transparent middle."""
    root.mkdir()
    for i in range(n):
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        im.paste((0, 0, 255, 255), (0, 0, 64, 4))
        im.paste((0, 0, 255, 255), (0, 60, 64, 64))
        im.paste((0, 0, 255, 255), (0, 0, 4, 64))
        im.paste((0, 0, 255, 255), (60, 0, 64, 64))
        im.save(root / f"icon{i}.png")
        (root / f"icon{i}.txt").write_text(f"a blue frame {i}\n")
    return root


@pytest.mark.parametrize("background, rgb", [("white", (1.0, 1.0, 1.0)), ("black", (0.0, 0.0, 0.0)),
                                             ("#ff8000", (1.0, 128 / 255, 0.0))])
def test_transparent_pixels_take_the_configured_background(tmp_path, background, rgb) -> None:
    data = DataConfig(source="folder", path=str(_icon_folder(tmp_path / "icons")), background=background)
    image = build_dataset(data, "train", 32, "dvae")[0]["image"]  # (3, 32, 32)
    assert torch.allclose(image[:, 16, 16], torch.tensor(rgb), atol=1 / 255)  # the transparent middle
    assert torch.allclose(image[:, 0, 16], torch.tensor([0.0, 0.0, 1.0]), atol=1 / 255)  # the opaque frame


def test_white_is_the_default_background() -> None:
    im = Image.new("LA", (2, 2), (0, 0))
    assert DataConfig().background == "white" and to_rgb(im).getpixel((0, 0)) == (255, 255, 255)


def test_center_preprocessing_keeps_the_whole_frame_and_paper_crops_it(tmp_path) -> None:
    folder = _icon_folder(tmp_path / "icons", n=1)
    whole = EvalTransform(32)(to_rgb(Image.open(folder / "icon0.png")))
    for transform in ("dvae", "dalle"):
        center = build_dataset(DataConfig(source="folder", path=str(folder), preprocess="center"), "train", 32,
                               transform)
        for epoch in range(6):
            center.set_epoch(epoch)
            assert torch.equal(center[0]["image"], whole)  # every draw: the whole icon, frame and all
    paper = build_dataset(DataConfig(source="folder", path=str(folder)), "train", 32, "dvae")
    frames = []
    for epoch in range(6):
        paper.set_epoch(epoch)
        frames.append(paper[0]["image"])
    # Listing 1 resizes to 36..48 px and crops 32: the frame (blue at every border) is cut away somewhere.
    assert any(not torch.equal(f, whole) for f in frames)
    assert any(f[2, :, 0].mean() < 0.99 or f[2, 0, :].mean() < 0.99 or f[0, :, 0].mean() > 0.01 for f in frames)


def test_bad_background_or_preprocess_names_the_key() -> None:
    with pytest.raises(ValueError, match="data.background 'whitish' is not a colour"):
        DataConfig(background="whitish")
    with pytest.raises(ValueError, match="data.preprocess must be one of"):
        DataConfig(preprocess="crop")


class _MeanStd:
    """A feature extractor with no download: per-channel mean and spread of each image."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 255
        feats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        return feats, torch.softmax(feats, 1)


class _Identity(torch.nn.Module):
    """A 'dVAE' that reconstructs exactly, or (blank=True) always decodes to mid-grey."""

    def __init__(self, blank: bool = False) -> None:
        super().__init__()
        self.w, self.blank = torch.nn.Parameter(torch.zeros(())), blank

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.full_like(codes, 0.5) if self.blank else codes


def test_fid_floor_and_ceiling_put_the_model_on_a_scale() -> None:
    g = torch.Generator().manual_seed(0)
    held = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    train = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    ex = _MeanStd()
    ref = {0.0: statistics(ex(held)[0])}
    exact = floor_and_ceiling(ex, ref, train, _Identity(), batch_size=16)
    blank = floor_and_ceiling(ex, ref, train, _Identity(blank=True), batch_size=16)
    assert exact["floor"][0.0] > 0  # two samples of one distribution: FID's own noise at this N
    assert exact["ceiling"][0.0] == pytest.approx(exact["floor"][0.0])  # a perfect dVAE costs nothing
    assert blank["ceiling"][0.0] > 10 * blank["floor"][0.0]  # a dVAE that loses the image is far off
    same = floor_and_ceiling(ex, ref, held, _Identity(), batch_size=16)
    assert same["floor"][0.0] == pytest.approx(0.0, abs=1e-6)


def test_time_limit_stops_training_at_an_evaluation_with_a_checkpoint(tmp_path, monkeypatch) -> None:
    from dalle.train import engine
    from dalle.train.config import TrainConfig
    from dalle_tools import train_dvae

    clock = iter(range(0, 10_000, 7))  # every reading of the clock: 7 s later
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    out = tmp_path / "run"
    assert train_dvae.main(["--config", "configs/dvae/tiny.yaml", "--out", str(out), "--threads", "1",
                            "--no-progress", "--set", "train.steps=40", "--set", "train.eval_every=5",
                            "--set", "train.time_limit_minutes=0.5"]) == 0
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    assert max(steps) < 40 and max(steps) % 5 == 0  # stopped at an evaluation, long before the end
    # The limit counts the run's training time across resumes: run again, it stops at its first evaluation.
    first = max(steps)
    held = json.loads((out / "checkpoints" / f"step-{first:07d}" / "train" / "state.json").read_text())["seconds"]
    assert held > 30
    assert train_dvae.main(["--config", "configs/dvae/tiny.yaml", "--out", str(out), "--threads", "1",
                            "--no-progress", "--set", "train.steps=40", "--set", "train.eval_every=5",
                            "--set", "train.time_limit_minutes=0.5"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{first + 5:07d}"
    starts = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert [e["seconds_before"] for e in starts] == [0.0, held]
    with pytest.raises(ValueError, match="time_limit_minutes"):
        TrainConfig(time_limit_minutes=-1)
