"""caption.py and generate.py --rerank self on tiny checkpoints: the one-line refusal of a text-to-image-only
model, captions and answers with log-probabilities, sidecars that never replace a file unasked, and
self-reranking that keeps the candidates the model's own log p(prompt | image) ranks highest."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import save_joint_model

import caption
import generate
from dalle.captioning import prompt_logprob
from dalle.data.shapes import CONVERSE, make_sample
from dalle.evaluation.captions import parse_caption
from dalle.generation import sample_codes
from dalle.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def joint(tiny_parts, tmp_path_factory):
    """An untrained transformer with every layout, beside tiny_parts' text-to-image one, and two images."""
    root = tmp_path_factory.mktemp("joint")
    save_joint_model(tiny_parts / "model", root / "model")
    for i in range(2):
        make_sample(i, image_size=32).image.save(root / f"scene{i}.png")
    return root


def test_a_text_to_image_model_refuses_in_one_line(tiny_parts, joint):
    for extra in ([], ["--question", "how many objects?"]):
        with pytest.raises(SystemExit, match="trained text-to-image only.*shapes.yaml") as e:
            caption.main([str(joint / "scene0.png"), "--model", str(tiny_parts / "model"), *extra])
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--rerank self: .*text-to-image only"):
        generate.main(["a red circle", "--model", str(tiny_parts / "model"), "--rerank", "self", "--out",
                       str(joint / "never")])


