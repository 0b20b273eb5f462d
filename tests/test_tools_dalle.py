"""Stage 2 end to end on generated data: BPE -> pre-tokenised shards -> transformer training -> resume."""

import json

import pytest
import torch
from tiny import tiny_config

from dalle.checkpoint import load_pretrained, save_pretrained
from dalle.data.tokens import TokenShards
from dalle.tokenizer import TextTokenizer
from dalle.train.checkpoints import latest_checkpoint
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer
from dalle.train.tasks.transformer import DALLEObjective, DALLETask
from dalle.transformer.model import DALLE
from dalle_tools import pretokenize, train_bpe, train_dalle
from dvae.model import DiscreteVAE


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    dvae = DiscreteVAE(tiny_config("dvae", downsample=8))  # the tiny transformer's 4x4 grid
    save_pretrained(dvae, root / "dvae")
    for split, n in (("train", 48), ("val", 16)):
        assert pretokenize.main(["--dvae", str(root / "dvae"), "--source", "shapes", "--split", split, "--n", str(n),
                                 "--out", str(root / f"tok-{split}"), "--batch-size", "16", "--shard-size", "20",
                                 "--device", "cpu"]) == 0
    assert train_bpe.main(["--shapes", "400", "--vocab", "300", "--out", str(root / "tokenizer.json")]) == 0
    return root


def test_pretokenized_shards_hold_the_dvae_codes(assets):
    ds = TokenShards(assets / "tok-train")
    assert len(ds) == 48 and len(ds.meta["shards"]) == 3  # 20 + 20 + 8
    dvae = load_pretrained(assets / "dvae")
    from dalle.data.shapes import ShapesDataset

    image = ShapesDataset("train", size=48, image_size=32)[25]["image"]
    assert torch.equal(ds[25]["codes"], dvae.encode(image[None]).flatten())
    assert ds[25]["caption"] == ShapesDataset("train", size=48, image_size=32)[25]["caption"]
    with pytest.raises(FileExistsError):
        pretokenize.main(["--dvae", str(assets / "dvae"), "--n", "4", "--out", str(assets / "tok-train")])


@pytest.fixture(scope="module")
def trained_run(assets):
    """A tiny run of tools/train_dalle.py with a sample grid at each evaluation: its run directory."""
    run = assets / "run"
    args = ["--config", "configs/dalle/tiny.yaml", "--out", str(run), "--no-progress", "--device", "cpu",
            "--set", f"data.path={assets / 'tok-train'}", "--set", f"data.val_path={assets / 'tok-val'}",
            "--set", f"inputs.tokenizer={assets / 'tokenizer.json'}", "--set", f"inputs.dvae={assets / 'dvae'}",
            "--set", "objective.sample_prompts=[a red circle, a blue square above a green star]"]
    assert train_dalle.main(args) == 0
    return run


def test_train_dalle_tool(assets, trained_run):
    run = trained_run
    ckpt = latest_checkpoint(run)
    assert (ckpt / "tokenizer.json").is_file()
    model = load_pretrained(run)
    assert isinstance(model, DALLE) and model.config.text_vocab_size == TextTokenizer.from_file(
        assets / "tokenizer.json").vocab_size
    assert list((run / "eval").glob("samples-*.png"))
    evals = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"val_text_loss", "val_image_loss"} <= set(evals[-1])
    with pytest.raises(SystemExit, match="tokenizer"):
        train_dalle.main(["--config", "configs/dalle/tiny.yaml", "--out", str(assets / "run2"),
                          "--set", f"data.path={assets / 'tok-train'}"])


def _task(assets, seed=0):
    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    torch.manual_seed(seed)
    model = DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2, dropout=0.1))
    return DALLETask(model, DALLEObjective(caption_drop=0.3, val_samples=8), tok, TokenShards(assets / "tok-train"),
                     TokenShards(assets / "tok-val"))


def test_dalle_resume_equals_uninterrupted(assets, tmp_path):
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, weight_decay=0.1, betas=(0.9, 0.96),
                      eval_every=100, save_every=4, log_every=4)
    full = Trainer(_task(assets), cfg, tmp_path / "a", progress=False)
    full.fit()
    Trainer(_task(assets), cfg, tmp_path / "b", progress=False).fit(stop_at=4)
    resumed = Trainer(_task(assets, seed=9), cfg, tmp_path / "b", progress=False)
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_weight_decay_on_matrices_only(assets):
    task = _task(assets)
    decay, rest = task.param_groups(task.model)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in rest["params"])
    assert rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(list(task.model.parameters()))


