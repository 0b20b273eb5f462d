"""tools/train_all.py: every stage on a tiny folder, resumed stage by stage; its recipe and its errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

from dalle.captioning import DRAWN_CANDIDATES
from dalle.data.split import held_out_keys, split_shards
from dalle.train import recipe
from dalle_tools import train_all

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 20)}


def icon_folder(root, n: int = 36):
    """n transparent 40x40 icons (a coloured circle or square) with two caption lines each."""
    root.mkdir()
    rng = random.Random(0)
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["circle", "square"])
        im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 34, 34), fill=(*COLOURS[colour], 255))
        im.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {colour} {shape}\n{colour} {shape} icon\n")
    return root


def test_train_all_runs_every_stage_and_resumes_stage_by_stage(tmp_path) -> None:
    data, out = icon_folder(tmp_path / "icons"), tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--budget", "30s", "--max-steps", "8", "--threads", "1",
            "--prompt", "a red circle", "--no-progress"]
    assert train_all.main([*argv, "--until", "dvae"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert list(state["stages"]) == ["split", "bpe", "plan", "dvae"]
    dvae_log = (out / "dvae" / "log.jsonl").read_text()

    assert train_all.main(argv) == 0  # the rest, without training the dVAE again
    state = json.loads((out / "state.json").read_text())
    assert list(state["stages"]) == list(train_all.STAGES)
    assert (out / "dvae" / "log.jsonl").read_text() == dvae_log
    split = json.loads((out / "split.json").read_text())
    assert len(split["val_keys"]) == 8 and len(split["train_keys"]) == 28
    assert not set(split["val_keys"]) & set(split["train_keys"])
    for kind in ("dvae", "dalle", "reranker"):  # the recipe: tiny budget, tiny models, capped steps
        cfg = (out / "configs" / f"{kind}.yaml").read_text()
        assert "steps: 8\n" in cfg and "source: " in cfg
    assert "image_size: 32" in (out / "configs" / "dvae.yaml").read_text()  # 40 px images, tiny budget

    fid = json.loads((out / "eval" / "fid" / "fid.json").read_text())
    assert {"fid", "floor", "ceiling"} <= set(fid) and fid["n"] == 8
    for png in ("reconstructions", "samples-held-out", "samples-prompts"):
        assert Image.open(out / "eval" / f"{png}.png").size[0] > 32
    report = (out / "report.md").read_text()
    assert "PSNR" in report and f"{fid['floor']['0']:.4g}" in report and "a red circle" in report
    assert "--budget 30s" in report  # the command that made it

    before = (out / "state.json").read_text()
    assert train_all.main(argv) == 0  # complete: nothing runs again
    assert json.loads((out / "state.json").read_text())["stages"] == json.loads(before)["stages"]


@pytest.mark.parametrize("make, args, message", [
    (None, ["--data", "{tmp}/nowhere"], "no such folder"),
    ("few", ["--data", "{tmp}/few"], "found 5 captioned images; train_all needs at least 20"),
    (None, ["--data", "{tmp}/none-{000..002}.tar"], "3 shard(s) do not exist"),
])
def test_bad_data_is_a_one_line_error(tmp_path, make, args, message) -> None:
    if make:
        icon_folder(tmp_path / make, n=5)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        train_all.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_budget_is_a_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        train_all.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--budget", "an hour"])
    assert e.value.code == 2 and "is not a duration" in capsys.readouterr().err


def test_an_existing_folder_that_is_not_a_run_is_refused(tmp_path) -> None:
    data, out = icon_folder(tmp_path / "icons"), tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a train_all run"):
        train_all.main(["--data", str(data), "--out", str(out)])


def test_budget_strings() -> None:
    assert recipe.parse_budget("1h") == 3600
    assert recipe.parse_budget("1h30m") == 5400
    assert recipe.parse_budget("45min") == 2700
    assert recipe.parse_budget("90s") == recipe.parse_budget("90") == 90
    for bad in ("", "1 hour", "h", "0m", "-5m", "1h30"):
        with pytest.raises(ValueError):
            recipe.parse_budget(bad)


def test_recipe_sizes_images_codes_and_text_from_the_data() -> None:
    assert recipe.image_size_for(40, 3600) == 32  # never above the images' own side
    assert recipe.image_size_for(64, 3600) == 64
    assert recipe.image_size_for(500, 3600) == 64  # a CPU hour: 64 px
    assert recipe.image_size_for(500, 24 * 3600) == 128
    assert recipe.image_size_for(500, 30) == 32  # a tiny budget
    assert recipe.codes_for(3_000, "shapes") < recipe.codes_for(300_000, "shapes")
    assert recipe.text_len_for([3] * 99 + [40]) == 8  # the 99th percentile, not one outlier
    assert recipe.text_len_for([9] * 100) == 16
    assert recipe.steps_for(60, 0.5) == 120 and recipe.steps_for(1, 0.5) == recipe.MIN_STEPS
    cfg = {"train": {"ema_decay": 0.999, "warmup_steps": 150}, "objective": {"temp_steps": 600}}
    recipe.set_steps(cfg, 1000, early_stop=3)
    assert cfg["train"]["ema_decay"] == 0.99  # averages the last ~100 steps, not the first weights
    assert cfg["train"]["warmup_steps"] == 100 and cfg["objective"]["temp_steps"] == 333
    assert cfg["train"]["eval_every"] == 125 and cfg["train"]["early_stop_evals"] == 3
    shipped = recipe.base("dalle", "shapes")  # drawing first, reading last: the switch keeps its share of the run
    share = shipped["objective"]["second_mix_at"] / shipped["train"]["steps"]
    recipe.set_steps(shipped, 1000, early_stop=3)
    assert shipped["objective"]["second_mix_at"] == round(1000 * share) and shipped["train"]["steps"] == 1000
    recipe.set_steps(shipped, recipe.MIN_STEPS, early_stop=3)
    assert 0 < shipped["objective"]["second_mix_at"] < recipe.MIN_STEPS


def test_held_out_split_depends_on_the_keys_not_their_order() -> None:
    keys = [f"k{i}" for i in range(2000)]
    picked = held_out_keys(keys, 200)
    assert len(picked) == 200 and held_out_keys(keys[::-1], 200) == picked
    assert held_out_keys(keys, 200, seed=1) != picked
    assert picked != set(keys[:200])  # not simply the first files


def test_shards_are_split_into_train_and_held_out_shards(tmp_path) -> None:
    import io

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "in-000.tar")) as w:
        for i in range(30):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format="PNG")
            w.write({"__key__": f"s{i:03d}", "png": buf.getvalue(), "txt": f"caption {i}".encode()})
    record = split_shards(str(tmp_path / "in-000.tar"), tmp_path / "out")
    assert len(record["val_keys"]) == 8 and len(record["train_keys"]) == 22
    train = [s["__key__"] for s in wds.WebDataset(record["train"], shardshuffle=False)]
    assert sorted(train) == sorted(record["train_keys"])
    captions = (tmp_path / "out" / "train-captions.txt").read_text().split("\n")
    assert f"caption {int(record['train_keys'][0][1:])}" in captions


def test_twemoji_folder_writes_three_captions_per_emoji_and_tone(tmp_path) -> None:
    from dalle_tools import twemoji_folder

    pkg = tmp_path / "package"
    (pkg / "img" / "twitter" / "64").mkdir(parents=True)
    for name in ("1f44b.png", "1f44b-1f3fd.png"):
        Image.new("P", (64, 64)).save(pkg / "img" / "twitter" / "64" / name)
    entry = {"name": "WAVING HAND SIGN", "short_names": ["wave"], "image": "1f44b.png", "category": "People & Body",
             "subcategory": "hand-fingers-open", "has_img_twitter": True,
             "skin_variations": {"1F3FD": {"image": "1f44b-1f3fd.png", "has_img_twitter": True},
                                 "1F3FB-1F3FF": {"image": "1f44b-1f3fb-1f3ff.png", "has_img_twitter": False}}}
    (pkg / "emoji.json").write_text(json.dumps([entry]))
    assert twemoji_folder.main(["--package", str(pkg), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "1f44b-1f3fd.png", "1f44b-1f3fd.txt", "1f44b.png", "1f44b.txt"]
    assert (tmp_path / "out" / "1f44b-1f3fd.txt").read_text().splitlines() == [
        "waving hand sign, medium skin tone", "wave emoji, medium skin tone",
        "waving hand sign, medium skin tone, a hand-fingers-open emoji of people & body"]
    with pytest.raises(SystemExit, match="not empty"):
        twemoji_folder.main(["--package", str(pkg), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="not an unpacked emoji-datasource-twitter"):
        twemoji_folder.main(["--package", str(tmp_path), "--out", str(tmp_path / "out2")])


def test_shapes_world_trains_the_named_recipe_and_bundles_in_fp16(tmp_path) -> None:
    """--data shapes:N --recipe NAME (what tools/train_default.sh runs for the default model): the named
    configs with the run's paths, the shapes world's own splits, every scene pre-tokenised, an fp16 bundle."""
    from safetensors import safe_open

    from dalle.pipeline import load_pipeline
    from dalle.tokenizer import TextTokenizer
    from dalle.train.config import load_yaml

    out = tmp_path / "run"
    argv = ["--data", "shapes:40", "--recipe", "tiny", "--out", str(out), "--max-steps", "6", "--threads", "1",
            "--dtype", "fp16", "--no-progress", "--until", "bundle"]
    assert train_all.main(argv) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["data"] == "shapes:40" and state["recipe"] == "tiny"
    assert state["split"]["n_train"] == 40 and state["split"]["n_val"] == 8
    named = {k: load_yaml(f"configs/{k}/tiny.yaml") for k in ("dvae", "dalle", "reranker")}
    planned = {k: load_yaml(out / "configs" / f"{k}.yaml") for k in named}
    assert planned["dvae"]["model"] == named["dvae"]["model"] and planned["dvae"]["data"] == named["dvae"]["data"]
    assert planned["reranker"]["objective"] == named["reranker"]["objective"]
    grid = named["dvae"]["model"]["image_size"] // named["dvae"]["model"]["downsample"]
    assert planned["dalle"]["model"]["image_grid_size"] == grid  # follows the dVAE, whatever tiny.yaml says
    assert planned["dalle"]["data"] == {"source": "tokens", "path": str(out / "tok-train"),
                                        "val_path": str(out / "tok-val")}
    assert all(cfg["train"]["steps"] == 6 for cfg in planned.values())
    for part, n in (("tok-train", 40), ("tok-val", 8)):
        assert json.loads((out / part / "meta.json").read_text())["count"] == n
    # the tokenizer learned the shapes questions' words too, so a model of the shipped recipe can answer them
    # (a tokenizer of captions alone spells "how many objects?" in 14 tokens)
    tok = TextTokenizer.from_file(out / "tokenizer.json")
    assert len(tok.encode("how many objects?")) <= 4 and len(tok.encode("where is the red star?")) <= 6
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    pipe = load_pipeline(str(out / "model"))
    assert pipe.reranker is not None and pipe.dvae.config.image_size == named["dvae"]["model"]["image_size"]

    with pytest.raises(SystemExit, match="planned with --recipe tiny"):
        train_all.main([*argv[:2], "--recipe", "sized", *argv[4:]])


def test_a_shapes_run_of_a_model_that_reads_evaluates_its_captions_and_answers(tmp_path) -> None:
    """The shipped recipe trains the transformer in both directions; the build's evaluation and report then
    hold docs/evaluation.md's reading table (captions, answers, cycle, self-reranking) beside the drawing one."""
    import yaml

    out = tmp_path / "run"
    argv = ["--data", "shapes:40", "--recipe", "tiny", "--out", str(out), "--max-steps", "4", "--threads", "1",
            "--no-progress"]
    assert train_all.main([*argv, "--until", "plan"]) == 0
    planned = out / "configs" / "dalle.yaml"
    cfg = yaml.safe_load(planned.read_text())
    cfg["model"]["layouts"] = ["t2i", "caption", "qa"]
    cfg["objective"].update(mix_t2i=0.5, mix_caption=0.25, mix_qa=0.25)
    planned.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert train_all.main(argv) == 0
    reading = json.loads((out / "eval" / "captions" / "captions-eval.json").read_text())
    assert reading["captions"] and reading["answers"] and reading["cycle"] and reading["rerank"]
    assert {row["candidates"] for row in reading["captions"]} == {1, DRAWN_CANDIDATES}  # what caption.py runs
    report = (out / "report.md").read_text()
    assert "Compositional accuracy" in report and "Reading (" in report and "## Answers" in report


@pytest.mark.parametrize("args, message", [
    (["--data", "shapes:5"], "shapes:N with N >= 20"),
    (["--data", "shapes:many"], "shapes:N with N >= 20"),
])
def test_bad_shapes_data_is_a_one_line_error(tmp_path, args, message) -> None:
    with pytest.raises(SystemExit) as e:
        train_all.main([*args, "--out", str(tmp_path / "run")])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, message", [("nosuch", "does not exist"), ("../dvae/tiny", "is not a config name")])
def test_unknown_recipe_is_a_usage_error(tmp_path, capsys, name, message) -> None:
    with pytest.raises(SystemExit) as e:
        train_all.main(["--data", "shapes", "--recipe", name, "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_resumed_stage_counts_the_training_its_checkpoint_kept(tmp_path) -> None:
    from dalle_tools.train_all_stages import earlier_seconds

    assert earlier_seconds(tmp_path) == 0.0  # a stage that never logged
    events = [{"step": 0, "event": "start", "seconds_before": 0.0}, {"step": 100, "event": "train"},
              {"step": 100, "event": "start", "seconds_before": 412.5}, {"step": 200, "event": "train"}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert earlier_seconds(tmp_path) == 412.5  # the last process's start: what the checkpoint it resumed held
