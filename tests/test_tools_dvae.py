"""The dVAE command-line tools run in-process on generated data."""

import json

import pytest
from PIL import Image

from dalle.checkpoint import load_pretrained
from dalle.data.shapes import make_sample
from dalle.train.checkpoints import latest_checkpoint
from dalle_tools import eval_dvae, make_shapes, train_dvae

TINY = "configs/dvae/tiny.yaml"


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_dvae.main(["--config", TINY, "--out", str(run), "--no-progress"]) == 0
    assert latest_checkpoint(run).name == "step-0000020"
    record = json.loads((run / "run.json").read_text())
    assert record["model"]["vocab_size"] == 64 and record["train"]["steps"] == 20
    assert list((run / "eval").glob("reconstructions-*.png"))
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20]
    assert {"psnr", "perplexity", "codes_used"} <= set(evals[-1])

    # Re-running the finished command resumes and does nothing more.
    assert train_dvae.main(["--config", TINY, "--out", str(run), "--no-progress"]) == 0
    grid = tmp_path / "grid.png"
    out = tmp_path / "metrics.json"
    assert eval_dvae.main(["--model", str(run), "--n", "32", "--grid", str(grid), "--json", str(out),
                           "--device", "cpu", "--detector", "8", "--misread-grid", str(tmp_path / "bad.png")]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 32 and 0 < metrics["codes_used"] <= 1 and metrics["psnr_db"] > 5
    read_as = metrics["detector_on_reconstructions"]["shape_read_as"]  # every object of the 8 scenes, once
    drawn = [o for i in range(8) for o in make_sample(i, "val", 0, record["model"]["image_size"]).scene.objects]
    assert sum(sum(r.values()) for r in read_as.values()) == len(drawn)
    assert set(read_as) == {f"{o.size} {o.shape}" for o in drawn}
    by_count = metrics["detector_on_reconstructions"]["by_object_count"]
    assert sum(g["n"] for g in by_count.values()) == 8 and set(by_count) <= {"1 object", "2 objects"}
    misread = metrics["detector_on_reconstructions"]["misread_scenes"]  # a 20-step dVAE draws blobs
    assert misread > 0 and Image.open(tmp_path / "bad.png").size[0] == min(misread, 12) * (32 + 1) + 1
    assert Image.open(grid).size[0] > 32
    with pytest.raises(SystemExit, match=r"--json .*metrics.json already exists: choose another --json, or pass "
                                         r"--overwrite"):
        eval_dvae.main(["--model", str(run), "--n", "8", "--json", str(out), "--device", "cpu"])
    assert json.loads(out.read_text()) == metrics  # nothing replaced


def test_folder_with_corrupt_images_is_skipped_and_counted(tmp_path, caplog):
    data = tmp_path / "data"
    assert make_shapes.main(["--n", "24", "--out", str(data), "--image-size", "32"]) == 0
    with pytest.raises(SystemExit, match=r"already holds .*\.png: choose another --out, or pass --overwrite"):
        make_shapes.main(["--n", "24", "--out", str(data), "--image-size", "48"])  # would replace them, resized
    pngs = sorted(data.glob("*.png"))
    pngs[0].write_bytes(b"definitely not a png")
    pngs[1].write_bytes(pngs[2].read_bytes()[:100])  # truncated
    run = tmp_path / "run"
    rc = train_dvae.main(["--config", TINY, "--out", str(run), "--no-progress",
                          "--set", "data.source=folder", "--set", f"data.path={data}",
                          "--set", "train.steps=8", "--set", "train.eval_every=8"])
    assert rc == 0
    assert str(pngs[0]) in caplog.text or pngs[0].name in caplog.text
    state = json.loads((latest_checkpoint(run) / "train" / "state.json").read_text())
    assert state["counters"]["skipped_samples"] >= 2  # 8 steps x 8 samples: each bad file seen at least once
    assert load_pretrained(run).config.vocab_size == 64


def test_config_errors_name_the_key(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['vocab'\]"):
        train_dvae.main(["--config", TINY, "--out", str(tmp_path), "--set", "model.vocab=3"])
    with pytest.raises(SystemExit, match="unknown section"):
        train_dvae.main(["--config", TINY, "--out", str(tmp_path), "--set", "modle.vocab_size=3"])
