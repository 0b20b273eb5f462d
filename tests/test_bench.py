"""tools/bench.py: the figures it derives and the verdicts it prints (timings themselves are not tested)."""

import pytest

from tools import bench


def _timing(seconds, rss=500.0, **extra):
    return {"median_s": seconds, "min_s": seconds, "clean": True, "runs_s": [seconds], "foreign_cores": [0.0],
            "peak_rss_mib": rss, **extra}


def test_markdown_ratios_and_verdicts():
    results = {"ours": {"peak:fp32": {"gflops": 100.0, "peak_rss_mib": 1.0},
                        "train:full:fp32": _timing(0.5, model_gflops=50.0, tokens_per_s=4608.0),
                        "gen:cached": _timing(1.0, image_tokens_per_s=1024.0)},
               "peer": {"train:full": _timing(1.0, rss=900.0), "gen:full:manual_cache": _timing(2.5),
                        "gen:full:nocache": _timing(30.0)}}
    table = bench.markdown(results)
    assert "(50% of the fp32 peak)" in table
    assert "| training step, fp32 | 0.500 | 1.000 | 2.0x | >= 1.1x met | 500 / 900 |" in table
    assert "| 2.5x | >= 3x NOT met |" in table  # 2.5 s / 1.0 s against a 3x target
    assert "| 30.0x | >= 25x met |" in table
    assert "guided" not in table  # a comparison with a side missing is left out, not guessed


def test_peak_is_the_best_library():
    r = bench.case_peak("fp32", 0, 1)
    libraries = {k: v for k, v in r.items() if k.endswith("_gflops")}
    assert "torch.mm_gflops" in libraries and r["gflops"] == max(libraries.values())
    assert r["library"] + "_gflops" in libraries and "GFLOP/s" in bench._figure(r)


def test_peer_cases_run_next_to_the_cases_they_are_compared_with():
    order = bench.run_order(["train:full:fp32", "gen:uncached", "gen:cached"],
                            ["train:full", "gen:full:nocache", "gen:full:manual_cache", "train:axial"])
    assert order == [("peer", "train:full"), ("ours", "train:full:fp32"), ("ours", "gen:uncached"),
                     ("peer", "gen:full:nocache"), ("peer", "gen:full:manual_cache"), ("ours", "gen:cached"),
                     ("peer", "train:axial")]


TINY = dict(text_seq_len=8, image_grid_size=4, n_embd=32, n_layer=4, n_head=2)


def test_the_user_cases_run_at_tiny_sizes(monkeypatch):
    from tools import bench_cases

    monkeypatch.setenv("BENCH_MAX_WAIT", "0")
    monkeypatch.setattr(bench, "CLEAN_CORES", float("inf"))  # the first timed run counts, however busy the machine
    monkeypatch.setattr(bench_cases, "fp32_peak", lambda: 100.0)
    for name in ("gen:candidates", "paper:decode", "paper:train", "caption:64"):
        assert name in bench.CPU_CASES

    r = bench_cases.case_candidates(0, 1, candidates=4, batch_size=2, model=dict(n_embd=32, n_layer=1, n_head=2))
    assert r["candidates_per_s"] == 4 / r["median_s"] and 0 < r["sampling_share"] <= 1
    assert r["sampling_peak_share"] == r["sampling_gflops"] / 100.0 and len(r["runs_s"]) == 1
    assert "candidates/s" in bench._figure(r) and "of the 100 GFLOP/s fp32 peak" in bench._figure(r)

    r = bench_cases.case_paper_decode(0, 2, model=TINY, images=2)
    assert set(r["runs_s"]) == {"paper", "paper_bias", "full"} and all(len(v) == 2 for v in r["runs_s"].values())
    assert r["full_over_paper"] == r["full_s"] / r["paper_s"]
    assert r["full_gflops"] * r["full_s"] > r["paper_gflops"] * r["paper_s"]  # the masks read fewer keys

    r = bench_cases.case_paper_train(0, 1, model=TINY, batch_size=2)
    assert set(r["runs_s"]) == {"paper", "paper_dense", "full"} and r["paper_over_full"] == r["paper_s"] / r["full_s"]
    assert r["dense_over_full"] == r["paper_dense_s"] / r["full_s"]
    assert all(r[f"{name}_cpu_s"] > 0 for name in r["runs_s"])

    r = bench_cases.case_caption(0, 1, images=3)
    assert r["images"] == 3 and r["captions_per_s"] == 3 / r["median_s"] and r["mean_text_tokens"] > 0
    assert r["guided_s"] > 0 and "guided by the caption prior" in bench_cases.figure(r)
    assert r["reranked_s"] > 0 and "candidates reranked" in bench_cases.figure(r)
    assert "s for 3 images" in bench._figure(r)
    assert "images/s" in bench._figure({"median_s": 0.5, "runs_s": [0.5], "images_per_s": 128.0})  # dvae cases


