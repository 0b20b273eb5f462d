"""Tests for dalle/data/transforms.py, dalle/data/readers.py and tools/make_shards.py (fast, tiny images)."""

from __future__ import annotations

import importlib.util
import io
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from dalle.data.readers import (
    ImageTextFolder,
    collate_skip_bad,
    count_shard_samples,
    expand_shard_urls,
    sample_seed,
    webdataset_pairs,
)
from dalle.data.transforms import (
    DALLETransform,
    DVAETransform,
    EvalTransform,
    to_rgb,
    transform_from_name,
)

LOGGER = "dalle.data"
ROOT = Path(__file__).resolve().parents[1]


def _load_make_shards():  # tools/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards_main = _load_make_shards().main


# ------------------------------------------------------------------------------------------- to_rgb


def _pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    assert img.mode == "RGB"
    return [img.getpixel((x, 0)) for x in range(img.width)]


def _palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    if transparent:
        img.info["transparency"] = 0
    return img


def _mode_cases() -> dict[str, tuple[Image.Image, list[tuple[int, int, int]]]]:
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 255), (100, 0), (0, 128)])
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)])
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 255, 0, 0), (0, 0, 0, 0)])
    one = Image.new("1", (2, 1))
    one.putdata([0, 255])
    grey = Image.new("L", (2, 1))
    grey.putdata([0, 200])
    i16 = Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.uint16))
    assert i16.mode == "I;16"
    i32 = Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.int32))
    assert i32.mode == "I"
    f32 = Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32))
    assert f32.mode == "F"
    return {
        "L": (grey, [(0, 0, 0), (200, 200, 200)]),
        "LA": (la, [(100, 100, 100), (255, 255, 255), (127, 127, 127)]),
        "P": (_palette_image(False), [(10, 20, 30), (200, 100, 50)]),
        "P+transparency": (_palette_image(True), [(255, 255, 255), (200, 100, 50)]),
        "RGBA": (rgba, [(255, 0, 0), (255, 255, 255), (127, 127, 127)]),
        "CMYK": (cmyk, [(255, 0, 255), (255, 255, 255)]),
        "I;16": (i16, [(0, 0, 0), (255, 255, 255), (100, 100, 100)]),
        "I": (i32, [(0, 0, 0), (255, 255, 255), (100, 100, 100)]),
        "F": (f32, [(0, 0, 0), (255, 255, 255), (128, 128, 128)]),
        "1": (one, [(0, 0, 0), (255, 255, 255)]),
    }


@pytest.mark.parametrize("mode", list(_mode_cases()))
def test_to_rgb_modes(mode: str) -> None:
    img, expected = _mode_cases()[mode]
    out = to_rgb(img)
    got = _pixels(out)
    # alpha compositing may round either way
    assert all(
        abs(a - b) <= 1 for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True)
    ), got


def test_to_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (3, 1), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.png"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as im:
        assert to_rgb(im).size == (1, 3)


# --------------------------------------------------------------------------------------- transforms


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("cls", [DVAETransform, DALLETransform, EvalTransform])
@pytest.mark.parametrize("wh", [(50, 30), (30, 70), (16, 16), (10, 7), (300, 5)])
def test_transform_shape_range_and_seed(cls: type, wh: tuple[int, int]) -> None:
    t = cls(16)
    img = _noise(*wh)
    a = t(img, random.Random(3))
    b = t(img, random.Random(3))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)


def test_random_transforms_vary_with_seed() -> None:
    img = _noise(64, 48)
    for t in (DVAETransform(16), DALLETransform(16)):
        outs = {t(img, random.Random(s)).numpy().tobytes() for s in range(8)}
        assert len(outs) > 1


def test_flip_only_in_dvae_transform() -> None:
    # A 16x16 image at size 16: both listings reduce to identity, except that Listing 1 flips.
    img = _noise(16, 16)
    exact = EvalTransform(16)(img)
    flipped = exact.flip(-1)
    dvae = [DVAETransform(16)(img, random.Random(s)) for s in range(20)]
    assert all(torch.equal(x, exact) or torch.equal(x, flipped) for x in dvae)
    assert any(torch.equal(x, flipped) for x in dvae) and any(torch.equal(x, exact) for x in dvae)
    assert all(torch.equal(DALLETransform(16)(img, random.Random(s)), exact) for s in range(20))


