"""Training both directions through the one engine: shapes questions in token shards, own data's `qa`
side-file field, the mix of directions per sample, bf16 runs and bitwise resume."""

import json
import logging

import pytest
import torch
from tiny import tiny_config

from dalle.checkpoint import load_pretrained, save_pretrained
from dalle.data.qa import parse_qa, qa_for_sample, shapes_qa
from dalle.data.shapes import HELDOUT_PAIRS, Scene, converse_caption, make_sample
from dalle.data.tokens import TokenShards
from dalle.evaluation.captions import judge_caption
from dalle.tokenizer import TextTokenizer
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer
from dalle.train.tasks.transformer import Captioned, DALLEObjective, DALLETask
from dalle.transformer.layouts import LAYOUTS
from dalle.transformer.model import DALLE
from dalle_tools import pretokenize, train_bpe, train_dalle
from dvae.model import DiscreteVAE


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint-train")
    torch.manual_seed(0)
    save_pretrained(DiscreteVAE(tiny_config("dvae", downsample=8)), root / "dvae")
    for split, n in (("train", 32), ("val", 8)):
        assert pretokenize.main(["--dvae", str(root / "dvae"), "--source", "shapes", "--split", split, "--n", str(n),
                                 "--out", str(root / f"tok-{split}"), "--batch-size", "16", "--device", "cpu"]) == 0
    assert train_bpe.main(["--shapes", "400", "--questions", "--vocab", "400", "--out",
                           str(root / "tokenizer.json")]) == 0
    return root


def test_shapes_questions_describe_their_scene():
    sample = make_sample(1)  # a large blue circle to the right of a small cyan diamond
    qa = {q: (a, kind) for q, a, kind in shapes_qa(sample.scene)}
    assert qa["how many objects?"] == ("two", "count")
    assert qa["what colour is the circle?"] == ("blue", "colour")
    assert qa["is the diamond large?"] == ("no", "size")
    assert qa["where is the blue circle?"] == ("to the right of the cyan diamond", "where")
    assert qa["which shape is to the left of the blue circle?"] == ("cyan diamond", "which")
    # a zeroshot scene's questions name its held-out pair: they come from the split's own scenes only
    for i in range(20):
        s = make_sample(i, "zeroshot", image_size=16)
        if len(s.scene.objects) == 1 and (s.scene.objects[0].colour, s.scene.objects[0].shape) in HELDOUT_PAIRS:
            o = s.scene.objects[0]
            assert (f"what colour is the {o.shape}?", o.colour, "colour") in shapes_qa(s.scene)
            break
    else:
        pytest.fail("no single-object pair-novel zeroshot scene among the first 20")


def test_token_shards_carry_each_scenes_questions(assets):
    ds = TokenShards(assets / "tok-train")
    record = json.loads((assets / "tok-train" / "tokens-000000.jsonl").read_text().splitlines()[3])
    scene = Scene.from_dict(json.loads(make_sample(3, image_size=32).to_json()))
    assert record["qa"] == [[q, a] for q, a, _ in shapes_qa(scene)]
    assert qa_for_sample(ds[3]) == [(q, a) for q, a, _ in shapes_qa(scene)]


def test_own_data_questions_come_from_the_side_files_qa_field(caplog):
    meta = json.dumps({"qa": [{"question": "what is it?", "answer": "a cat"}, ["where?", "on a mat"]]})
    assert qa_for_sample({"key": "k", "meta": meta}) == [("what is it?", "a cat"), ("where?", "on a mat")]
    assert qa_for_sample({"key": "k", "meta": json.dumps({"source": "camera"})}) == []
    with caplog.at_level(logging.WARNING, logger="dalle.data"):
        assert qa_for_sample({"key": "bad", "meta": json.dumps({"qa": [{"question": "q"}]})}) == []
    assert "ignoring the questions of sample 'bad'" in caplog.text
    with pytest.raises(ValueError, match="qa must be a list"):
        parse_qa("what?", "x")


