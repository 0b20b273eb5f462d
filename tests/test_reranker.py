"""The reranker (paper sec. 2.5): Reranker model, InfoNCE loss, rerank/best, training tool and checkpoints."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from dalle import checkpoint
from dalle.config import from_dict
from dalle.data.shapes import ShapesDataset
from dalle.reranker.model import Reranker, RerankerConfig, contrastive_loss
from dalle.reranker.score import best, rerank
from dalle.tokenizer import TextTokenizer
from dalle.train.checkpoints import latest_checkpoint
from dalle.train.config import load_yaml
from dalle.train.tasks.reranker import RerankerObjective, RerankerTask
from dalle_tools import train_bpe, train_reranker

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "reranker"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("reranker") / "tokenizer.json"
    assert train_bpe.main(["--shapes", "1000", "--vocab", "512", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return TextTokenizer.from_file(tokenizer_path)


def tiny(tok, **kw) -> Reranker:
    return Reranker(tiny_config("reranker", **{"text_vocab_size": tok.vocab_size, **kw}))


def pairs(tok, n, size=32, text_len=16):
    ds = ShapesDataset("train", size=n, image_size=size)
    ids, _ = tok.encode_batch([ds[i]["caption"] for i in range(n)], text_len, truncate_warn=False)
    return ids, torch.stack([ds[i]["image"] for i in range(n)])


def test_encodings_are_unit_vectors_and_logits_scaled_cosines(tok):
    model = tiny(tok).eval()
    ids, images = pairs(tok, 3)
    t, i = model.encode_text(ids), model.encode_image(images[:2])
    assert t.shape == (3, 32) and i.shape == (2, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(2))
    per_image, per_text = model(ids, images[:2])
    assert per_image.shape == (2, 3) and torch.equal(per_text, per_image.T)
    torch.testing.assert_close(per_image, (1 / 0.07) * i @ t.T)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # the temperature is capped at 100
    assert model.scale().item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="padded ids"):
        model.encode_text(ids[:, :5])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode_image(images[:, :, :16])


def test_contrastive_loss_is_symmetric_info_nce():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, -2.0, 0.5]])

    def ce(rows):  # mean over i of -log softmax(rows[i])[i], by hand
        return sum(math.log(sum(math.exp(v) for v in r)) - r[i] for i, r in enumerate(rows)) / len(rows)

    rows = logits.tolist()
    expected = (ce(rows) + ce([list(c) for c in zip(*rows)])) / 2
    assert contrastive_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_loss(logits.T).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(logits[:2])


def test_pads_are_ignored_and_the_empty_prompt_works(tok):
    model = tiny(tok).eval()
    v, t = tok.vocab_size, model.config.text_seq_len
    ids, _ = tok.encode_batch(["a red circle", ""], t)
    assert (ids[1] >= v).all()  # the empty prompt is all pads
    shared = torch.where(ids >= v, torch.full_like(ids, v), ids)  # one pad id instead of one per position
    out = model.encode_text(ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model.encode_text(shared))
    torch.testing.assert_close(out[1].norm(), torch.tensor(1.0))
    assert not torch.allclose(out[0], out[1])


def test_loss_falls_on_a_tiny_batch(tok):
    torch.manual_seed(0)
    model = tiny(tok)
    ids, images = pairs(tok, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        loss = contrastive_loss(model(ids, images)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def _predictable_reranker(tok) -> Reranker:
    """A reranker whose image score is a known increasing function of the image's mean brightness."""
    model = tiny(tok).eval()
    model.encode_text = lambda ids: torch.tensor([[1.0, 0.0]]).expand(len(ids), 2)
    model.encode_image = lambda x: F.normalize(torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], -1), dim=-1)
    return model