def test_eval_transform_is_centre_crop() -> None:
    img = Image.new("RGB", (48, 16), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 16))  # blue centre square
    out = EvalTransform(16)(img)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 16))


def test_transform_from_name() -> None:
    assert isinstance(transform_from_name("dvae", 8), DVAETransform)
    assert isinstance(transform_from_name("dalle", 8), DALLETransform)
    assert isinstance(transform_from_name("eval", 8), EvalTransform)
    with pytest.raises(ValueError, match="'dvae', 'dalle', 'eval'"):
        transform_from_name("nope", 8)


# ------------------------------------------------------------------------------------- folder reader


def _png_bytes(w: int = 20, h: int = 12, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    _noise(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def _make_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_png_bytes(seed=1))
    (root / "a.txt").write_text("cap one\n\n   \ncap two\n")
    (root / "a.json").write_text('{"id": 1}')
    _noise(24, 16, 2).save(root / "sub" / "b.JPG")
    (root / "sub" / "b.txt").write_text("a photo of b")
    _noise(16, 16, 3).save(root / "w.webp")
    (root / "w.txt").write_text("webp caption")
    (root / "c.png").write_bytes(_png_bytes(seed=4))  # no caption file
    (root / "d.png").write_bytes(_png_bytes(seed=5))
    (root / "d.txt").write_text(" \n\n")  # empty caption
    (root / "e.jpg").write_bytes(b"this is not a jpeg at all")  # garbage
    (root / "e.txt").write_text("garbage image")
    full = _png_bytes(64, 64, seed=6)
    (root / "f.png").write_bytes(full[: len(full) // 2])  # truncated
    (root / "f.txt").write_text("truncated image")
    (root / "notes.md").write_text("not an image")


def test_folder_reader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageTextFolder(tmp_path, EvalTransform(8))
    assert [e.key for e in ds.entries] == ["a", "e", "f", "w", "sub/b"]
    assert ds.num_skipped_at_scan == 2
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("c.png" in m and "no caption" in m for m in msgs)
    assert any("d.png" in m and "empty caption" in m for m in msgs)
    assert any("using 5 images, skipped 2 of 7" in m for m in msgs)

    s = ds[0]
    assert s["image"].shape == (3, 8, 8) and s["key"] == "a" and s["meta"] == '{"id": 1}'
    assert {ds[(0, seed)]["caption"] for seed in range(30)} == {"cap one", "cap two"}
    assert ds[(0, 7)]["caption"] == ds[(0, 7)]["caption"]
    assert ds[4]["caption"] == "a photo of b" and "meta" not in ds[4]
    assert ds[3]["caption"] == "webp caption"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ds[1] is None and ds[2] is None
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(msgs) == 2 and str(tmp_path / "e.jpg") in msgs[0] and str(tmp_path / "f.png") in msgs[1]


def test_folder_reader_reproducible_with_random_transform(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    ds = ImageTextFolder(tmp_path, DVAETransform(8), seed=1)
    assert torch.equal(ds[0]["image"], ds[0]["image"])
    assert torch.equal(ds[(4, 123)]["image"], ds[(4, 123)]["image"])
    other = ImageTextFolder(tmp_path, DVAETransform(8), seed=2)
    assert any(not torch.equal(ds[i]["image"], other[i]["image"]) for i in (0, 3, 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_reader_dataloader_counts_skips(tmp_path: Path, workers: int) -> None:
    _make_folder(tmp_path)
    ds = ImageTextFolder(tmp_path, DALLETransform(8))
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_skip_bad)
    skipped = images = 0
    for batch in loader:
        skipped += batch["skipped"]
        if "image" in batch:
            assert batch["image"].shape[1:] == (3, 8, 8)
            assert len(batch["caption"]) == len(batch["key"]) == batch["image"].shape[0]
            images += batch["image"].shape[0]
    assert (skipped, images) == (2, 3)


def test_collate_skip_bad() -> None:
    assert collate_skip_bad([None, None]) == {"skipped": 2}
    a = {"image": torch.zeros(3, 4, 4), "caption": "x", "key": "a", "meta": "{}"}
    b = {"image": torch.ones(3, 4, 4), "caption": "y", "key": "b"}
    batch = collate_skip_bad([a, None, b])
    assert batch["skipped"] == 1 and batch["image"].shape == (2, 3, 4, 4)
    assert batch["caption"] == ["x", "y"] and batch["meta"] == ["{}", None]


def test_folder_reader_empty_and_uncaptioned(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images .* found under " + str(tmp_path)):
        ImageTextFolder(tmp_path, EvalTransform(8))
    (tmp_path / "x.png").write_bytes(_png_bytes())
    with pytest.raises(ValueError, match="require_captions=False"):
        ImageTextFolder(tmp_path, EvalTransform(8))
    ds = ImageTextFolder(tmp_path, EvalTransform(8), require_captions=False)
    assert len(ds) == 1 and ds[0]["caption"] == ""
    with pytest.raises(ValueError, match="does not exist"):
        ImageTextFolder(tmp_path / "missing", EvalTransform(8))


# --------------------------------------------------------------------------------- webdataset reader


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    _make_folder(src)
    out = tmp_path / "shards"
    assert make_shards_main(["--src", str(src), "--out", str(out), "--shard-size", "3"]) == 0
    return out


def test_make_shards_layout(shards: Path) -> None:
    assert sorted(p.name for p in shards.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(SystemExit, match="already holds shard-000000.tar: choose another --out, or pass --overwrite"):
        make_shards_main(["--src", str(shards.parent / "src"), "--out", str(shards), "--shard-size", "1"])
    assert sorted(p.name for p in shards.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]  # untouched
    assert count_shard_samples(str(shards / "shard-{000000..000001}.tar")) == 5
    names = [n for url in sorted(shards.iterdir()) for n in _tar_names(url)]
    assert "a.png" in names and "a.json" in names and "sub/b.jpg" in names and "e.jpg" in names


def _tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_make_shards_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_folder(tmp_path / "src")
    rc = make_shards_main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--verify-images"])
    assert rc == 0
    assert "wrote 3 samples in 1 shards" in capsys.readouterr().out  # e.jpg and f.png fail to decode
    assert make_shards_main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2


def test_webdataset_reader_reads_back_all(shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    pattern = str(shards / "shard-{000000..000001}.tar")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        samples = list(webdataset_pairs(pattern, EvalTransform(8), shuffle=0))
    good = [s for s in samples if s is not None]
    assert len(samples) == 5 and len(good) == 3
    assert sorted(s["key"] for s in good) == ["a", "sub/b", "w"]
    a = next(s for s in good if s["key"] == "a")
    assert a["caption"] in ("cap one", "cap two") and a["meta"] == '{"id": 1}'
    assert a["image"].shape == (3, 8, 8)
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("'e'" in m and "unreadable" in m for m in msgs) == 1
    assert sum("'f'" in m and "unreadable" in m for m in msgs) == 1


def test_webdataset_reader_deterministic_shuffle(shards: Path) -> None:
    urls = sorted(str(p) for p in shards.iterdir())

    def keys(seed: int, epoch: int = 0) -> list[str]:
        ds = webdataset_pairs(urls, DVAETransform(8), shuffle=10, seed=seed)
        ds.set_epoch(epoch)
        return [s["key"] if s else "-" for s in ds]

    assert keys(1) == keys(1)
    assert sorted(keys(1)) == sorted(keys(2)) == ["-", "-", "a", "sub/b", "w"]
    ds = webdataset_pairs(urls, DVAETransform(8), shuffle=10, seed=1)
    first = {s["key"]: s["image"] for s in ds if s}
    again = {s["key"]: s["image"] for s in ds if s}
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_webdataset_reader_dataloader_counts_skips(shards: Path) -> None:
    ds = webdataset_pairs(str(shards / "shard-{000000..000001}.tar"), DALLETransform(8), shuffle=4)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 2
    assert sorted(k for b in batches for k in b.get("key", [])) == ["a", "sub/b", "w"]


def test_webdataset_reader_resampled_epoch_length(shards: Path) -> None:
    ds = webdataset_pairs(str(shards), EvalTransform(8), resampled=True, epoch_length=7, shuffle=0)
    assert len(list(ds)) == 7


def test_webdataset_reader_skips_missing_image_and_caption(tmp_path: Path) -> None:
    path = tmp_path / "manual.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "ok", "png": _png_bytes(), "txt": b"fine"})
        sink.write({"__key__": "noimg", "txt": b"caption only"})
        sink.write({"__key__": "nocap", "png": _png_bytes()})
        sink.write({"__key__": "emptycap", "png": _png_bytes(), "txt": b"\n \n"})
    got = [s["key"] if s else None for s in webdataset_pairs(str(path), EvalTransform(8), shuffle=0)]
    assert got == ["ok", None, None, None]
    lax = webdataset_pairs(str(path), EvalTransform(8), shuffle=0, require_captions=False)
    assert [s["caption"] if s else None for s in lax] == ["fine", None, "", ""]


def test_webdataset_reader_bad_patterns(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(ValueError, match="nothing-"):
        webdataset_pairs(pattern, EvalTransform(8))
    with pytest.raises(ValueError, match="matches no files"):
        expand_shard_urls(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="empty shard list"):
        webdataset_pairs([], EvalTransform(8))


def test_sample_seed_is_stable() -> None:
    assert sample_seed("wds", 0, "abc") == sample_seed("wds", 0, "abc")
    assert sample_seed("wds", 0, "abc") != sample_seed("wds", 1, "abc")
    assert 0 <= sample_seed(1, 2) < 2**63


class _RecordingRandom(random.Random):
    """Records the ranges the transforms draw from, to check them against the paper's listings."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.calls: list[tuple[str, int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.calls.append(("randint", a, b))
        return random.Random.randrange(self, a, b + 1)  # what randint does, without recording twice

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        self.calls.append(("randrange", start, stop))
        return super().randrange(start, stop, step)


def test_transform_ranges_follow_listings() -> None:
    # Listing 1: crop offsets of a s_min square, t in [round(9/8 s), round(12/8 s)] clipped to s_min.
    rng = _RecordingRandom(0)
    DVAETransform(16)(_noise(40, 30), rng)
    assert rng.calls[:3] == [("randint", 0, 0), ("randint", 0, 10), ("randint", 18, 24)]
    rng = _RecordingRandom(0)
    DVAETransform(16)(_noise(20, 20), rng)
    assert rng.calls[2] == ("randint", 18, 20)  # t_max clipped to s_min
    # Listing 2: near-centre offsets in [3d//8, max(3d//8 + 1, 5d//8)), t in [s, min(s_min, round(9/8 s))].
    rng = _RecordingRandom(0)
    DALLETransform(16)(_noise(30, 62), rng)  # h - s_min = 32
    assert rng.calls[:3] == [("randrange", 12, 20), ("randrange", 0, 1), ("randint", 16, 18)]


def test_webdataset_reader_splits_by_node(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = webdataset_pairs(str(shards), EvalTransform(8), shuffle=10, seed=3)
        keys.append({s["key"] if s else f"bad{rank}" for s in ds})
    assert keys[0].isdisjoint(keys[1]) and len(keys[0]) > 0 and len(keys[1]) > 0
    assert keys[0] | keys[1] >= {"a", "sub/b", "w"}


def test_webdataset_reader_survives_truncated_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "png": _png_bytes(seed=i), "txt": b"c"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = [s["key"] for s in webdataset_pairs(str(path), EvalTransform(8), shuffle=0) if s]
    assert 0 < len(got) < 4
    assert any("skipping rest of a shard" in r.getMessage() for r in caplog.records)


def test_folder_reader_set_epoch_changes_int_seeds(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    ds = ImageTextFolder(tmp_path, DVAETransform(8))
    before = [ds[i]["image"] for i in (0, 3, 4)]
    ds.set_epoch(1)
    after = [ds[i]["image"] for i in (0, 3, 4)]
    assert any(not torch.equal(x, y) for x, y in zip(before, after, strict=True))
    ds.set_epoch(0)
    assert all(torch.equal(x, ds[i]["image"]) for x, i in zip(before, (0, 3, 4), strict=True))
