"""Policy evaluation after feedback (dalle/feedback/policy_eval.py, tools/eval_feedback.py) and the one-command
loop (tools/feedback_loop.py), on the tiny models of conftest's tiny_parts."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.checkpoint import load_pretrained, save_pretrained
from dalle.feedback.losses import best_of_n_kl
from dalle.feedback.policy_eval import EvalSettings, diversity, draw, evaluate, held_out_prompts, markdown
from dalle.pipeline import load_pipeline
from dalle_tools import eval_feedback


@pytest.fixture(scope="module")
def reward_dir(tiny_parts):
    """A reward model on the tiny reranker's body, untrained (it ranks as the raw reranker does)."""
    from dalle.feedback.reward import RewardConfig, RewardModel

    reranker = load_pretrained(tiny_parts / "reranker", expect="reranker")
    model = RewardModel(RewardConfig(body="reranker", reranker=reranker.config))
    model.load_body(reranker)
    out = tiny_parts / "reward"
    if not out.exists():
        save_pretrained(model, out, extra=lambda d: (d / "tokenizer.json").write_bytes(
            (tiny_parts / "tokenizer.json").read_bytes()))
    return out


def low_codes(prompts, codes, images):
    """A reward whose favourite is known: the lower an image's mean code, the better."""
    return -codes.float().mean(-1)


def test_best_of_n_kl_matches_the_exact_kl_of_a_fine_distribution():
    # Best of n from M equally likely outcomes with distinct rewards: rank i is kept with probability
    # ((i+1)/M)^n - (i/M)^n; as M grows its KL from the uniform tends to log n - (n-1)/n.
    m = 200_000
    for n in (1, 4, 16, 64):
        edges = torch.arange(m + 1, dtype=torch.float64) / m
        p = edges[1:] ** n - edges[:-1] ** n
        exact = torch.special.xlogy(p, p * m).sum().item()  # 0 log 0 = 0 where p underflows
        assert best_of_n_kl(n) == pytest.approx(exact, abs=1e-3)
    assert best_of_n_kl(1) == 0 and best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_diversity_on_hand_made_samples():
    same = diversity(torch.zeros(2, 4, 16, dtype=torch.long), torch.full((2, 4, 3, 8, 8), 7, dtype=torch.uint8))
    assert same == {"distinct": 0.25, "pixel_distance": 0.0}  # nothing above 1/k, no distance
    codes = torch.tensor([[[1, 2], [1, 2], [3, 4]]])  # two of three equal
    images = torch.stack([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])[None]
    got = diversity(codes, images)
    assert got["distinct"] == pytest.approx(2 / 3)
    assert got["pixel_distance"] == pytest.approx(2 / 3)  # pairs: 0, 1, 1
    as_uint8 = diversity(codes, (images * 255).to(torch.uint8))
    assert as_uint8["pixel_distance"] == pytest.approx(2 / 3)


def _prompts(n=3):
    return {"train": held_out_prompts("train", n, image_size=32), "zeroshot": held_out_prompts("zeroshot", n,
                                                                                                 image_size=32)}


def test_the_supervised_model_against_itself_has_kl_zero(tiny_parts):
    sft = load_pipeline(tiny_parts / "model")
    settings = EvalSettings(best_of=(2,), diversity=3, batch_size=8)
    rows = evaluate(sft, [("same", load_pipeline(tiny_parts / "model"))], _prompts(), low_codes, settings)
    same = [r for r in rows if r["name"] == "same"]
    first = [r for r in rows if r["name"] == "sft"]
    assert len(same) == len(first) == 2
    for a, b in zip(same, first):
        assert a["kl"] == pytest.approx(0.0, abs=1e-4)
        assert a["accuracy"] == b["accuracy"] and a["reward"] == pytest.approx(b["reward"])  # same seeds, same images
        assert a["distinct"] == b["distinct"] and 1 / 3 <= a["distinct"] <= 1
    # A perturbed copy samples differently and moves off 0 (a Monte-Carlo KL is >= 0 only on average).
    moved = load_pipeline(tiny_parts / "model")
    with torch.no_grad():
        for p in moved.model.image_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    row = evaluate(sft, [("moved", moved)], {"train": _prompts()["train"]}, low_codes, settings)[-1]
    assert row["kl"] > 0.1