def test_each_sample_is_drawn_in_one_direction_from_its_own_seed(assets):
    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    obj = DALLEObjective(mix_t2i=0.5, mix_caption=0.25, mix_qa=0.25)
    data = [{"codes": torch.zeros(16, dtype=torch.long), "caption": "a red circle", "key": str(i),
             "meta": json.dumps({"qa": [["what colour is the circle?", "red"]]})} for i in range(400)]
    view = Captioned(data, tok, 16, obj, True)
    rows = [view[(i, i)] for i in range(400)]
    shares = torch.bincount(torch.stack([r["layout"] for r in rows]), minlength=3).float() / 400
    assert torch.allclose(shares, torch.tensor([0.5, 0.25, 0.25]), atol=0.07)
    assert all(torch.equal(view[(i, i)]["text"], rows[i]["text"]) for i in range(20))  # a seed's draw repeats
    qa = next(r for r in rows if r["layout"] == LAYOUTS.index("qa"))
    question, answer = tok.encode("what colour is the circle?"), tok.encode("red")
    assert qa["answer_at"] == len(question) and qa["text"][: len(question) + len(answer)].tolist() == question + answer
    caption = next(r for r in rows if r["layout"] == LAYOUTS.index("caption"))
    ids = tok.encode("a red circle")  # the caption without BPE dropout, then its end-of-text pad
    assert caption["text"][: len(ids) + 1].tolist() == ids + [tok.vocab_size + len(ids)]
    with pytest.raises(ValueError, match="no 'caption' layout.*shapes.yaml"):
        DALLETask(DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size)), obj, tok, data, data)


def test_caption_rows_may_name_two_objects_in_either_order(assets):
    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    two = "a large red circle to the left of a blue square"
    converse = "a blue square to the right of a large red circle"
    assert converse_caption(two) == converse and converse_caption(converse) == two
    assert converse_caption("a red circle on the left") is None and converse_caption("two cats") is None
    scene = Scene.from_dict(json.loads(make_sample(1).to_json()))
    assert judge_caption(converse_caption(make_sample(1).caption), scene).all_correct  # the same picture
    data = [{"codes": torch.zeros(16, dtype=torch.long), "caption": c, "key": str(i)}
            for i, c in enumerate([two] * 60 + ["a red circle on the left"] * 10)]

    def written(obj, train=True):
        view = Captioned(data, tok, 16, obj, train)
        rows = [view[(i, i)] for i in range(len(data))]
        return [(tok.decode([t for t in r["text"].tolist() if t < tok.vocab_size]).strip(), r["layout"].item())
                for r in rows]

    either = DALLEObjective(mix_t2i=0.5, mix_caption=0.5, caption_either_order=True, bpe_dropout=False)
    rows, plain = written(either), written(DALLEObjective(mix_t2i=0.5, mix_caption=0.5, bpe_dropout=False))
    caption = LAYOUTS.index("caption")
    said = {text for text, layout in rows[:60] if layout == caption}
    assert said == {two, converse}  # both namings of the same image
    assert {text for text, layout in rows[60:] if layout == caption} == {"a red circle on the left"}
    # text-to-image rows, and every row of a run without the option, are what they were
    assert [r for r in rows if r[1] != caption] == [r for r in plain if r[1] != caption]
    assert {text for text, layout in plain if layout == caption} <= {two, "a red circle on the left"}
    assert {text for text, _ in written(either, train=False)} <= {two, "a red circle on the left", ""}


def test_joint_config_trains_in_bf16_with_every_directions_losses(assets):
    run = assets / "run"
    assert train_dalle.main(["--config", "configs/dalle/tiny-joint.yaml", "--out", str(run), "--no-progress",
                             "--device", "cpu", "--set", f"data.path={assets / 'tok-train'}",
                             "--set", f"data.val_path={assets / 'tok-val'}", "--set", "model.text_seq_len=16",
                             "--set", f"inputs.tokenizer={assets / 'tokenizer.json'}",
                             "--set", f"inputs.dvae={assets / 'dvae'}", "--set", "train.precision=bf16"]) == 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    trained = set().union(*(set(e) for e in log if e.get("event") == "train"))
    assert {"text_loss", "image_loss", "caption_loss", "answer_loss"} <= trained
    evals = [e for e in log if e.get("event") == "eval"]
    assert {"val_image_loss", "val_caption_loss", "val_answer_loss"} <= set(evals[-1])
    assert load_pretrained(run).config.layouts == ("t2i", "caption", "qa")