def test_rerank_scores_in_input_order_and_best_picks_the_highest(tok):
    reranker = _predictable_reranker(tok)
    levels = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5])
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 32, 32)
    expected = levels / (levels**2 + (1 - levels) ** 2).sqrt()  # cosine with the text's [1, 0]
    scores = rerank(reranker, tok, "a red circle", images, batch_size=2)
    torch.testing.assert_close(scores, expected)
    assert best(scores, 3).tolist() == [1, 3, 4]
    assert best(scores, 5).tolist() == [1, 3, 4, 0, 2]
    # Other sizes are resized to the reranker's; logit_scaled multiplies by the temperature.
    big = levels.view(-1, 1, 1, 1).expand(-1, 3, 64, 64)
    torch.testing.assert_close(rerank(reranker, tok, "x", big, logit_scaled=True), expected / 0.07)
    with pytest.raises(ValueError, match="k must be"):
        best(scores, 6)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        rerank(reranker, tok, "x", images[0])


def test_rerank_with_a_real_model_agrees_with_its_encodings(tok):
    model = tiny(tok).eval()
    ids, images = pairs(tok, 4)
    prompt = ShapesDataset("train", size=4, image_size=32)[0]["caption"]
    scores = rerank(model, tok, prompt, images)
    with torch.no_grad():
        expected = model.encode_image(images) @ model.encode_text(ids[:1])[0]
    torch.testing.assert_close(scores, expected)


def test_save_load_gives_identical_encodings(tok, tmp_path):
    model = tiny(tok).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    checkpoint.save_pretrained(model, tmp_path / "reranker")
    loaded = checkpoint.load_pretrained(tmp_path / "reranker", expect="reranker")
    assert isinstance(loaded, Reranker) and loaded.config == model.config
    ids, images = pairs(tok, 3)
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.scale(), loaded.scale())


def test_streamed_captions_are_tokenised_per_step(tok):
    task = RerankerTask(tiny(tok), RerankerObjective(), tok, ShapesDataset("train", 8, image_size=32),
                    ShapesDataset("val", 8, image_size=32))
    batch = {"caption": ["a red circle", "a small blue square above a green star"]}
    plain, _ = tok.encode_batch(batch["caption"], 16, truncate_warn=False)
    assert torch.equal(task._text(batch, 3, train=False), plain)
    assert torch.equal(task._text(batch, 3, train=True), task._text(batch, 3, train=True))  # seeded by step
    with pytest.raises(ValueError, match="text_vocab_size"):
        RerankerTask(tiny(tok, text_vocab_size=tok.vocab_size + 1), RerankerObjective(), tok, [], [])


def test_train_reranker_tool(tokenizer_path, tmp_path):
    run = tmp_path / "run"
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--out", str(run), "--no-progress", "--device", "cpu",
            "--set", f"inputs.tokenizer={tokenizer_path}"]
    assert train_reranker.main(args) == 0
    latest = latest_checkpoint(run)
    assert (latest / "tokenizer.json").is_file()
    assert json.loads((latest / "config.json").read_text())["model_type"] == "reranker"
    model = checkpoint.load_pretrained(run)
    assert isinstance(model, Reranker) and model.config.text_vocab_size == TextTokenizer.from_file(
        tokenizer_path).vocab_size
    evals = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {"i2t_top1", "t2i_top1", "clip_score", "val_loss"} <= set(evals[-1])
    assert 0 <= evals[-1]["i2t_top1"] <= 1 and -1 <= evals[-1]["clip_score"] <= 1
    with pytest.raises(SystemExit, match="tokenizer"):
        train_reranker.main(["--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "run2")])
    with pytest.raises(SystemExit, match="raw images"):
        train_reranker.main(args + ["--set", "data.source=tokens", "--set", "data.path=x"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_reranker_configs(path):
    from dalle.data.sources import DataConfig
    from dalle.train.config import TrainConfig
    from dalle.train.tasks.reranker import RerankerInputs

    data = load_yaml(path)
    assert set(data) <= set(train_reranker.SECTIONS)
    for cls, key in ((RerankerObjective, "objective"), (TrainConfig, "train"), (DataConfig, "data"),
                     (RerankerInputs, "inputs")):
        from_dict(cls, data.get(key))
    cfg = from_dict(RerankerConfig, data["model"])
    model = Reranker(RerankerConfig(**{**cfg.to_dict(), "text_vocab_size": cfg.text_vocab_size or 100}))
    ids = torch.full((2, cfg.text_seq_len), 100)
    per_image, _ = model(ids, torch.rand(2, 3, cfg.image_size, cfg.image_size))
    assert per_image.shape == (2, 2)