def test_the_user_cases_verdicts():
    decode = {"paper_s": 2.0, "paper_bias_s": 3.5, "full_s": 3.2, "full_over_paper": 1.6, "clean": True}
    assert "1.60x (>= 1.5x met); masks as a bias 3.50 s" in bench._figure(decode)
    assert "NOT met" in bench._figure({**decode, "full_over_paper": 1.2})
    train = {"paper_s": 1.1, "paper_dense_s": 1.3, "full_s": 1.0, "paper_over_full": 1.1, "dense_over_full": 1.3,
             "batch_size": 4, "clean": False}
    assert bench._figure(train) == ("paper 1.100 s vs full 1.000 s: +10.0% (slower: NOT met); dense masks 1.300 s "
                                    "(+30.0%) (contended)")
    assert "no slower: met" in bench._figure({**train, "paper_over_full": 0.95})


def test_an_earlier_runs_figures_are_not_replaced_unasked(tmp_path):
    earlier = tmp_path / "run.json"
    earlier.write_text('{"ours": {}}\n')
    with pytest.raises(SystemExit, match="run.json already exists: choose another --json, or pass --overwrite"):
        bench.main(["--cases", "gen:cached", "--json", str(earlier)])  # refused before any case runs
    assert earlier.read_text() == '{"ours": {}}\n'


@pytest.mark.parametrize("schedule", ["row,column,conv,full", "paper"])
def test_shared_prefix_probe_gives_the_library_steps_logits(schedule, monkeypatch):
    # benchmarks/shared_prefix_probe.py times a step that reads the prompt's text keys once for all candidates;
    # its figures mean something only while that step computes what the library's does, on every layer kind
    import importlib.util

    import torch

    from dalle.transformer import decoding
    from dalle.transformer.model import DALLE, DALLEConfig

    path = bench.ROOT / "benchmarks" / "shared_prefix_probe.py"
    spec = importlib.util.spec_from_file_location("shared_prefix_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    cfg = DALLEConfig(text_vocab_size=40, text_seq_len=5, image_vocab_size=24, image_grid_size=5, n_embd=32,
                      n_layer=4, n_head=4, conv_kernel=5, attn_schedule=schedule)
    model = DALLE(cfg).eval()
    text = torch.randint(40, (1, 5)).expand(3, -1).clone()
    image = torch.randint(24, (3, 25))
    logits = {}
    for name, attend in (("library", decoding.KVCache.attend), ("probe", probe.shared_attend)):
        monkeypatch.setattr(decoding.KVCache, "attend", attend)
        cache = decoding.KVCache(cfg, 3, "cpu", torch.float32)
        steps = [decoding.prefill(model, text, image[:, :0], cache)]
        steps += [decoding.decode_step(model, image[:, k], cache) for k in range(24)]
        logits[name] = torch.stack(steps)
    torch.testing.assert_close(logits["probe"], logits["library"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["full", "row,column,conv,full", "paper"])
def test_candidates_floor_counts_the_keys_the_steps_read(schedule, monkeypatch):
    # benchmarks/candidates_floor.py's floor rests on the bytes of cache the decoding steps read: its count
    # must be the keys KVCache.attend hands to attention, summed over the steps of one image
    import importlib.util

    import torch

    from dalle.transformer import decoding
    from dalle.transformer.model import DALLE, DALLEConfig
    from dalle.transformer.sampling import sample

    path = bench.ROOT / "benchmarks" / "candidates_floor.py"
    spec = importlib.util.spec_from_file_location("candidates_floor", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cfg = DALLEConfig(text_vocab_size=40, text_seq_len=5, image_vocab_size=24, image_grid_size=5, n_embd=32,
                      n_layer=4, n_head=4, conv_kernel=5, attn_schedule=schedule)
    read = {"keys": 0}
    attend_newest = decoding.attend_newest

    def counting(q, k, v, bias):
        assert k.shape[0] == 1 and k.shape == v.shape
        read["keys"] += k.shape[2] if bias is None else int((bias == 0).sum())
        return attend_newest(q, k, v, bias)

    monkeypatch.setattr(decoding, "attend_newest", counting)
    sample(DALLE(cfg).eval(), torch.randint(40, (1, 5)), generator=torch.Generator().manual_seed(0))
    keys, text = probe.step_keys(cfg)
    assert read["keys"] == keys and text == 4 * 5 * 24
    assert probe.cache_bytes(cfg, 3) == 3 * keys * 2 * 32 * 4
    assert probe.cache_bytes(cfg, 3, text_once=True) == (3 * (keys - text) + text) * 2 * 32 * 4