def _task(assets, seed=0, obj=None):
    tok = TextTokenizer.from_file(assets / "tokenizer.json")
    torch.manual_seed(seed)
    model = DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, text_seq_len=16, n_layer=2,
                              layouts=("t2i", "caption", "qa")))
    obj = obj or DALLEObjective(mix_t2i=0.5, mix_caption=0.25, mix_qa=0.25, val_samples=8)
    return DALLETask(model, obj, tok, TokenShards(assets / "tok-train"), TokenShards(assets / "tok-val"))


def test_joint_resume_equals_uninterrupted(assets, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=100, save_every=3, log_every=3)
    full = Trainer(_task(assets), cfg, tmp_path / "a", progress=False)
    full.fit()
    Trainer(_task(assets), cfg, tmp_path / "b", progress=False).fit(stop_at=3)
    resumed = Trainer(_task(assets, seed=9), cfg, tmp_path / "b", progress=False)
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_stop_at_then_a_second_phase_with_another_mix(assets, tmp_path, capsys):
    # A curriculum by command line: --stop-at ends a run with a checkpoint as a crash would; the same command
    # continues it exactly, and --resume CHECKPOINT into a new --out continues it with another objective.
    def train(out, *extra):
        return train_dalle.main(["--config", "configs/dalle/tiny-joint.yaml", "--out", str(out), "--no-progress",
                                 "--device", "cpu", "--set", f"data.path={assets / 'tok-train'}",
                                 "--set", f"data.val_path={assets / 'tok-val'}", "--set", "model.text_seq_len=16",
                                 "--set", f"inputs.tokenizer={assets / 'tokenizer.json'}",
                                 "--set", f"inputs.dvae={assets / 'dvae'}", "--set", "train.steps=6",
                                 "--set", "train.log_every=1", "--set", "train.eval_every=6",
                                 "--set", "train.save_every=6", *extra])

    def log(out, event="train"):
        return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e.get("event") == event]

    assert train(tmp_path / "whole") == 0
    assert "final: val_text_loss" in capsys.readouterr().out
    assert train(tmp_path / "a", "--stop-at", "3") == 0
    said = capsys.readouterr().out
    assert "stopped at step 3 of 6 (--stop-at)" in said
    assert "final:" not in said  # no evaluation since step 0: nothing to report as the run's last figures
    assert train(tmp_path / "c", "--stop-at", "3", "--set", "train.eval_every=2") == 0
    assert "last evaluation (step 2): val_text_loss" in capsys.readouterr().out  # not passed off as step 3's
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    with pytest.raises(SystemExit, match=r"--stop-at 2: the run is already at step 3"):
        train(tmp_path / "a", "--stop-at", "2")
    with pytest.raises(SystemExit, match=r"--stop-at 7 is past train.steps \(6\)"):
        train(tmp_path / "never", "--stop-at", "7")
    assert not (tmp_path / "never").exists()

    assert train(tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoints" / "step-0000003"),
                 "--set", "objective.mix_t2i=1", "--set", "objective.mix_caption=0", "--set", "objective.mix_qa=0") == 0
    assert train(tmp_path / "a") == 0  # the same command again: to the end, as if never stopped
    whole, again, phased = (load_pretrained(tmp_path / d).state_dict() for d in ("whole", "a", "b"))
    for k in whole:
        torch.testing.assert_close(again[k], whole[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(phased[k], whole[k]) for k in whole)
    second = log(tmp_path / "b")
    assert [e["step"] for e in second] == [4, 5, 6]  # the step, and so the learning rate, go on
    assert [e["lr"] for e in second] == [e["lr"] for e in log(tmp_path / "whole")[3:]]
    assert not any("caption_loss" in e or "answer_loss" in e for e in second)  # the new mix: drawing only
    assert all("caption_loss" in e for e in log(tmp_path / "a")[:3])

    # The same curriculum in one run: objective.second_mix_at. Stopped inside the second phase and continued,
    # it ends with the weights of the two commands above.
    second_mix = ["--set", "objective.second_mix_at=3", "--set", "objective.second_mix_t2i=1"]
    assert train(tmp_path / "one", *second_mix, "--stop-at", "5") == 0
    assert train(tmp_path / "one", *second_mix) == 0
    one_run = load_pretrained(tmp_path / "one").state_dict()
    for k in whole:
        torch.testing.assert_close(one_run[k], phased[k], rtol=0, atol=1e-6, msg=k)
    assert [e["step"] for e in log(tmp_path / "one") if "caption_loss" in e] == [1, 2, 3]
    with pytest.raises(SystemExit, match=r"objective.second_mix_at 6 is not before train.steps \(6\)"):
        train(tmp_path / "late", "--set", "objective.second_mix_at=6", "--set", "objective.second_mix_t2i=1")
    assert not (tmp_path / "late").exists()


def test_a_curriculum_keeps_its_best_and_stops_early_only_in_its_last_phase(assets, tmp_path):
    # Held-out image loss rising from the first evaluation: without the rule, patience 1 would stop the run at
    # step 2 and keep step 1 as best, a model that never saw the second mix.
    task = _task(assets, obj=DALLEObjective(mix_t2i=0.9, mix_caption=0.1, second_mix_at=4, second_mix_caption=1,
                                            val_samples=8))
    task.evaluate = lambda model, step, sink: {"val_image_loss": float(step)}
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=1, save_every=100, log_every=100,
                      early_stop_evals=1)
    trainer = Trainer(task, cfg, tmp_path / "run", progress=False)
    trainer.fit()
    assert trainer.best.step == 4 and trainer.step == 5  # judged from the switch on: best at 4, one stale, stop
    assert (tmp_path / "run" / "checkpoints" / "best").read_text().strip() == "step-0000004"