def test_generate_cli_writes_images_and_sidecars(trained_run, tmp_path):
    import generate

    run = trained_run
    out = tmp_path / "out"
    args = ["a red circle", "a blue square above a green star", "--model", str(run), "--num-images", "3",
            "--batch-size", "4", "--seed", "5", "--top-k", "16", "--out", str(out), "--grid", "--no-progress"]
    assert generate.main(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted([f"a-red-circle-{i}.png" for i in range(3)] + ["a-red-circle-grid.png"]
                           + [f"a-blue-square-above-a-green-star-{i}.png" for i in range(3)]
                           + ["a-blue-square-above-a-green-star-grid.png"])
    meta = json.loads((out / "a-red-circle-2.json").read_text())
    assert meta["prompt"] == "a red circle" and meta["seed"] == 7 and meta["top_k"] == 16
    assert meta["model"].startswith("step-0000020@")
    # The sidecar regenerates its image exactly, alone and in another batch.
    again = tmp_path / "again"
    assert generate.main(["a red circle", "--model", str(run), "--num-images", "1", "--seed", "7", "--top-k", "16",
                          "--out", str(again), "--no-progress"]) == 0
    assert (again / "a-red-circle-0.png").read_bytes() == (out / "a-red-circle-2.png").read_bytes()


def test_generate_errors_a_user_can_act_on(assets, tmp_path):
    import generate

    with pytest.raises(SystemExit, match="does not exist"):
        generate.main(["x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        generate.main(["--model", str(assets / "run")])  # no prompt
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out"):
        generate.main(["x", "--model", str(assets / "run"), "--out", str(blocker / "sub")])


def test_train_on_raw_images_encodes_on_the_fly(assets, tmp_path):
    """data.source shapes + inputs.dvae: images are encoded by the dVAE inside the training step."""
    run = tmp_path / "raw"
    assert train_dalle.main(["--config", "configs/dalle/tiny.yaml", "--out", str(run), "--no-progress",
                             "--device", "cpu", "--set", "data.source=shapes", "--set", "data.train_size=32",
                             "--set", "data.val_size=8", "--set", "train.steps=4", "--set", "train.eval_every=4",
                             "--set", f"inputs.tokenizer={assets / 'tokenizer.json'}",
                             "--set", f"inputs.dvae={assets / 'dvae'}"]) == 0
    assert latest_checkpoint(run).name == "step-0000004"
    with pytest.raises(SystemExit, match="inputs.dvae"):
        train_dalle.main(["--config", "configs/dalle/tiny.yaml", "--out", str(tmp_path / "x"),
                          "--set", "data.source=shapes", "--set", f"inputs.tokenizer={assets / 'tokenizer.json'}"])


def test_streaming_raw_images_get_tokenised_text(assets, tmp_path):
    """webdataset shards of raw images: captions are tokenised per sample, reproducibly."""
    from dalle.data.readers import collate_skip_bad, webdataset_pairs
    from dalle.data.transforms import transform_from_name
    from dalle.train.tasks.transformer import CaptionedStream
    from dalle_tools import make_shapes

    make_shapes.main(["--n", "6", "--out", str(tmp_path / "wds"), "--image-size", "32", "--shards",
                      "--shard-size", "3"])
    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    stream = webdataset_pairs(str(tmp_path / "wds" / "shapes-{000000..000001}.tar"),
                              transform_from_name("dalle", 32), shuffle=0)
    ds = CaptionedStream(stream, tok, 12, DALLEObjective(caption_drop=0.0), True)
    a = collate_skip_bad(list(ds))
    b = collate_skip_bad(list(ds))
    assert a["text"].shape == (6, 12) and a["image"].shape == (6, 3, 32, 32)
    assert torch.equal(a["text"], b["text"])


def test_shapes_config_trains_through_an_evaluation_with_its_sample_grid(assets, tmp_path):
    """The shipped stage-2 config (bf16 autocast, top-k sample grid) at tiny sizes: sampling inside the
    evaluation's autocast must work, and the run must reach its save."""
    run = tmp_path / "run"
    tiny = ["model.text_seq_len=12", "model.image_vocab_size=64", "model.image_grid_size=4", "model.n_embd=32",
            "model.n_layer=4", "model.n_head=4", "model.conv_kernel=3", "objective.val_samples=8",
            "train.steps=4", "objective.second_mix_at=2", "train.batch_size=4", "train.warmup_steps=1",
            "train.eval_every=2", "train.save_every=4", "train.log_every=2", f"data.path={assets / 'tok-train'}",
            f"data.val_path={assets / 'tok-val'}", f"inputs.tokenizer={assets / 'tokenizer.json'}",
            f"inputs.dvae={assets / 'dvae'}"]
    args = ["--config", "configs/dalle/shapes.yaml", "--out", str(run), "--no-progress", "--device", "cpu"]
    assert train_dalle.main(args + [x for kv in tiny for x in ("--set", kv)]) == 0
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["train"]["precision"] == "bf16" and recorded["objective"]["sample_top_k"] > 0
    assert len(list((run / "eval").glob("samples-*.png"))) == 2
    assert latest_checkpoint(run).name == "step-0000004"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_sampling_works_under_cpu_autocast(assets, dtype):
    from dalle.transformer.sampling import sample

    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    model = DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size)).eval()
    text, _ = tok.encode_batch(["a red circle", "a blue square"], 12)
    with torch.autocast("cpu", dtype=dtype):
        cached = sample(model, text, top_k=8, cond_scale=3.0, generator=torch.Generator().manual_seed(1))
        plain = sample(model, text, top_k=8, cond_scale=3.0, generator=torch.Generator().manual_seed(1),
                       use_cache=False)
    assert cached.shape == (2, 16) and torch.equal(cached, plain)


def test_a_failing_evaluation_saves_the_training_since_the_last_checkpoint(assets, tmp_path):
    task = _task(assets)

    def broken(*_args):
        raise RuntimeError("evaluation broke")
    task.evaluate = broken
    cfg = TrainConfig(steps=6, batch_size=4, eval_every=3, save_every=100, log_every=3)
    trainer = Trainer(task, cfg, tmp_path / "run", progress=False)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"
