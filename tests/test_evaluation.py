"""Evaluation: the shapes detector, compositional scoring, Frechet distance, IS, and both eval tools."""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data.shapes import make_sample
from dalle.evaluation.compositional import (
    score_images,
    shape_accuracy_by_kind,
    shape_confusion,
    shapes_prompts,
    summarise,
)
from dalle.evaluation.detect import detect
from dalle.evaluation.fid import blur, frechet_distance, inception_score, inception_weights_path, statistics
from dalle_tools import eval_fid, eval_shapes


def _jpeg(image, quality=75):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("split", ["train", "zeroshot"])
def test_detector_reads_ground_truth_renders(split):
    prompts = shapes_prompts(split, 120)
    verdicts = score_images(prompts, [np.asarray(p.sample.image) for p in prompts])
    figures = summarise(prompts, verdicts)
    assert figures["all"]["all_correct"] >= 0.99, figures["all"]
    assert set(figures) >= {"1 object", "2 objects"}
    if split == "zeroshot":
        assert {"held-out pair", "held-out layout"} <= set(figures)


def test_detector_survives_jpeg():
    prompts = shapes_prompts("train", 150, seed=1)
    verdicts = score_images(prompts, [_jpeg(p.sample.image) for p in prompts])
    assert summarise(prompts, verdicts)["all"]["all_correct"] >= 0.99


def test_detector_is_near_chance_on_shuffled_prompts():
    prompts = shapes_prompts("train", 150, seed=2)
    images = [np.asarray(p.sample.image) for p in prompts]
    random.Random(0).shuffle(prompts)
    figures = summarise(prompts, score_images(prompts, images))["all"]
    assert figures["all_correct"] < 0.1 and figures["colour"] < 0.3 and figures["shape"] < 0.35


def _small_objects_as_boxes(prompts):
    """The prompts' images with every small object other than a square painted as a filled box."""
    images, wrong = [np.asarray(p.sample.image).copy() for p in prompts], set()
    for p, im in zip(prompts, images):
        for o in p.sample.scene.objects:
            if o.size == "small" and o.shape != "square":
                x0, y0, x1, y1 = (round(v) for v in o.bbox)
                im[y0:y1, x0:x1] = im[int(o.cy), int(o.cx)]
                wrong.add(f"small {o.shape}")
    return images, wrong


def test_shape_accuracy_by_kind_blames_the_objects_that_were_drawn_wrong():
    prompts = shapes_prompts("train", 60, seed=3)
    images, wrong = _small_objects_as_boxes(prompts)
    by_kind = shape_accuracy_by_kind(prompts, score_images(prompts, images))
    assert wrong and all(by_kind[k] < 0.5 for k in wrong if k in by_kind), by_kind
    assert all(v == 1.0 for k, v in by_kind.items() if k.startswith("large")), by_kind


def test_shape_confusion_says_what_a_wrong_shape_was_read_as():
    prompts = shapes_prompts("train", 60, seed=3)
    images, wrong = _small_objects_as_boxes(prompts)
    confusion = shape_confusion(prompts, score_images(prompts, images))
    for kind in wrong:  # boxes read as squares (or as nothing where a box merged with its neighbour)
        assert kind.split()[1] not in confusion[kind] and set(confusion[kind]) <= {"square", "none"}, confusion
        assert next(iter(confusion[kind])) == "square", confusion  # most frequent first
    for kind, read in confusion.items():
        if kind.startswith("large"):
            assert read == {kind.split()[1]: sum(read.values())}, confusion
    n_objects = sum(len(p.sample.scene.objects) for p in prompts)
    assert sum(sum(r.values()) for r in confusion.values()) == n_objects


def test_detector_reports_what_it_sees():
    s = make_sample(3, "train")
    (obj,) = s.scene.objects if len(s.scene.objects) == 1 else s.scene.objects[:1]
    found = detect(np.asarray(s.image))
    assert len(found) == len(s.scene.objects)
    assert any(d.colour == obj.colour and d.shape == obj.shape and d.size == obj.size for d in found)
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert detect(blank) == []
    with pytest.raises(ValueError, match="square RGB"):
        detect(np.zeros((64, 32, 3), dtype=np.uint8))