def test_best_of_n_keeps_what_the_reward_model_prefers(tiny_parts):
    sft = load_pipeline(tiny_parts / "model")
    prompts = {"train": held_out_prompts("train", 4, image_size=32)}
    settings = EvalSettings(best_of=(1, 4, 8), diversity=0, batch_size=16)
    rows = {r["name"]: r for r in evaluate(sft, [], prompts, low_codes, settings)}
    codes, _ = draw(sft, [p.caption for p in prompts["train"]], 8, 0, 16)
    means = codes.float().mean(-1)  # (P, 8)
    for n in (1, 4, 8):
        assert rows[f"sft best of {n}"]["reward"] == pytest.approx(-means[:, :n].min(1).values.mean().item())
        assert rows[f"sft best of {n}"]["kl"] == pytest.approx(best_of_n_kl(n))
    assert rows["sft best of 8"]["reward"] > rows["sft best of 1"]["reward"]
    assert rows["sft best of 1"]["reward"] == pytest.approx(rows["sft"]["reward"])
    table = markdown(list(rows.values()))
    assert f"| sft best of 8 | {best_of_n_kl(8):.3f} |" in table


def test_judged_draws_average_the_detector_over_each_rows_selection(tiny_parts, monkeypatch):
    """judged: 4 averages all-correct over samples 0-3 of each prompt for a first-sample row, and over the
    best of each disjoint pair for best of 2; an identical policy gets the supervised model's figures. The tiny
    model draws nothing the detector accepts, so a stand-in judge (an image is right when its pixel sum is
    even) makes the average depend on which images were picked."""
    from dalle.evaluation.detect import Verdict
    from dalle.feedback import policy_eval

    def judge(prompts, images):
        return [Verdict(attributes={}, count=int(np.asarray(im, dtype=np.int64).sum()) % 2 == 0, relation=None)
                for im in images]

    monkeypatch.setattr(policy_eval, "score_images", judge)
    sft = load_pipeline(tiny_parts / "model")
    prompts = _prompts(4)
    settings = EvalSettings(best_of=(2,), diversity=0, batch_size=8, judged=4)
    rows = evaluate(sft, [("same", load_pipeline(tiny_parts / "model"))], prompts, low_codes, settings)
    seen = set()
    for split, ps in prompts.items():
        mine = {r["name"]: r for r in rows if r["split"] == split}
        codes, images = draw(sft, [p.caption for p in ps], 4, 0, 8)

        def correct(picked, images=images):  # (P, j) sample indices -> the share judged right
            flat = [images[i, j] for i in range(len(picked)) for j in picked[i].tolist()]
            return sum(v.all_correct for v in judge(None, flat)) / len(flat)

        every = torch.arange(4).expand(len(ps), 4)
        assert mine["sft"]["mean"]["draws"] == 4
        assert mine["sft"]["mean"]["all_correct"] == pytest.approx(correct(every))
        best = (-codes.float().mean(-1)).view(len(ps), 2, 2).argmax(-1) + torch.tensor([0, 2])
        assert mine["sft best of 2"]["mean"]["draws"] == 2
        assert mine["sft best of 2"]["mean"]["all_correct"] == pytest.approx(correct(best))
        assert mine["same"]["mean"] == mine["sft"]["mean"]
        seen |= {mine["sft"]["mean"]["all_correct"], mine["sft best of 2"]["mean"]["all_correct"]}
    assert len(seen) > 1  # the judge told the selections apart somewhere, so the checks above can fail
    table = markdown(rows)
    assert "Mean over several draws" in table and "| same | 4 |" in table


def reading_sft(tiny_parts):
    """The tiny model with random weights large enough that its logits depend on the text: an untrained one's
    ignore it, which would leave guidance nothing to do."""
    sft = load_pipeline(tiny_parts / "model")
    torch.manual_seed(0)
    with torch.no_grad():
        for w in sft.model.parameters():
            w.normal_(0, 0.3)
    return sft


