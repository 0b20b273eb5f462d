"""tools/bench.py: the figures it derives and the verdicts it prints (timings themselves are not tested)."""

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


def test_peer_cases_run_next_to_the_cases_they_are_compared_with():
    order = bench.run_order(["train:full:fp32", "gen:uncached", "gen:cached"],
                            ["train:full", "gen:full:nocache", "gen:full:manual_cache", "train:axial"])
    assert order == [("peer", "train:full"), ("ours", "train:full:fp32"), ("ours", "gen:uncached"),
                     ("peer", "gen:full:nocache"), ("peer", "gen:full:manual_cache"), ("ours", "gen:cached"),
                     ("peer", "train:axial")]