def test_detector_survives_colours_between_the_palette_entries():
    # A generated image may paint an object in a blend no palette colour explains; the detector found
    # the object but then had no pixel to measure it by, and crashed the whole evaluation.
    img = np.full((64, 64, 3), 64, np.uint8)
    img[20:40, 20:40] = (185, 32, 117)  # halfway between red and purple, on dark grey
    found = detect(img)
    assert len(found) == 1 and found[0].position == "centre" and found[0].extent == 20


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 16, generator=g), torch.randn(300, 16, generator=g) * 1.5 + 0.3
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    ref = calculate_frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-8)


def test_inception_score_bounds_and_blur():
    assert inception_score(torch.full((50, 10), 0.1))[0] == pytest.approx(1.0)
    assert inception_score(torch.eye(10).repeat(5, 1), splits=1)[0] == pytest.approx(10.0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(blur(images, 0), images)
    blurred = blur(images, 2)
    assert blurred.dtype == torch.uint8 and blurred.float().std() < images.float().std() / 2


def test_missing_inception_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*--features reranker"):
        inception_weights_path(tmp_path / "nope.pth")


class StandIn:
    """A fixed random projection of 4x4-pooled pixels: the Inception path without its weights."""

    name = "stand-in"

    def __init__(self, *_args, **_kw):
        g = torch.Generator().manual_seed(0)
        self.proj, self.cls = torch.randn(48, 8, generator=g), torch.randn(48, 5, generator=g)

    def __call__(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return x @ self.proj, torch.softmax(x @ self.cls, 1)


def test_eval_fid_pipeline_resumes_and_agrees_with_pytorch_fid(tiny_parts, tmp_path, monkeypatch, capsys):
    from pytorch_fid.fid_score import calculate_frechet_distance

    monkeypatch.setattr(eval_fid, "InceptionExtractor", StandIn)
    out = tmp_path / "fid"
    args = ["--model", str(tiny_parts / "model"), "--reranker", str(tiny_parts / "reranker"), "--source", "shapes",
            "--split", "zeroshot", "--n", "6", "--blur", "0", "2", "--batch-size", "4", "--out", str(out),
            "--stats-cache", str(tmp_path / "cache"), "--no-progress"]
    assert eval_fid.main(args) == 0
    result = json.loads((out / "fid.json").read_text())
    assert set(result["fid"]) == {"0", "2"} and result["n"] == 6 and result["clip_score"] is not None
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # The same figure from pytorch-fid's distance on the same features.
    ext = StandIn()
    def chw(image):
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    fake = torch.stack([chw(Image.open(out / "images" / f"{i:06d}.png")) for i in range(6)])
    real = torch.stack([chw(make_sample(i, "zeroshot", 0, 32).image) for i in range(6)])
    (m1, s1), (m2, s2) = statistics(ext(fake)[0]), statistics(ext(real)[0])
    ref = calculate_frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    assert result["fid"]["0"] == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # A finished evaluation is not replaced unasked.
    with pytest.raises(SystemExit, match="already holds fid.json: choose another --out, or pass --overwrite"):
        eval_fid.main(args)
    # A restart after a crash keeps what exists and remakes only what is missing, identically.
    kept = (out / "images" / "000001.png").read_bytes()
    for f in (out / "images" / "000001.png", out / "fid.json", out / "fid.md"):
        f.unlink()
    assert eval_fid.main(args) == 0
    assert (out / "images" / "000001.png").read_bytes() == kept
    assert json.loads((out / "fid.json").read_text())["fid"] == result["fid"]
    # Images drawn another way (here at another temperature) are never mixed into the figure: refused, or drawn
    # again.
    (out / "fid.json").unlink(), (out / "fid.md").unlink()
    with pytest.raises(SystemExit, match=r"holds 6 images drawn by another model or with other settings "
                                         r"\(temperature differ\): choose another --out, or pass --overwrite"):
        eval_fid.main([*args, "--temperature", "0.5"])
    assert eval_fid.main([*args, "--temperature", "0.5", "--overwrite"]) == 0
    assert (out / "images" / "000001.png").read_bytes() != kept
    assert eval_fid.main([*args, "--overwrite"]) == 0  # and back: the first images again
    assert (out / "images" / "000001.png").read_bytes() == kept
    # A damaged statistics cache is only a cache: warned about, computed again, the same figures.
    for f in (tmp_path / "cache").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    assert eval_fid.main([*args, "--overwrite"]) == 0
    assert "is not readable" in capsys.readouterr().err
    assert json.loads((out / "fid.json").read_text())["fid"] == result["fid"]


def test_eval_shapes_tool(tiny_parts, tmp_path):
    out = tmp_path / "shapes"
    assert eval_shapes.main(["--model", str(tiny_parts / "model"), "--reranker", str(tiny_parts / "reranker"),
                             "--split", "train", "zeroshot", "--n", "3", "--candidates", "1", "2", "--cond-scale",
                             "1", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "shapes-eval.json").read_text())["rows"]
    assert [(r["split"], r["cond_scale"], r["candidates"]) for r in rows] == [
        (s, c, k) for s in ("train", "zeroshot") for c in (1.0, 2.0) for k in (1, 2)]
    assert all(0 <= r["all_correct"] <= 1 and "clip_score" in r for r in rows)
    assert (out / "zeroshot-cond2.png").is_file() and "| split |" in (out / "shapes-eval.md").read_text()
    before = (out / "shapes-eval.json").read_bytes()
    with pytest.raises(SystemExit, match="already holds shapes-eval.json: choose another --out, or pass --overwrite"):
        eval_shapes.main(["--model", str(tiny_parts / "model"), "--n", "2", "--out", str(out), "--no-progress"])
    assert (out / "shapes-eval.json").read_bytes() == before
    check = tmp_path / "check"
    assert eval_shapes.main(["--check-detector", "--n", "20", "--out", str(check), "--no-progress"]) == 0
    assert all(r["all_correct"] == 1.0 for r in json.loads((check / "shapes-eval.json").read_text())["rows"])


@pytest.mark.parametrize("source", ["folder", "webdataset", "coco"])
def test_eval_fid_reads_every_caption_source(tiny_parts, tmp_path, monkeypatch, source):
    from dalle_tools import make_shapes

    monkeypatch.setattr(eval_fid, "InceptionExtractor", StandIn)
    data = tmp_path / "data"
    if source == "coco":
        (data / "img").mkdir(parents=True)
        anns, images = [], []
        for i in range(4):
            s = make_sample(i, "val", 0, 32)
            s.image.save(data / "img" / f"{i}.png")
            images.append({"id": 10 + i, "file_name": f"{i}.png"})
            anns += [{"id": 2 * i, "image_id": 10 + i, "caption": s.caption}, {"id": 2 * i + 1, "image_id": 10 + i,
                                                                               "caption": "second caption"}]
        (data / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
        where = ["--path", str(data / "img"), "--captions", str(data / "captions.json")]
    else:
        assert make_shapes.main(["--n", "4", "--split", "val", "--image-size", "32", "--out", str(data)]
                                + (["--shards", "--shard-size", "4"] if source == "webdataset" else [])) == 0
        where = ["--path", str(data) if source == "folder" else str(next(data.glob("*.tar")))]
    out = tmp_path / "fid"
    assert eval_fid.main(["--model", str(tiny_parts / "model"), "--source", source, *where, "--n", "4", "--blur", "0",
                          "--out", str(out), "--stats-cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    result = json.loads((out / "fid.json").read_text())
    assert result["n"] == 4 and result["fid"]["0"] >= 0 and len(list((out / "images").glob("*.png"))) == 4