def test_guided_draws_are_judged_at_their_cond_scale(tiny_parts, monkeypatch):
    """guided: 3.0 judges each first-sample row's draws again, sampled with guidance: the column is the judge's
    share over exactly those images, which differ from the unguided ones."""
    from dalle.evaluation.detect import Verdict
    from dalle.feedback import policy_eval

    def judge(prompts, images):
        return [Verdict(attributes={}, count=int(np.asarray(im, dtype=np.int64).sum()) % 2 == 0, relation=None)
                for im in images]

    monkeypatch.setattr(policy_eval, "score_images", judge)
    sft = reading_sft(tiny_parts)
    prompts = _prompts(4)
    settings = EvalSettings(best_of=(), diversity=0, batch_size=8, judged=3, guided=3.0)
    counted: dict[str, list[int]] = {}

    def bar(desc, total):  # every bar ends full: the guided draws are counted too
        counted[desc] = [0, total]
        return lambda n: counted[desc].__setitem__(0, counted[desc][0] + n)

    rows = evaluate(sft, [("same", sft)], prompts, low_codes, settings, bar)
    assert counted and all(done == total == 2 * 4 for done, total in counted.values()), counted
    for split, ps in prompts.items():
        mine = {r["name"]: r for r in rows if r["split"] == split}
        _, guided = draw(sft, [p.caption for p in ps], 3, 0, 8, cond_scale=3.0)
        _, plain = draw(sft, [p.caption for p in ps], 3, 0, 8)
        assert not torch.equal(guided, plain)  # guidance changed the images, so the column is its own
        right = [v.all_correct for v in judge(None, list(guided.flatten(0, 1)))]
        assert mine["sft"]["guided"]["draws"] == 3 and mine["sft"]["guided"]["cond_scale"] == 3.0
        assert mine["sft"]["guided"]["all_correct"] == pytest.approx(sum(right) / len(right))
        assert mine["same"]["guided"] == mine["sft"]["guided"]
    table = markdown(rows)
    assert "The first sample at cond scale 3, averaged" in table and "| same | 3 |" in table
    with pytest.raises(ValueError, match="guided >= 0"):
        EvalSettings(guided=-1.0)


@pytest.mark.parametrize("kind", ["guided", "temperature"])
def test_sft_sampling_rows_are_that_sample_with_its_kl(tiny_parts, kind):
    """sft_guided: (2.0,) and sft_temperature: (0.5,) each add a row per split for the supervised model sampled
    that way (guided at cond scale 2, or at temperature 0.5): its images are those the sampler draws so, not the
    plain ones, its reward is of them, and its KL is the mean over them of the sum over tokens of log pi - log
    softmax(cond), pi = softmax(uncond + 2 (cond - uncond)) or softmax(cond / 0.5), computed here by hand from
    the model's two streams."""
    sft = reading_sft(tiny_parts)
    prompts = _prompts(3)
    guided = kind == "guided"
    name, how = ("sft cond scale 2", {"cond_scale": 2.0}) if guided else \
        ("sft at temperature 0.5", {"temperature": 0.5})
    settings = EvalSettings(best_of=(), diversity=2, batch_size=8,
                            **({"sft_guided": (2.0,)} if guided else {"sft_temperature": (0.5,)}))
    rows = evaluate(sft, [], prompts, low_codes, settings)
    cfg = sft.model.config
    for split, ps in prompts.items():
        mine = {r["name"]: r for r in rows if r["split"] == split}
        row = mine[name]
        captions = [p.caption for p in ps for _ in range(2)]
        codes, _ = draw(sft, [p.caption for p in ps], 2, 0, 8, **how)
        assert not torch.equal(codes, draw(sft, [p.caption for p in ps], 2, 0, 8)[0])
        codes = codes.flatten(0, 1)
        text = sft.tokenizer.encode_batch(captions, cfg.text_seq_len, truncate_warn=False)[0]
        empty = (cfg.text_vocab_size + torch.arange(cfg.text_seq_len)).expand(len(codes), -1)
        with torch.no_grad():
            cond = torch.log_softmax(sft.model(text, codes)[1], -1)
            uncond = torch.log_softmax(sft.model(empty, codes)[1], -1)
        pi = torch.log_softmax(uncond + 2.0 * (cond - uncond) if guided else cond / 0.5, -1)
        kl = (pi - cond).gather(-1, codes[..., None]).sum(dim=(-1, -2)).mean()
        assert kl > 0.01  # the sampling moved the distribution, so a row that ignored it would fail
        assert row["kl"] == pytest.approx(kl.item(), rel=1e-4)
        assert row["reward"] == pytest.approx(low_codes(None, codes.view(3, 2, -1)[:, 0], None).mean().item())
        assert row["selection"] == ("first sample at cond scale 2" if guided else "first sample at temperature 0.5")
        assert mine["sft"]["kl"] == 0.0
    assert f"| {name} |" in markdown(rows)
    with pytest.raises(ValueError, match="other than 1"):
        EvalSettings(**({"sft_guided": (1.0,)} if guided else {"sft_temperature": (1.0,)}))


