"""Tests for the synthetic shapes generator (dalle/data/shapes.py) and tools/make_shapes.py."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data import shapes
from dalle.data.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    HELDOUT_TRIPLES,
    SHAPES,
    Scene,
    ShapesDataset,
    heldout_kinds,
    make_caption,
    make_sample,
    render,
    sample_scene,
)

ROOT = Path(__file__).resolve().parents[1]


def _scenes(split: str, n: int, image_size: int = 64) -> list[Scene]:
    return [sample_scene(random.Random(i), split, image_size=image_size) for i in range(n)]


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    return _scenes("train", 3000)


@pytest.fixture(scope="module")
def zeroshot_scenes() -> list[Scene]:
    return _scenes("zeroshot", 1500)


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_shapes", ROOT / "tools" / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_determinism_same_index_identical() -> None:
    for split in shapes.SPLITS:
        a, b = make_sample(7, split, seed=3), make_sample(7, split, seed=3)
        assert a.caption == b.caption and a.scene == b.scene and a.mentions == b.mentions
        assert a.image.tobytes() == b.image.tobytes()


def test_different_index_seed_or_split_differs() -> None:
    base = make_sample(0)
    for other in (make_sample(1), make_sample(0, seed=1), make_sample(0, "val")):
        assert other.scene != base.scene
    digests = {make_sample(i).image.tobytes() for i in range(50)}
    assert len(digests) == 50


def _png_digest(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_determinism_across_processes() -> None:
    # Seeds must not depend on Python's per-process string hash salt; the PNG must be byte-identical.
    code = (
        "import hashlib, io; from dalle.data.shapes import make_sample as m; s = m(11, 'zeroshot', 5);"
        "b = io.BytesIO(); s.image.save(b, format='PNG');"
        "print(s.caption, s.to_json(), hashlib.sha256(b.getvalue()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    s = make_sample(11, "zeroshot", 5)
    assert out.stdout.strip() == f"{s.caption} {s.to_json()} {_png_digest(s.image)}"


def test_heldout_constants_are_latin_square_style() -> None:
    assert len(HELDOUT_PAIRS) == 8 and len(set(HELDOUT_PAIRS)) == 8
    assert sorted(c for c, _ in HELDOUT_PAIRS) == sorted(COLOURS)
    assert max(collections.Counter(s for _, s in HELDOUT_PAIRS).values()) <= 2
    assert all(a != b and r in shapes.RELATIONS for a, r, b in HELDOUT_TRIPLES)


def test_train_and_val_never_contain_heldout(train_scenes: list[Scene]) -> None:
    assert all(not heldout_kinds(s) for s in train_scenes)
    assert all(not heldout_kinds(s) for s in _scenes("val", 500))
    # The converse form of a held-out triple is the same image, so it must be excluded too.
    for s in train_scenes:
        if s.relation is not None:
            a, b = s.objects
            triple = (b.shape, shapes.CONVERSE[s.relation], a.shape)
            assert triple not in HELDOUT_TRIPLES and (a.shape, s.relation, b.shape) not in HELDOUT_TRIPLES


def test_train_covers_every_colour_shape_and_partner(train_scenes: list[Scene]) -> None:
    seen = {(o.colour, o.shape) for s in train_scenes for o in s.objects}
    assert seen == set(shapes.TRAIN_PAIRS)
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    assert {len(s.objects) for s in train_scenes} == {1, 2}
    assert {s.relation for s in train_scenes} == {None, *shapes.RELATIONS}


def test_zeroshot_always_heldout_and_covers_all(zeroshot_scenes: list[Scene]) -> None:
    pairs, triples = set(), set()
    for s in zeroshot_scenes:
        kinds = heldout_kinds(s)
        assert len(kinds) == 1, "each zero-shot scene tests exactly one novelty"
        pairs |= {(o.colour, o.shape) for o in s.objects} & set(HELDOUT_PAIRS)
        if s.relation is not None:
            a, b = s.objects
            triples.add((a.shape, s.relation, b.shape))
    assert pairs == set(HELDOUT_PAIRS)
    assert set(HELDOUT_TRIPLES) <= triples


@pytest.mark.parametrize("image_size", [16, 64, 100])
def test_geometry_inside_non_overlapping_unambiguous(image_size: int) -> None:
    n = image_size
    for split in ("train", "zeroshot"):
        for s in _scenes(split, 400, image_size):
            for o in s.objects:
                x0, y0, x1, y1 = o.bbox
                assert 0 <= x0 and 0 <= y0 and x1 <= n and y1 <= n, o
            if len(s.objects) == 1:
                o = s.objects[0]
                checks = {
                    "left": o.cx < 0.4 * n,
                    "right": o.cx > 0.6 * n,
                    "top": o.cy < 0.4 * n,
                    "bottom": o.cy > 0.6 * n,
                    "centre": abs(o.cx - n / 2) + abs(o.cy - n / 2) <= 0.1 * n,
                }
                assert checks[o.position], o
                continue
            a, b = s.objects
            assert a.position is None and b.position is None
            ax, ay, bx, by = a.bbox[0], a.bbox[1], b.bbox[0], b.bbox[1]
            separated = a.bbox[2] <= bx or b.bbox[2] <= ax or a.bbox[3] <= by or b.bbox[3] <= ay
            assert separated, s
            dx, dy = b.cx - a.cx, b.cy - a.cy
            main, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
                s.relation
            ]
            assert main > 0 and abs(cross) <= main / 4 + 1e-9, s


def test_captions_match_scene_and_mentions() -> None:
    for i in range(600):
        sample = make_sample(i, "zeroshot" if i % 3 == 0 else "train")
        cap, scene = sample.caption, sample.scene
        assert cap == cap.lower() and cap.startswith(("a ", "an ")), cap
        assert len(sample.mentions) == len(scene.objects)
        pos = 0
        for o, mentioned in zip(scene.objects, sample.mentions, strict=True):
            assert {"colour", "shape"} <= set(mentioned) <= set(shapes.ATTRIBUTES)
            phrase = f"{o.size} {o.colour} {o.shape}" if "size" in mentioned else f"{o.colour} {o.shape}"
            found = cap.find(phrase, pos)
            assert found >= 0, (cap, o)
            pos = found + len(phrase)
            if "size" not in mentioned:
                assert o.size not in cap.split()
        if len(scene.objects) == 1:
            position_words = {"left", "right", "top", "bottom", "centre"}
            if "position" in sample.mentions[0]:
                assert cap.endswith(scene.objects[0].position), cap
            else:
                assert not position_words & set(cap.split()), cap
        else:
            words = {
                "left of": " to the left of ",
                "right of": " to the right of ",
                "above": " above ",
                "below": " below ",
            }
            assert words[scene.relation] in cap, cap
    assert (
        make_caption(make_sample(3).scene, random.Random(0))[0]
        == make_caption(make_sample(3).scene, random.Random(0))[0]
    )


def test_object_centre_pixel_has_palette_colour_and_corner_is_background() -> None:
    for i in range(300):
        sample = make_sample(i, "zeroshot" if i % 2 else "train")
        px = np.asarray(sample.image)
        assert px.shape == (64, 64, 3) and px.dtype == np.uint8
        for o in sample.scene.objects:
            assert tuple(px[int(o.cy), int(o.cx)]) == COLOURS[o.colour], (i, o)
        assert tuple(px[0, 0]) == sample.scene.background
        grey = sample.scene.background
        assert grey[0] == grey[1] == grey[2] and 64 <= grey[0] <= 224
    # Anti-aliasing: some pixels are neither background nor a palette colour.
    sample = make_sample(0)
    colours = {tuple(c) for c in np.asarray(sample.image).reshape(-1, 3)}
    assert len(colours - {sample.scene.background, *COLOURS.values()}) > 0


def test_fixed_background_and_grey_range() -> None:
    s = make_sample(2, background=(10, 20, 30))
    assert s.scene.background == (10, 20, 30) and s.image.getpixel((0, 0)) == (10, 20, 30)
    levels = {make_sample(i, grey_range=(100, 101)).scene.background for i in range(20)}
    assert levels <= {(100, 100, 100), (101, 101, 101)}


def test_scene_json_round_trip() -> None:
    for i in range(50):
        sample = make_sample(i, "zeroshot" if i % 2 else "train")
        assert Scene.from_dict(json.loads(json.dumps(sample.scene.to_dict()))) == sample.scene
        record = json.loads(sample.to_json())
        assert Scene.from_dict(record) == sample.scene
        assert tuple(tuple(m) for m in record["mentions"]) == sample.mentions
        assert render(Scene.from_dict(record)).tobytes() == sample.image.tobytes()


def test_dataset_item_format() -> None:
    ds = ShapesDataset("val", size=20, seed=4, image_size=32)
    assert len(ds) == 20
    item = ds[3]
    assert set(item) == {"image", "caption", "scene", "key"}
    img = item["image"]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.shape == (3, 32, 32)
    assert 0.0 <= img.min() and img.max() <= 1.0
    ref = make_sample(3, "val", 4, 32)
    assert item["caption"] == ref.caption and Scene.from_dict(json.loads(item["scene"])) == ref.scene
    expected = torch.from_numpy(np.array(ref.image)).permute(2, 0, 1).float() / 255
    assert torch.equal(img, expected)
    assert "." not in item["key"] and ds[-17]["key"] == item["key"]
    with pytest.raises(IndexError):
        ds[20]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_sample(0, "test"), "unknown split"),
        (lambda: make_sample(0, image_size=8), "image_size"),
        (lambda: make_sample(-1), "index"),
        (lambda: make_sample(0, grey_range=(200, 100)), "grey_range"),
        (lambda: make_sample(0, background=(0, 0, 300)), "background"),
        (lambda: sample_scene(random.Random(0), "bogus"), "unknown split"),
        (lambda: render(make_sample(0).scene, image_size=15), "image_size"),
        (lambda: ShapesDataset("nope"), "unknown split"),
        (lambda: ShapesDataset(size=0), "size"),
        (lambda: ShapesDataset(image_size=4), "image_size"),
        (lambda: Scene.from_dict({"objects": [], "relation": None, "background": [1, 2]}), "background"),
    ],
)
def test_bad_arguments_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_tool_folder_mode(tmp_path: Path) -> None:
    tool = _load_tool()
    assert tool.main(["--n", "3", "--out", str(tmp_path), "--split", "val", "--seed", "2"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 9 and {Path(n).suffix for n in names} == {".png", ".txt", ".json"}
    ref = make_sample(1, "val", 2)
    key = shapes.sample_key(1, "val", 2)
    assert (tmp_path / f"{key}.txt").read_text() == ref.caption
    assert Scene.from_dict(json.loads((tmp_path / f"{key}.json").read_text())) == ref.scene
    with Image.open(tmp_path / f"{key}.png") as im:
        assert im.convert("RGB").tobytes() == ref.image.tobytes()


def test_tool_shard_mode(tmp_path: Path) -> None:
    tool = _load_tool()
    argv = ["--n", "5", "--out", str(tmp_path), "--shards", "--shard-size", "2", "--split", "zeroshot"]
    assert tool.main(argv) == 0
    tars = sorted(tmp_path.glob("shapes-*.tar"))
    assert [t.name for t in tars] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    members = {}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    assert len(members) == 15
    key = shapes.sample_key(4, "zeroshot", 0)
    ref = make_sample(4, "zeroshot")
    assert members[f"{key}.txt"].decode() == ref.caption
    assert Scene.from_dict(json.loads(members[f"{key}.json"])) == ref.scene
    assert Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB").tobytes() == ref.image.tobytes()


def test_tool_captions_mode_writes_each_caption_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tool = _load_tool()
    out = tmp_path / "prompts" / "train.txt"
    assert tool.main(["--n", "300", "--captions", "--out", str(out)]) == 0
    captions = [make_sample(i, "train").caption for i in range(300)]
    assert out.read_text().splitlines() == list(dict.fromkeys(captions))  # first appearance sets the order
    assert len(set(captions)) < 300 and not list(tmp_path.glob("**/*.png"))
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="exists: choose another file or pass --overwrite"):
        tool.main(["--n", "5", "--captions", "--out", str(out)])
    assert out.read_bytes() == before
    with pytest.raises(SystemExit, match="is a directory"):
        tool.main(["--n", "5", "--captions", "--out", str(tmp_path)])
    assert tool.main(["--n", "5", "--captions", "--out", str(out), "--overwrite", "--split", "zeroshot"]) == 0
    assert out.read_text().splitlines() == list(dict.fromkeys(make_sample(i, "zeroshot").caption for i in range(5)))


@pytest.mark.parametrize(
    "argv",
    [
        ["--split", "test"],
        ["--image-size", "8"],
        ["--n", "0"],
        ["--shards", "--shard-size", "0"],
        ["--background", "1,2"],
        ["--captions", "--shards"],
    ],
)
def test_tool_rejects_bad_arguments(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture) -> None:
    tool = _load_tool()
    with pytest.raises(SystemExit) as exc:
        tool.main(["--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
