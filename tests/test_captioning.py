"""One transformer, both directions: the reading layouts' masks and positions, cached writing against the
uncached stream, an old text-to-image checkpoint unchanged, and a tiny model that learns to caption."""

import dataclasses
import json
import math
import random

import pytest
import torch
from tiny import tiny_config

from dalle.captioning import Text, caption_codes, prompt_logprob
from dalle.checkpoint import load_pretrained, save_pretrained
from dalle.pipeline import Pipeline
from dalle.tokenizer import TextTokenizer
from dalle.train.tasks.transformer import Captioned, DALLEObjective, DALLETask
from dalle.transformer.attention import dense_mask
from dalle.transformer.layouts import LAYOUTS, generated_mask, pack_qa
from dalle.transformer.model import DALLE
from dalle.transformer.reading import text_logprob, write

CFG = tiny_config("dalle", text_vocab_size=40, text_seq_len=6, image_vocab_size=24,
                  layouts=("t2i", "caption", "qa"))
CAPTION, QA = LAYOUTS.index("caption"), LAYOUTS.index("qa")


def model_for(schedule="paper"):
    torch.manual_seed(0)
    return DALLE(dataclasses.replace(CFG, attn_schedule=schedule)).eval()


def codes(b, seed=0):
    return torch.randint(0, CFG.image_vocab_size, (b, CFG.image_seq_len), generator=torch.Generator().manual_seed(seed))


def test_image_first_masks_keep_the_sparse_image_pattern_and_let_text_read_the_whole_image():
    t, g, n = CFG.text_seq_len, CFG.image_grid_size, CFG.image_seq_len
    for kind in ("row", "column", "conv"):
        text_first = dense_mask(kind, t, g, 3)
        first = dense_mask(kind, t, g, 3, image_first=True)
        assert torch.equal(first[:n, :n], text_first[t:, t:])  # the same pattern among image slots
        assert not first[:n, n:].any()  # the image reads no text: it comes first
        assert first[n:, :n].all()  # every text slot reads every image slot
        assert torch.equal(first[n:, n:], torch.ones(t, t, dtype=torch.bool).tril())  # causal among text


def test_positions_belong_to_the_token_kind():
    model = model_for()
    image = codes(2)
    text = torch.randint(0, CFG.text_vocab_size, (2, CFG.text_seq_len))
    layout, answer_at = torch.tensor([CAPTION, QA]), torch.tensor([0, 2])
    x = model.embed_reading(text, image, layout, answer_at)  # (2, N + T, d)
    n, t = CFG.image_seq_len, CFG.text_seq_len
    # the image slots are the text-to-image stream's, whichever side of the text the image sits on
    torch.testing.assert_close(x[:, :n], model.embed_image(image, 0))
    torch.testing.assert_close(x[:, :n], torch.cat([model.embed_text(text), model.embed_image(image, 0)], 1)[:, t:])
    # the last image token rides on the start slot, with the layout's start token and text slot 0's position
    torch.testing.assert_close(x[0, n], model.soc + model.text_pos[0] + model.image_emb(image[0, -1]))
    torch.testing.assert_close(x[1, n], model.soq + model.text_pos[0] + model.image_emb(image[1, -1]))