def _cli(tiny_parts, reward_dir, out, *extra):
    return eval_feedback.main(["--sft", str(tiny_parts / "model"), "--reward", str(reward_dir), "--model",
                               f"copy={tiny_parts / 'model'}", "--n", "2", "--best-of", "2", "--diversity", "2",
                               "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out), *extra])


def test_eval_cli_writes_table_and_json_and_refuses_an_existing_out(tiny_parts, reward_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _cli(tiny_parts, reward_dir, out) == 0
    record = json.loads((out / "policy-eval.json").read_text())
    names = [e["name"] for e in record["summary"]]
    assert names == ["sft", "sft best of 2", "copy"]
    assert len(record["rows"]) == 6  # three rows, two splits
    assert record["summary"][2]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(isinstance(r["reward"], float) and math.isfinite(r["reward"]) for r in record["rows"])
    table = (out / "policy-eval.md").read_text()
    assert "| copy |" in table and "all correct: zeroshot" in table
    assert "| copy |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists and is not empty"):
        _cli(tiny_parts, reward_dir, out)
    assert _cli(tiny_parts, reward_dir, out, "--overwrite") == 0


def test_eval_cli_leaves_out_a_prompt_file(tiny_parts, reward_dir, tmp_path):
    seen = [p.caption for p in held_out_prompts("train", 2)]  # what a model was fine-tuned on (inputs.prompts)
    (tmp_path / "tuned-on.txt").write_text("\n".join(seen) + "\n")
    assert _cli(tiny_parts, reward_dir, tmp_path / "eval", "--exclude-prompts", str(tmp_path / "tuned-on.txt")) == 0
    record = json.loads((tmp_path / "eval" / "policy-eval.json").read_text())
    assert record["prompts"]["train"] == [p.caption for p in held_out_prompts("train", 2, seen)]
    assert not set(seen) & set(record["prompts"]["train"])
    assert record["prompts"]["zeroshot"] == [p.caption for p in held_out_prompts("zeroshot", 2)]
    with pytest.raises(SystemExit, match="cannot read --exclude-prompts .*absent.txt"):
        _cli(tiny_parts, reward_dir, tmp_path / "x", "--exclude-prompts", str(tmp_path / "absent.txt"))
    assert not (tmp_path / "x").exists()


def test_eval_cli_errors_are_one_line(tiny_parts, reward_dir, tmp_path, capsys):
    for bad in (["--model", "nodir"], ["--best-of", "0"], ["--n", "x"], ["--sft-temperature", "0"]):
        with pytest.raises(SystemExit) as e:
            _cli(tiny_parts, reward_dir, tmp_path / "x", *bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and "error: argument" in err.strip().splitlines()[-1]
    with pytest.raises(SystemExit, match="cannot load"):
        _cli(tiny_parts, reward_dir, tmp_path / "y", "--model", f"gone={tmp_path / 'missing'}")
    with pytest.raises(SystemExit, match="--sft-guided scales must be above 0 and other than 1"):
        _cli(tiny_parts, reward_dir, tmp_path / "w", "--sft-guided", "1")
    with pytest.raises(SystemExit, match="--sft-temperature values must be other than 1"):
        _cli(tiny_parts, reward_dir, tmp_path / "w", "--sft-temperature", "1")
    with pytest.raises(SystemExit, match="cannot evaluate"):
        eval_feedback.main(["--sft", str(tiny_parts / "model"), "--reward", str(tiny_parts / "model"),
                            "--out", str(tmp_path / "z")])


def _loop(tiny_parts, out, *extra):
    from dalle_tools import feedback_loop

    return feedback_loop.main(["--out", str(out), "--model", str(tiny_parts / "model"), "--reranker",
                               str(tiny_parts / "reranker"), "--prompts", "6", "--pairs-per-prompt", "2",
                               *[x for s in ("reward", "dpo", "grpo", "bon") for x in (f"--{s}-config",
                                                                               f"configs/feedback/{s}-tiny.yaml")],
                               "--set", "dpo.objective.val_fraction=0.3", "--eval-n", "2", "--best-of", "2",
                               "--diversity", "2", "--threads", "1", "--device", "cpu", "--no-progress", *extra])


def test_the_loop_runs_end_to_end_and_resumes(tiny_parts, tmp_path, capsys, monkeypatch):
    import numpy as np

    from dalle.feedback import raters

    # The untrained tiny model draws noise in which the detector finds nothing (every pair a tie): the rater
    # prefers brighter images instead, so DPO has decided pairs to learn from.
    monkeypatch.setattr(raters, "correctness", lambda prompt, image: (0, 0, float(np.asarray(image).mean())))
    start = time.monotonic()
    assert _loop(tiny_parts, tmp_path / "run") == 0
    assert time.monotonic() - start < 60
    record = json.loads((tmp_path / "run" / "eval" / "policy-eval.json").read_text())
    assert [e["name"] for e in record["summary"]] == ["sft", "sft best of 2", "dpo", "grpo"]
    with Image.open(tmp_path / "run" / "eval" / "accuracy-kl.png") as im:  # the curve beside the table
        assert im.format == "PNG"
    from dalle.feedback.store import Store

    store = Store(tmp_path / "run" / "fb.db")
    assert store.counts()["pairs"] == 12 and {j.rater for j in store.judgements()} == {"sim"}
    stored = {r[0] for r in store.db.execute("SELECT text FROM prompts")}
    assert not stored & {p.caption for p in held_out_prompts("train", 2, stored)}  # evaluated on held-out prompts
    assert record["settings"]["exclude_store"] == str(tmp_path / "run" / "fb.db")
    for stage in ("dpo", "grpo"):
        assert load_pretrained(tmp_path / "run" / stage, expect="dalle") is not None
    capsys.readouterr()
    assert _loop(tiny_parts, tmp_path / "run") == 0  # everything complete: every stage skipped
    said = capsys.readouterr().out
    assert said.count("done before, skipped") == 6, said
    with pytest.raises(SystemExit, match="started with other noise"):
        _loop(tiny_parts, tmp_path / "run", "--noise", "0.1")
    # A finished training stage asked for with other settings is refused, not skipped as if it had them.
    with pytest.raises(SystemExit, match="stage grpo finished with another config or --set"):
        _loop(tiny_parts, tmp_path / "run", "--set", "grpo.train.lr=1e-3")
    # A training stage that finished without its marker (killed just after) runs again from its last checkpoint.
    (tmp_path / "run" / "done" / "grpo").unlink()
    capsys.readouterr()
    assert _loop(tiny_parts, tmp_path / "run", "--best-of", "3") == 0
    said = capsys.readouterr().out
    assert "[grpo]" in said and "[evaluate]" in said and said.count("done before, skipped") == 4, said
    assert [e["name"] for e in json.loads((tmp_path / "run" / "eval" / "policy-eval.json").read_text())["summary"]] \
        == ["sft", "sft best of 3", "dpo", "grpo"]  # the evaluation's flags changed: it ran again
    # A second DPO round: pairs of the same prompts sampled from the first round's model, DPO from it.
    capsys.readouterr()
    assert _loop(tiny_parts, tmp_path / "run", "--best-of", "3", "--rounds", "2") == 0
    said = capsys.readouterr().out
    assert all(f"[{s}]" in said for s in ("sample-r2", "simulate-r2", "dpo-r2", "evaluate")), said
    assert [e["name"] for e in json.loads((tmp_path / "run" / "eval" / "policy-eval.json").read_text())["summary"]] \
        == ["sft", "sft best of 3", "dpo", "dpo-r2", "grpo"]
    second = Store(tmp_path / "run" / "fb-r2.db")
    assert {r[0] for r in second.db.execute("SELECT text FROM prompts")} == stored
    made_by = {r[0] for r in second.db.execute("SELECT DISTINCT model_id FROM samples")}
    first_round = load_pretrained(tmp_path / "run" / "dpo", expect="dalle")
    assert len(made_by) == 1 and made_by != {r[0] for r in store.db.execute("SELECT DISTINCT model_id FROM samples")}
    run2 = json.loads((tmp_path / "run" / "dpo-r2" / "run.json").read_text())
    assert Path(run2["inputs"]["init"]) == tmp_path / "run" / "dpo"
    assert load_pretrained(tmp_path / "run" / "dpo-r2", expect="dalle").config == first_round.config
    # Best-of-N distillation is asked for by name; it learns from the loop's reward model.
    capsys.readouterr()
    assert _loop(tiny_parts, tmp_path / "run", "--best-of", "3", "--rounds", "2", "--methods", "dpo", "grpo",
                 "bon") == 0
    said = capsys.readouterr().out
    assert "[bon]\n" in said and "[evaluate]\n" in said and "[grpo] done before, skipped" in said, said
    assert [e["name"] for e in json.loads((tmp_path / "run" / "eval" / "policy-eval.json").read_text())["summary"]] \
        == ["sft", "sft best of 3", "dpo", "dpo-r2", "grpo", "bon"]
    bon = json.loads((tmp_path / "run" / "bon" / "run.json").read_text())
    assert Path(bon["inputs"]["reward"]) == tmp_path / "run" / "reward"
    # --judged reaches the evaluation, which runs again; training stages are untouched.
    capsys.readouterr()
    assert _loop(tiny_parts, tmp_path / "run", "--best-of", "3", "--rounds", "2", "--methods", "dpo", "grpo",
                 "bon", "--judged", "2") == 0
    said = capsys.readouterr().out
    assert "[evaluate]\n" in said and "[bon] done before, skipped" in said, said
    summary = json.loads((tmp_path / "run" / "eval" / "policy-eval.json").read_text())["summary"]
    assert summary[0]["splits"]["train"]["mean"]["draws"] == 2
    with pytest.raises(SystemExit, match="--rounds 2 repeats DPO"):
        _loop(tiny_parts, tmp_path / "run", "--rounds", "2", "--methods", "grpo")
    with pytest.raises(SystemExit) as e:
        _loop(tiny_parts, tmp_path / "other", "--set", "nope.train.steps=1")
    assert e.value.code == 2


def test_the_loop_starts_a_transformer_bodied_reward_model_from_the_transformer(tiny_parts, tmp_path):
    assert _loop(tiny_parts, tmp_path / "run", "--methods", "--set", "reward.model.body=transformer") == 0
    run = json.loads((tmp_path / "run" / "reward" / "run.json").read_text())
    assert Path(run["inputs"]["init"]) == tiny_parts / "model"
    assert load_pretrained(tmp_path / "run" / "reward", expect="reward").config.body == "transformer"


def test_held_out_prompts_leave_out_every_excluded_caption():
    seen = {p.caption for p in held_out_prompts("train", 100)}
    assert len(seen) < 100  # captions repeat within a split: excluded ones come back later in it
    held = held_out_prompts("train", 50, seen)
    assert len(held) == 50 and not seen & {p.caption for p in held}
    assert [p.caption for p in held] == [p.caption for p in held_out_prompts("train", 50, seen)]  # fixed
