"""tools/probe_value_head.py: its figures mean something only while the tilt reaches every path that draws or
scores images, and its fit is the least squares it claims."""

import pytest
import torch

from dalle.transformer import decoding
from dalle.transformer.model import DALLE, DALLEConfig
from tools import probe_value_head as probe


def _model() -> DALLE:
    torch.manual_seed(0)
    cfg = DALLEConfig(text_vocab_size=40, text_seq_len=5, image_vocab_size=24, image_grid_size=4, n_embd=32,
                      n_layer=2, n_head=4, attn_schedule="full")
    return DALLE(cfg).eval()


def test_the_tilt_reaches_the_cached_sampler_and_the_teacher_forced_pass():
    model = _model()
    q = torch.nn.Linear(32, 24)
    original = decoding.row_linear
    text, image = torch.randint(40, (2, 5)), torch.randint(24, (2, 16))
    with torch.no_grad():
        plain = model(text, image)[1]
        h, _ = probe.hidden_states(model, text, image)
        tilt = probe.Tilt(model, q)
        try:
            tilt.lam = 2.0
            forced = model(text, image)[1]
            cache = decoding.KVCache(model.config, 2, "cpu", torch.float32)
            steps = [decoding.prefill(model, text, image[:, :0], cache)]
            steps += [decoding.decode_step(model, image[:, k], cache) for k in range(15)]
        finally:
            tilt.remove()
        after = model(text, image)[1]
    torch.testing.assert_close(forced, plain + 2.0 * q(h))
    torch.testing.assert_close(torch.stack(steps, dim=1), forced, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, plain)  # removed: the model is as it was
    assert decoding.row_linear is original


def test_fit_q_is_least_squares_per_next_token():
    torch.manual_seed(1)
    true = torch.nn.Linear(6, 3)
    h, codes = torch.randn(200, 8, 6), torch.randint(3, (200, 8))
    with torch.no_grad():
        per_position = (h * true.weight[codes]).sum(-1) + true.bias[codes]  # (S, N)
    # one advantage per sample: the fit sees the mean over positions, so build samples whose value is constant
    adv = per_position[:, 0]
    codes = codes[:, :1].expand(-1, 8).contiguous()
    h = h[:, :1].expand(-1, 8, -1).contiguous()
    q = probe.fit_q(h, codes, adv, vocab=3, alpha=1e-9)
    torch.testing.assert_close(q.weight, true.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.bias, true.bias, atol=1e-4, rtol=1e-4)
    assert probe.explained(q, h, codes, adv) > 0.999
    shrunk = probe.fit_q(h, codes, adv, vocab=3, alpha=1e6)
    assert shrunk.weight.abs().max() < 1e-2  # a large penalty pulls every row to 0, the bias aside


def test_the_value_transformer_steps_with_the_sampler():
    # the value model runs beside the sampled one through its own cache: each step's logits must be the
    # teacher-forced ref + lam * the value model's image logits, and removing the tilt restores the sampler
    from dalle.transformer import sampling

    model, value = _model(), _model()
    torch.nn.init.normal_(value.image_head.weight, std=0.5)
    text, image = torch.randint(40, (2, 5)), torch.randint(24, (2, 16))
    original = (sampling.prefill, sampling.decode_step)
    tilt = probe.ValueTilt(model, value)
    try:
        tilt.lam = 1.5
        cache = decoding.KVCache(model.config, 2, "cpu", torch.float32)
        steps = [sampling.prefill(model, text, image[:, :0], cache)]
        steps += [sampling.decode_step(model, image[:, k], cache) for k in range(15)]
        with torch.no_grad():
            expected = model(text, image)[1] + 1.5 * tilt.q_logits(model, text, image)
    finally:
        tilt.remove()
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert (sampling.prefill, sampling.decode_step) == original


@pytest.mark.parametrize("q", ["linear", "transformer"])
def test_the_probe_runs_end_to_end_on_a_reward_model(q, tiny_parts, tmp_path):
    import json

    from dalle.checkpoint import load_pretrained, save_pretrained
    from dalle.feedback.losses import best_of_n_kl
    from dalle.feedback.reward import RewardConfig, RewardModel

    reranker = load_pretrained(tiny_parts / "reranker", expect="reranker")
    reward = RewardModel(RewardConfig(body="reranker", reranker=reranker.config))
    reward.load_body(reranker)
    save_pretrained(reward, tmp_path / "reward",
                    extra=lambda d: (d / "tokenizer.json").write_bytes((tiny_parts / "tokenizer.json").read_bytes()))
    out = tmp_path / "probe.json"
    args = ["--model", str(tiny_parts / "model"), "--reward", str(tmp_path / "reward"), "--prompts", "10",
            "--samples", "2", "--eval-n", "4", "--draws", "2", "--kl-targets", "0.5", "--q", q, "--value-steps",
            "2", "--batch-size", "8", "--threads", "1", "--out", str(out)]
    assert probe.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    for split in ("train", "zeroshot"):
        mine = [r for r in rows if r["split"] == split]
        assert [r.get("best_of") for r in mine if "best_of" in r] == [4, 16]
        assert all(r["kl"] == pytest.approx(best_of_n_kl(r["best_of"])) for r in mine if "best_of" in r)
        plain, tilted = [r for r in mine if r.get("lam") == 0], [r for r in mine if r.get("lam", 0) > 0]
        assert len(plain) == 1 and plain[0]["kl"] == 0 and len(tilted) == 1
        assert tilted[0]["kl_exact"] >= 0 and 0 <= tilted[0]["all_correct"] <= 1
    assert len(json.loads(out.read_text())["fit"]["explained_by_quarter"]) == 4
    with pytest.raises(SystemExit):  # an existing output is never replaced
        probe.main(args)
    # a store's prompts are neither judged nor fitted on
    from dalle.feedback.policy_eval import held_out_prompts
    from dalle.feedback.store import Store

    first = held_out_prompts("zeroshot", 1, image_size=32)[0].caption
    store = Store(tmp_path / "fb.db")
    store.prompt(first, "zeroshot")
    store.close()
    excluded = tmp_path / "excluded.json"
    assert probe.main([*args[:-1], str(excluded), "--exclude-store", str(tmp_path / "fb.db"), "--fit-only"]) == 0
    assert json.loads(out.read_text())["held_out"]["zeroshot"][0] == first
    assert first not in json.loads(excluded.read_text())["held_out"]["zeroshot"]
    with pytest.raises(SystemExit):
        probe.main([*args[:-1], str(tmp_path / "other.json"), "--exclude-store", str(tmp_path / "missing.db")])
    fit_only = tmp_path / "fit.json"
    assert probe.main([*args[:-1], str(fit_only), "--fit-only"]) == 0
    written = json.loads(fit_only.read_text())
    assert "rows" not in written and len(written["fit"]["explained_by_quarter"]) == 4
