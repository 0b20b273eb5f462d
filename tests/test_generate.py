"""generate.py with reranking, tools/bundle.py, and the default model that ships with the package."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import generate
from dalle.generation import sample_images as generate_images
from dalle.pipeline import DEFAULT_MODEL, load_pipeline, score
from dalle_tools import bundle

PROMPT = "a red circle"


def test_candidates_are_reranked_best_first(tiny_parts, tmp_path):
    out = tmp_path / "out"
    assert generate.main([PROMPT, "--model", str(tiny_parts / "model"), "--reranker", str(tiny_parts / "reranker"),
                          "--num-images", "2", "--candidates", "5", "--seed", "3", "--out", str(out), "--grid",
                          "--scores", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a-red-circle-0.json", "a-red-circle-0.png",
                                                     "a-red-circle-1.json", "a-red-circle-1.png",
                                                     "a-red-circle-grid.png"]
    # The same five candidates, scored independently: the kept ones are the two highest, best first.
    pipe = load_pipeline(tiny_parts / "model", reranker_dir=tiny_parts / "reranker")
    scores = score(pipe, PROMPT, generate_images(pipe, [PROMPT] * 5, list(range(3, 8))))
    expected = torch.argsort(scores, descending=True)[:2].tolist()
    metas = [json.loads((out / f"a-red-circle-{r}.json").read_text()) for r in range(2)]
    assert [m["candidate"] for m in metas] == expected and [m["seed"] for m in metas] == [3 + c for c in expected]
    assert [m["rank"] for m in metas] == [0, 1] and metas[0]["candidates"] == 5
    assert metas[0]["score"] == pytest.approx(float(scores[expected[0]]), abs=1e-5)
    assert metas[0]["score"] >= metas[1]["score"] and metas[0]["reranker"].startswith("reranker@")
    # The sidecar's seed alone makes the best image again.
    again = tmp_path / "again"
    assert generate.main([PROMPT, "--model", str(tiny_parts / "model"), "--num-images", "1", "--seed",
                          str(metas[0]["seed"]), "--out", str(again), "--no-progress"]) == 0
    assert (again / "a-red-circle-0.png").read_bytes() == (out / "a-red-circle-0.png").read_bytes()


def test_many_candidates_in_batches_sized_by_memory_keep_the_same_images(tiny_parts, tmp_path, capsys):
    """--batch-size 0 sizes batches to --batch-memory; whatever the batches, the kept images are the same,
    and the progress bar counts candidates."""
    from dalle.generation import bytes_per_candidate

    pipe = load_pipeline(tiny_parts / "model", reranker_dir=tiny_parts / "reranker")
    mib = 3.5 * bytes_per_candidate(pipe, guided=False) / 2**20  # three candidates a batch
    common = [PROMPT, "--model", str(tiny_parts / "model"), "--reranker", str(tiny_parts / "reranker"),
              "--num-images", "2", "--candidates", "40", "--seed", "11"]
    assert generate.main(common + ["--out", str(tmp_path / "auto"), "--batch-memory", repr(mib)]) == 0
    err = capsys.readouterr().err
    assert "sampling in batches of 3" in err and "40/40 candidates" in err
    assert generate.main(common + ["--out", str(tmp_path / "one"), "--batch-size", "40", "--no-progress"]) == 0
    for rank in range(2):
        name = f"a-red-circle-{rank}.png"
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_candidates_without_a_reranker_is_an_error(tiny_parts, tmp_path, capsys):
    with pytest.raises(SystemExit, match="needs a reranker"):
        generate.main([PROMPT, "--model", str(tiny_parts / "model"), "--num-images", "1", "--candidates", "4",
                       "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        generate.main([PROMPT, "--model", str(tiny_parts / "model"), "--num-images", "3", "--candidates", "2"])
    assert "--candidates 2 is fewer than --num-images 3" in capsys.readouterr().err


def test_a_prompt_too_long_is_said_once_in_one_line(tiny_parts, tmp_path, capsys, recwarn):
    long = " ".join(["a red circle above a blue square"] * 8)
    assert generate.main([long, "--model", str(tiny_parts / "model"), "--reranker", str(tiny_parts / "reranker"),
                          "--num-images", "1", "--candidates", "4", "--batch-size", "2", "--out", str(tmp_path),
                          "--no-progress"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line]
    # one line per reader (these two read different lengths; one line for both when they cut alike)
    assert [line.split(" read")[0] for line in said] == ["warning: the model", "warning: the reranker"]
    assert all(long in line and line.endswith("(shorten the prompt)") for line in said)
    assert not [w for w in recwarn if "truncated" in str(w.message)]  # not again per batch and per scorer


def test_bundle_is_self_contained(tiny_parts, tmp_path):
    assert bundle.main(["--dalle", str(tiny_parts / "model"), "--reranker", str(tiny_parts / "reranker"), "--out",
                        str(tmp_path / "b")]) == 0
    with pytest.raises(SystemExit, match="--out .*b already exists: choose another --out, or pass --overwrite"):
        bundle.main(["--dalle", str(tiny_parts / "model"), "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "reranker").is_dir()  # the bundle written first is untouched
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "b", moved)  # no pointer back to the training runs is needed
    assert {"config.json", "model.safetensors", "tokenizer.json", "dvae", "reranker", "bundle.json"} <= {
        p.name for p in moved.iterdir()}
    record = json.loads((moved / "bundle.json").read_text())
    assert set(record["sources"]) == {"dalle", "dvae", "reranker"} and set(record["ids"]) == {"dalle", "reranker"}
    assert not any(p.startswith("/") for p in record["sources"].values())  # no machine's absolute path
    weights = load_file(str(moved / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    pipe, ref = load_pipeline(moved), load_pipeline(tiny_parts / "model", reranker_dir=tiny_parts / "reranker")
    assert pipe.reranker is not None
    a, b = generate_images(pipe, [PROMPT], [0]), generate_images(ref, [PROMPT], [0])
    assert a.shape == b.shape == (1, 3, 32, 32)
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(score(pipe, PROMPT, images), score(ref, PROMPT, images), atol=2e-3, rtol=0)
    # Its bundled reranker is used by default: 4 candidates per kept image.
    assert generate.main([PROMPT, "--model", str(moved), "--num-images", "1", "--out", str(tmp_path / "o"),
                          "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "a-red-circle-0.json").read_text())["candidates"] == 4


def test_shipped_default_model(tmp_path):
    """The model the README's first command uses: present, small, loadable, and generate.py's default."""
    assert (DEFAULT_MODEL / "config.json").is_file(), f"{DEFAULT_MODEL} is missing: run tools/train_default.sh"
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size < 40 * 2**20
    sources = json.loads((DEFAULT_MODEL / "bundle.json").read_text())["sources"].values()
    assert not any(p.startswith("/") for p in sources)  # no machine's absolute path
    pipe = load_pipeline(DEFAULT_MODEL)  # strict: every tensor present, with the shape its config implies
    assert pipe.reranker is not None and pipe.dvae.config.grid_size == pipe.model.config.image_grid_size
    assert generate.main([PROMPT, "--num-images", "1", "--candidates", "2", "--out", str(tmp_path),
                          "--no-progress"]) == 0
    meta = json.loads((tmp_path / "a-red-circle-0.json").read_text())
    assert meta["model"].startswith("default_model@") and meta["score"] is not None


def test_generate_is_one_library_call_best_first(tiny_parts):
    from dalle.generation import generate, generate_many

    pipe = load_pipeline(tiny_parts / "model", reranker_dir=tiny_parts / "reranker")
    kept = generate(pipe, PROMPT, keep=2, candidates=5, seed=3, batch_size=2)  # three batches: 2 + 2 + 1
    scores = score(pipe, PROMPT, generate_images(pipe, [PROMPT] * 5, list(range(3, 8))))
    expected = torch.argsort(scores, descending=True)[:2].tolist()
    assert [g.candidate for g in kept] == expected and [g.seed for g in kept] == [3 + c for c in expected]
    assert kept[0].score >= kept[1].score and kept[0].score == pytest.approx(float(scores.max()), abs=1e-5)
    whole = generate(pipe, PROMPT, keep=2, candidates=5, seed=3, batch_size=16)  # one batch: the same images
    assert all(torch.equal(a.image, b.image) for a, b in zip(kept, whole))
    # Repeated prompts are sampled and returned separately, in order.
    twice = generate_many(pipe, [PROMPT, "a blue square", PROMPT], keep=1, candidates=2, batch_size=3)
    assert len(twice) == 3 and torch.equal(twice[0][0].image, twice[2][0].image)
    with pytest.raises(ValueError, match="fewer than"):
        generate(pipe, PROMPT, keep=3, candidates=2)
    bare = load_pipeline(tiny_parts / "model")
    assert len(generate(bare, PROMPT, keep=2)) == 2  # no reranker: the first candidates, unscored
    with pytest.raises(ValueError, match="needs a reranker"):
        generate(bare, PROMPT, keep=1, candidates=4)


def test_a_model_written_before_the_renames_still_loads(tiny_parts, tmp_path):
    """config.json keys and folder names of earlier versions: image_grid, model_type "clip", clip/."""
    old = tmp_path / "old"
    shutil.copytree(tiny_parts / "model", old)
    shutil.copytree(tiny_parts / "reranker", old / "clip")
    for path, renames in ((old / "config.json", {"image_grid_size": "image_grid"}), (old / "clip" / "config.json", {})):
        data = json.loads(path.read_text())
        data["config"] = {renames.get(k, k): v for k, v in data["config"].items()}
        if "clip" in str(path.parent.name):
            data["model_type"] = "clip"
        path.write_text(json.dumps(data))
    assert "image_grid" in json.loads((old / "config.json").read_text())["config"]
    pipe, ref = load_pipeline(old), load_pipeline(tiny_parts / "model", reranker_dir=tiny_parts / "reranker")
    assert pipe.reranker is not None
    assert torch.equal(generate_images(pipe, [PROMPT], [1]), generate_images(ref, [PROMPT], [1]))


def test_auto_batch_size_fits_the_memory_budget(tiny_parts):
    from dalle.generation import MAX_AUTO_BATCH, auto_batch_size, bytes_per_candidate

    pipe = load_pipeline(tiny_parts / "model")
    cfg = pipe.model.config
    one = bytes_per_candidate(pipe, guided=False)
    assert one >= 2 * cfg.n_layer * cfg.seq_len * cfg.n_embd * 4  # at least its fp32 key/value cache rows
    assert bytes_per_candidate(pipe, guided=True) > one  # guidance doubles the rows
    assert auto_batch_size(pipe, 5 * one) == 5 and auto_batch_size(pipe, 5 * one, guided=True) < 5
    assert auto_batch_size(pipe, 0) == 1 and auto_batch_size(pipe, 10**15) == MAX_AUTO_BATCH


def test_images_and_grids_are_the_bytes_torchvision_would_write(tmp_path):
    """generate.py writes PNGs without importing torchvision (1.6 s of its start): its images, plain grids and
    labelled grids are pixel for pixel what torchvision's save_image, make_grid and to_pil_image gave."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import make_grid, save_image

    images = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of range
    images[0, :, 0, 0] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255])  # rounding boundaries
    for written, expected in ((generate.to_pil(images[0]), images[0]),
                              (generate.to_pil(generate.make_grid(images, nrow=2, padding=2)),
                               make_grid(images, nrow=2, padding=2)),
                              (generate.to_pil(generate.make_grid(images[:3], nrow=8, padding=2)),
                               make_grid(images[:3], nrow=8, padding=2))):
        save_image(expected, tmp_path / "tv.png")
        assert written.size == Image.open(tmp_path / "tv.png").size
        assert written.tobytes() == Image.open(tmp_path / "tv.png").convert("RGB").tobytes()

    labels = ["0.125", "-1.500", "2.000", "0.000", "9.999"]
    tiles = []
    for image, label in zip(images, labels):  # generate.py's labelled grid as it was written with torchvision
        tile = to_pil_image(image.clamp(0, 1))
        canvas = Image.new("RGB", (tile.width, tile.height + 12), "white")
        canvas.paste(tile, (0, 0))
        ImageDraw.Draw(canvas).text((2, tile.height), label, fill="black")
        tiles.append(pil_to_tensor(canvas))
    expected = to_pil_image(make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=255))
    assert generate.labelled_grid(images, labels, nrow=3).tobytes() == expected.tobytes()