@pytest.mark.parametrize("rows", [[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])
def test_every_weight_gets_a_gradient_whatever_the_batchs_mix(rows):
    # DDP and DeepSpeed expect a gradient for every weight in every step: a batch that happens to hold one
    # direction only must not leave the others' start tokens or the image head out of the graph.
    class Tok:
        vocab_size = 40

    model = DALLE(tiny_config("dalle", text_vocab_size=40, layouts=("t2i", "caption", "qa")))
    obj = DALLEObjective(mix_t2i=0.5, mix_caption=0.25, mix_qa=0.25)
    task = DALLETask(model, obj, Tok(), [], [])
    text = torch.randint(0, 40, (3, model.config.text_seq_len))
    text[:, 6:] = 40 + torch.arange(6, model.config.text_seq_len)
    batch = {"text": text, "codes": torch.randint(0, 64, (3, 16)), "layout": torch.tensor(rows),
             "answer_at": torch.tensor([0, 0, 3])}
    loss, metrics = task.loss(model, batch, 0)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    names = {0: "image_loss", 1: "caption_loss", 2: "answer_loss"}
    assert {names[r] for r in rows} <= set(metrics)


def test_a_second_mix_is_checked_like_the_first():
    obj = DALLEObjective(mix_t2i=0.9, mix_caption=0.1, second_mix_at=5, second_mix_t2i=0.25, second_mix_qa=0.75)
    assert obj.at(4) is obj and obj.at(5).mix == {"t2i": 0.25, "qa": 0.75} and obj.at(9).second_mix_at == 0
    assert DALLEObjective().at(10**6) == DALLEObjective()  # no second mix: one mix throughout
    with pytest.raises(ValueError, match="second_mix_at is 5: second_mix_t2i, second_mix_caption and second_mix_qa"):
        DALLEObjective(second_mix_at=5)
    with pytest.raises(ValueError, match="second_mix_at must be >= 0"):
        DALLEObjective(second_mix_at=-1)

    class Tok:
        vocab_size = 40

    model = DALLE(tiny_config("dalle", text_vocab_size=40, layouts=("t2i", "caption")))
    with pytest.raises(ValueError, match=r"objective.second_mix_qa > 0 but the model has no 'qa' layout"):
        DALLETask(model, DALLEObjective(mix_caption=1, second_mix_at=3, second_mix_qa=1), Tok(), [], [])