def test_a_joint_checkpoint_saved_before_reading_image_keeps_reading_each_token_at_its_cell(tmp_path):
    torch.manual_seed(0)
    old = DALLE(dataclasses.replace(CFG, reading_image="cells")).eval()
    save_pretrained(old, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    saved = json.loads(path.read_text())
    del saved["config"]["reading_image"]  # as written before the option
    path.write_text(json.dumps(saved))
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.reading_image == "cells"
    image, text = codes(2), torch.randint(0, CFG.text_vocab_size, (2, CFG.text_seq_len))
    x = loaded.embed_reading(text, image, torch.tensor([CAPTION, CAPTION]), torch.zeros(2, dtype=torch.long))
    g = CFG.image_grid_size
    for k in (0, 5, CFG.image_seq_len - 1):  # the token of cell (r, c) with row r's and column c's embedding
        want = loaded.image_emb(image[:, k]) + loaded.row_pos[k // g] + loaded.col_pos[k % g]
        torch.testing.assert_close(x[:, k], want)
    torch.testing.assert_close(x[0, CFG.image_seq_len], loaded.soc + loaded.text_pos[0])
    with pytest.raises(ValueError, match="reading_image"):
        dataclasses.replace(CFG, reading_image="sideways")


@pytest.mark.parametrize("schedule", ["paper", "full"])
def test_reading_rows_text_reads_the_image_and_is_causal(schedule):
    model = model_for(schedule)
    image, text = codes(1), torch.randint(0, CFG.text_vocab_size, (1, CFG.text_seq_len))
    rows, at = torch.tensor([CAPTION]), torch.tensor([0])
    base = model(text, image, rows, at)[0]
    later = text.clone()
    later[0, 3] = (later[0, 3] + 1) % CFG.text_vocab_size  # token 3 feeds text slot 4
    moved = model(later, image, rows, at)[0]
    torch.testing.assert_close(base[:, :4], moved[:, :4])
    assert not torch.allclose(base[:, 4:], moved[:, 4:])
    corner = image.clone()
    corner[0, -1] = (corner[0, -1] + 1) % CFG.image_vocab_size  # the last image token: every text slot sees it
    assert (model(text, corner, rows, at)[0] - base).abs().amax(dim=-1).min() > 0


def test_a_mixed_batch_gives_each_row_its_own_layout():
    model = model_for()
    image, text = codes(3), torch.randint(0, CFG.text_vocab_size, (3, CFG.text_seq_len))
    layout, at = torch.tensor([0, CAPTION, QA]), torch.tensor([0, 0, 2])
    together = model(text, image, layout, at)
    for i in range(3):
        alone = model(text[i : i + 1], image[i : i + 1], layout[i : i + 1], at[i : i + 1])
        torch.testing.assert_close(together[0][i : i + 1], alone[0], atol=1e-5, rtol=1e-5)
        if i == 0:
            torch.testing.assert_close(together[1][:1], alone[1], atol=1e-5, rtol=1e-5)


def test_only_the_written_text_counts():
    vocab, t = 40, 6
    row, at = pack_qa([3, 4], [7], t, vocab)
    assert row == [3, 4, 7, vocab + 3, vocab + 4, vocab + 5] and at == 2
    caption = torch.tensor([[5, 6, vocab + 2, vocab + 3, vocab + 4, vocab + 5]])
    mask = generated_mask(torch.tensor([row] + caption.tolist()), torch.tensor([2, 0]), vocab)
    assert mask.tolist() == [[False, False, True, True, False, False], [True, True, True, False, False, False]]


@pytest.mark.parametrize("schedule", ["paper", "full"])
@pytest.mark.parametrize("how", [{}, {"beam": 3, "num": 2}, {"sample": True, "num": 2, "top_k": 5}])
def test_cached_writing_equals_uncached(schedule, how):
    model = model_for(schedule)
    image = codes(3)
    prompt = CFG.text_vocab_size + torch.arange(CFG.text_seq_len).expand(3, -1).clone()
    question = prompt.clone()
    question[:, :2] = torch.tensor([3, 9])
    for layout, text, at in (("caption", prompt, 0), ("qa", question, 2)):
        outs = []
        for cached in (True, False):
            gens = [torch.Generator().manual_seed(i) for i in range(6)] if how.get("sample") else None
            outs.append(write(model, image, text, layout, at, generator=gens, use_cache=cached, **how))
        for a, b in zip(*outs):
            assert [ids.tolist() for ids, _ in a] == [ids.tolist() for ids, _ in b]
            assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-4)
        # the score of a written text is its teacher-forced log-probability
        best = torch.stack([texts[0][0] for texts in outs[0]])
        torch.testing.assert_close(text_logprob(model, image, best, layout, torch.full((3,), at)),
                                   torch.tensor([texts[0][1] for texts in outs[0]]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", [{}, {"beam": 3, "num": 2}, {"sample": True, "num": 2, "top_k": 5}])
def test_prior_guided_captions_cached_equal_uncached_and_keep_the_unguided_score(how):
    model = model_for()
    image = codes(3)
    prompt = CFG.text_vocab_size + torch.arange(CFG.text_seq_len).expand(3, -1).clone()
    outs = []
    for cached in (True, False):
        gens = [torch.Generator().manual_seed(i) for i in range(6)] if how.get("sample") else None
        outs.append(write(model, image, prompt, "caption", 0, generator=gens, use_cache=cached, prior_scale=2.0,
                          **how))
    for a, b in zip(*outs):
        assert [ids.tolist() for ids, _ in a] == [ids.tolist() for ids, _ in b]
        assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-4)
    # the score returned is the model's own log p of the text, not the guided one
    best = torch.stack([texts[0][0] for texts in outs[0]])
    torch.testing.assert_close(text_logprob(model, image, best, "caption", torch.zeros(3, dtype=torch.long)),
                               torch.tensor([texts[0][1] for texts in outs[0]]), atol=1e-4, rtol=1e-4)


def test_prior_guidance_picks_by_the_guided_score_and_refuses_answers():
    from dalle.transformer.decoding import KVCache, decode_text_step, prefill_text_prior

    model, s = model_for(), 3.0
    image = codes(4, seed=1)
    prompt = CFG.text_vocab_size + torch.arange(CFG.text_seq_len).expand(4, -1).clone()
    # greedy's first word maximises (1 + s) log p(w | image) - s log p(w), the prior read from <sot> alone
    reading = model(prompt, image, torch.full((4,), CAPTION))[0][:, 0].log_softmax(-1)
    cache = KVCache(CFG, 4, "cpu", torch.float32, text_only=True)
    prior = prefill_text_prior(model, 4, cache).log_softmax(-1)
    torch.testing.assert_close(prior, model(prompt, image)[0][:, 0].log_softmax(-1))  # t2i text slot 0
    allowed = slice(0, CFG.text_vocab_size + 1)  # words, and the end token of text slot 0
    reading, prior = reading[:, allowed], prior[:, allowed]
    contrast = (1 + s) * reading - s * prior
    for plausible in (1e-6, 0.9):  # only words within that factor of the image-conditioned best may win
        first = [texts[0][0][0].item() for texts in write(model, image, prompt, "caption", 0, prior_scale=s,
                                                         plausible=plausible)]
        keep = reading >= reading.amax(-1, keepdim=True) + math.log(plausible)
        assert first == contrast.masked_fill(~keep, float("-inf")).argmax(-1).tolist()
    assert contrast.argmax(-1).tolist() != reading.argmax(-1).tolist()  # guidance changes a choice here
    assert first != contrast.argmax(-1).tolist()  # and the constraint changes one back
    assert decode_text_step(model, torch.tensor(first), cache).shape == (4, CFG.text_vocab_total)  # text slot 1 follows
    with pytest.raises(ValueError, match="answers have no such prior"):
        write(model, image, prompt, "qa", 2, prior_scale=1.0)
    with pytest.raises(ValueError, match="plausible must be in"):
        write(model, image, prompt, "caption", 0, prior_scale=1.0, plausible=0.0)
    with pytest.raises(ValueError, match="prior_scale must be >= 0"):
        write(model, image, prompt, "caption", 0, prior_scale=-1.0)
    reader = DALLE(dataclasses.replace(CFG, layouts=("caption",))).eval()  # reads, never drew: no prior
    with pytest.raises(ValueError, match="layouts with 't2i'"):
        write(reader, image, prompt, "caption", 0, prior_scale=1.0)
    with pytest.raises(ValueError, match="needs a model that also draws"):  # nor log p(image | caption)
        caption_codes(Pipeline(reader, None, None, "reader"), image, candidates=2)
    with pytest.raises(ValueError, match="candidates must be at least 1"):
        caption_codes(Pipeline(model, None, None, "joint"), image, candidates=0)


def test_an_old_checkpoint_without_layouts_loads_strictly_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    old = DALLE(dataclasses.replace(CFG, layouts=("t2i",))).eval()
    save_pretrained(old, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())["config"]
    assert "layouts" not in config  # written as every checkpoint before the reading layouts: runs resume
    loaded = load_pretrained(tmp_path / "m").eval()
    assert not hasattr(loaded, "soc") and loaded.config.layouts == ("t2i",)
    image, text = codes(2), torch.randint(0, CFG.text_vocab_size, (2, CFG.text_seq_len))
    assert all(torch.equal(a, b) for a, b in zip(loaded(text, image), old(text, image)))
    with pytest.raises(ValueError, match="no 'caption' layout"):
        write(loaded, image, text, "caption", 0)


def test_a_tiny_model_learns_to_caption_a_handful_of_scenes():
    from dalle_tools.train_bpe import shapes_captions

    tok = TextTokenizer.train(shapes_captions(2000), vocab_size=400)
    captions = list(shapes_captions(6))  # those of shapes train scenes 0..5, up to 12 tokens
    cfg = tiny_config("dalle", text_vocab_size=tok.vocab_size, text_seq_len=16, layouts=("t2i", "caption"))
    data = [{"codes": codes(1, seed=i)[0].clamp_max(cfg.image_vocab_size - 1), "caption": c, "key": str(i)}
            for i, c in enumerate(captions)]
    objective = DALLEObjective(mix_t2i=0.5, mix_caption=0.5, bpe_dropout=False)
    torch.manual_seed(0)
    model = DALLE(cfg)
    task = DALLETask(model, objective, tok, data, data)
    train = Captioned(data, tok, cfg.text_seq_len, objective, True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for step in range(250):
        rows = [train[(i, rng.randrange(2**31))] for i in range(len(data))]
        batch = {k: torch.stack([r[k] for r in rows]) for k in ("text", "codes", "layout", "answer_at")}
        loss, metrics = task.loss(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    pipe = Pipeline(model, tok, None, "tiny")  # codes given: no dVAE needed
    stack = torch.stack([d["codes"] for d in data])
    written = caption_codes(pipe, stack, beam=2)
    assert [texts[0].text for texts in written] == captions
    assert [texts[0].text for texts in caption_codes(pipe, stack, candidates=3)] == captions  # both directions agree
    assert all(isinstance(t[0], Text) and t[0].logprob > -1.0 for t in written)
    # the model's own score prefers each image's caption to the other images' captions
    scores = torch.stack([prompt_logprob(pipe, stack, [c] * len(data)) for c in captions])  # (caption, image)
    assert torch.equal(scores.argmax(dim=0), torch.arange(len(data)))