def test_captions_and_answers_print_with_log_probabilities(joint, capsys):
    images = [str(joint / "scene0.png"), str(joint / "scene1.png")]
    assert caption.main([*images, "--model", str(joint / "model"), "--beam", "3", "--num", "2", "--candidates",
                         "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and lines[3] == images[1] and len(lines) == 6
    scores = [float(line.rsplit("log p ", 1)[1].rstrip(")")) for line in lines[1:3]]
    assert scores[0] >= scores[1] and all(s < 0 for s in scores)  # best first
    assert caption.main([images[0], "--model", str(joint / "model"), "--question", "how many objects?",
                         "--sample", "--seed", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("  how many objects? -> ")


def test_sampled_texts_do_not_depend_on_the_batch_size(joint, capsys):
    images = [str(joint / "scene0.png"), str(joint / "scene1.png")]
    outs = []
    for size in ("2", "1"):
        assert caption.main([*images, "--model", str(joint / "model"), "--sample", "--num", "2", "--seed", "7",
                             "--top-k", "20", "--batch-size", size, "--no-progress"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 6


def test_prior_guided_captions_are_written_and_recorded(joint, tmp_path, capsys):
    image = tmp_path / "scene.png"
    shutil.copy(joint / "scene0.png", image)
    assert caption.main([str(image), "--model", str(joint / "model"), "--prior-scale", "2", "--candidates", "1",
                         "--json"]) == 0
    record = json.loads((tmp_path / "scene.caption.json").read_text())
    assert record["settings"]["prior_scale"] == 2.0
    pipe = load_pipeline(joint / "model")
    from PIL import Image

    from dalle.captioning import caption as write_caption
    from dalle.data.transforms import EvalTransform, to_rgb

    with Image.open(image) as im:
        pixels = EvalTransform(pipe.dvae.config.image_size)(to_rgb(im), None)[None]
    want = write_caption(pipe, pixels, prior_scale=2.0)[0][0]
    assert record["texts"][0] == {"caption": want.text, "logprob": round(want.logprob, 4)}
    # a model that also draws is guided by default; answers never are
    for extra, scale in (([], caption.PRIOR_SCALE), (["--question", "how many objects?"], 0.0)):
        assert caption.main([str(image), "--model", str(joint / "model"), "--json", "--overwrite", *extra]) == 0
        assert json.loads((tmp_path / "scene.caption.json").read_text())["settings"]["prior_scale"] == scale


def test_json_sidecars_never_replace_a_file_unasked(joint, tmp_path):
    image = tmp_path / "scene.png"
    shutil.copy(joint / "scene0.png", image)
    args = [str(image), "--model", str(joint / "model"), "--json"]
    assert caption.main(args) == 0
    record = json.loads((tmp_path / "scene.caption.json").read_text())
    assert record["image"] == str(image) and record["model"].startswith("model@")
    assert set(record["texts"][0]) == {"caption", "logprob", "image_logprob"}  # a model that draws reranks
    with pytest.raises(SystemExit, match="already exists.*--overwrite"):
        caption.main(args)
    assert caption.main([*args, "--overwrite"]) == 0


def test_bad_flags_are_parser_errors(joint, capsys):
    for extra, message in ((["--beam", "2", "--sample"], "exclude each other"), (["--top-k", "3"], "add --sample"),
                           (["--prior-scale", "1", "--question", "how many?"], "answers have no caption prior"),
                           (["--prior-scale", "-1"], "expected a finite number >= 0"),
                           (["--candidates", "2", "--question", "how many?"], "answers have no such score"),
                           (["--candidates", "0"], "expected an integer >= 1"),
                           (["--question", " "], "--question is empty")):
        with pytest.raises(SystemExit):
            caption.main([str(joint / "scene0.png"), "--model", str(joint / "model"), *extra])
        assert message in capsys.readouterr().err
    from dalle.captioning import answer

    with pytest.raises(ValueError, match="question 1 is empty"):  # the library refuses it too
        answer(load_pipeline(joint / "model"), torch.zeros(2, 3, 64, 64), ["how many objects?", " "])


def test_self_reranking_keeps_the_best_by_the_models_own_score(joint, tmp_path):
    out = tmp_path / "out"
    assert generate.main(["a red circle", "--model", str(joint / "model"), "--rerank", "self", "--num-images", "2",
                          "--candidates", "4", "--seed", "5", "--out", str(out), "--no-progress"]) == 0
    metas = [json.loads((out / f"a-red-circle-{r}.json").read_text()) for r in range(2)]
    pipe = load_pipeline(joint / "model")
    codes, _ = sample_codes(pipe, ["a red circle"] * 4, list(range(5, 9)))
    scores = prompt_logprob(pipe, codes, ["a red circle"] * 4)
    assert [m["candidate"] for m in metas] == torch.argsort(scores, descending=True)[:2].tolist()
    assert metas[0]["reranker"] == "self" and metas[0]["score"] == pytest.approx(scores.max().item(), abs=1e-4)


def _pixels(pipe, *paths):
    from PIL import Image

    from dalle.data.transforms import EvalTransform, to_rgb

    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(EvalTransform(pipe.dvae.config.image_size)(to_rgb(im), None))
    return torch.stack(out)


def test_candidates_are_reranked_by_both_directions(joint, tmp_path, capsys):
    from dalle.captioning import caption as write_caption
    from dalle.captioning import encode_images
    from dalle.transformer.reading import image_logprob, write

    pipe = load_pipeline(joint / "model")
    pixels = _pixels(pipe, joint / "scene0.png", joint / "scene1.png")
    codes = encode_images(pipe, pixels)
    beams = write_caption(pipe, pixels, num=4, beam=4)
    reranked = write_caption(pipe, pixels, num=4, candidates=4)
    # the same four texts written, each with the text-to-image stream's log p(image | its ids)
    cfg = pipe.model.config
    empty = cfg.text_vocab_size + torch.arange(cfg.text_seq_len).expand(2, -1)
    written = write(pipe.model, codes, empty, "caption", 0, beam=4, num=4)
    for i, (b, r, w) in enumerate(zip(beams, reranked, written)):
        assert sorted(t.text for t in b) == sorted(t.text for t in r) and len(r) == 4
        assert all(t.image_logprob is None for t in b)
        direct = image_logprob(pipe.model, codes[i].expand(4, -1), torch.stack([ids for ids, _ in w]))
        by_text = {pipe.tokenizer.decode(ids).strip(): lp.item() for (ids, _), lp in zip(w, direct)}
        assert [t.image_logprob for t in r] == pytest.approx([by_text[t.text] for t in r], abs=1e-3)
        both = [t.logprob + t.image_logprob for t in r]
        assert both == sorted(both, reverse=True)
    assert [t[0] for t in write_caption(pipe, pixels, candidates=4)] == [r[0] for r in reranked]
    # caption.py reranks 2 by default for a model that draws, and records both scores
    image = tmp_path / "scene.png"
    shutil.copy(joint / "scene0.png", image)
    assert caption.main([str(image), "--model", str(joint / "model"), "--json", "--prior-scale", "0"]) == 0
    record = json.loads((tmp_path / "scene.caption.json").read_text())
    best = write_caption(pipe, pixels, candidates=2)[0][0]
    assert record["settings"]["candidates"] == caption.CANDIDATES == 2
    assert record["texts"] == [{"caption": best.text, "logprob": round(best.logprob, 4),
                                "image_logprob": round(best.image_logprob, 2)}]
    assert "log p(image | caption)" in capsys.readouterr().out


def _same_picture(caption_text: str, prompt: str) -> bool:
    """The caption names the prompt's objects (colour and shape) and the same relation, in either order."""
    got, want = parse_caption(caption_text), parse_caption(prompt)
    if got is None:
        return False
    names = [(o.colour, o.shape) for o in got.objects]
    wanted = [(o.colour, o.shape) for o in want.objects]
    if names == wanted:
        return got.relation == want.relation
    return names == wanted[::-1] and got.relation == CONVERSE[want.relation]


def test_the_shipped_model_captions_its_own_samples_answers_and_self_reranks(tmp_path, capsys):
    """What a fresh install shows: caption.py with no flags on two of docs/samples' images of a two-object
    prompt prints a caption of the same picture, a count question is answered, generate.py --rerank self runs."""
    prompt = "a green star to the right of a purple cross"
    for i in (0, 2):  # docs/default-model.md: two of the eight (1 and 4) are misread
        path = ROOT / "docs" / "samples" / f"a-green-star-to-the-right-of-a-purple-cross-{i}.png"
        assert json.loads(path.with_suffix(".json").read_text())["prompt"] == prompt
        assert caption.main([str(path)]) == 0
        line = capsys.readouterr().out.splitlines()[1].strip()
        assert _same_picture(line.split("  (log p")[0], prompt), line
    assert caption.main([str(path), "--question", "how many objects?"]) == 0
    assert capsys.readouterr().out.splitlines()[1].strip().startswith("how many objects? -> two  (log p")
    assert generate.main(["a red circle", "--rerank", "self", "--num-images", "1", "--candidates", "4",
                          "--out", str(tmp_path), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "a-red-circle-0.json").read_text())
    assert meta["candidates"] == 4 and meta["model"].startswith("default_model@")
