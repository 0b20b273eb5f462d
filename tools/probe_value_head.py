"""Does a token-level tilt buy the detector's accuracy for less KL than fine-tuning? A probe for the feedback
issue, not a training method the project ships.

Best of N reaches an accuracy that no fine-tuned run here reaches at its KL (docs/feedback.md): the fine-tuned
runs spend their KL over all 64 image tokens. Controlled decoding (Mudgal et al. 2023, "CD-FUDGE") tilts the
supervised model's next-token distribution by a learned value of each next token instead:

    pi(a | x_<t) ∝ pi_SFT(a | x_<t) · exp(lambda · Q(x_<t)[a])

with Q fitted by least squares to the reward of whole samples of the supervised model, centred per prompt:
Q(x_<t)[x_t] ≈ r(x) - mean r of the prompt's samples. `--q linear`: one linear layer on the supervised model's
last hidden state h_t (what its image head reads), ridge in closed form. `--q transformer`: a copy of the whole
model trained as a value model, run beside it through its own cache. The supervised model stays frozen; the tilt
wraps its image head or the library sampler's steps, so the library's own sampler draws from pi.

The probe draws `--samples` images for each of `--prompts` shapes `train` prompts, scores them (the detector's
gold reward, `gold`, or a reward model directory), fits Q, and then, on held-out `train` and `zeroshot` prompts,
judges by the shapes detector `--draws` samples a prompt for each lambda, with KL(pi || pi_SFT) by Monte Carlo
(the sum over image tokens of log pi - log pi_SFT on pi's samples, as tools/eval_feedback.py counts a fine-tuned
model's). Best of 4 and 16 by the same reward, on the supervised model's draws, stand beside it.

    python tools/probe_value_head.py --reward gold --out runs/probe-gold.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402


def hidden_states(model: nn.Module, text: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """The image head's input (B, N, d) and its logits (B, N, V) for codes (B, N), teacher-forced."""
    seen: dict[str, Tensor] = {}
    handle = model.image_head.register_forward_hook(lambda m, i, o: seen.update(h=i[0], logits=o))
    try:
        model(text, codes)
    finally:
        handle.remove()
    return seen["h"], seen["logits"]


def fit_q(h: Tensor, codes: Tensor, adv: Tensor, vocab: int, alpha: float) -> nn.Linear:
    """Ridge regression of Q(h_t)[x_t] on each sample's advantage at every position, one per next token a over
    the positions that took a: h (S, N, d), codes (S, N), adv (S,). Closed form, so a token seldom taken keeps
    a row near 0 (a first-order optimiser that normalises each weight's steps, such as Adam, moves such rows as
    far as common ones, and the tilt then favours rare tokens on noise). The bias is not penalised."""
    x = torch.cat([h.reshape(-1, h.shape[-1]), torch.ones(h.shape[0] * h.shape[1], 1)], dim=1).double()
    a, y = codes.reshape(-1), adv[:, None].expand_as(codes).reshape(-1).double()
    d = x.shape[1]
    penalty = alpha * torch.eye(d, dtype=torch.float64)
    penalty[-1, -1] = 0.0
    w = torch.zeros(vocab, d, dtype=torch.float64)
    order = torch.argsort(a)
    counts = torch.bincount(a, minlength=vocab).tolist()
    for token, rows in enumerate(torch.split(order, counts)):
        if len(rows) == 0:
            continue
        xa = x[rows]
        w[token] = torch.linalg.solve(xa.T @ xa + penalty + 1e-6 * torch.eye(d, dtype=torch.float64), xa.T @ y[rows])
    q = nn.Linear(h.shape[-1], vocab)
    with torch.no_grad():
        q.weight.copy_(w[:, :-1])
        q.bias.copy_(w[:, -1])
    return q


def share_explained(pred: Tensor, adv: Tensor) -> float:
    """Share of the advantage's variance (adv (S,), mean 0 per prompt) that Q's values of the taken tokens,
    pred (S, N) or a slice of its positions, explain."""
    y = adv[:, None].expand_as(pred)
    return float(1 - (pred - y).pow(2).mean() / y.pow(2).mean())


@torch.no_grad()
def explained(q: nn.Linear, h: Tensor, codes: Tensor, adv: Tensor) -> float:
    """`share_explained` of a linear Q over all positions, h (S, N, d), codes (S, N)."""
    return share_explained((h * q.weight[codes]).sum(dim=-1) + q.bias[codes], adv)


class Tilt:
    """logits + lam · Q(h) wherever the model's image head runs: a forward hook for teacher-forced passes, and
    a wrapper of the cached sampler's `row_linear` (which applies the head's weight itself). lam 0: the model
    as it is. `remove` undoes both."""

    def __init__(self, model: nn.Module, q: nn.Linear) -> None:
        from dalle.transformer import decoding

        self.q, self.lam, self.head, self.decoding = q, 0.0, model.image_head, decoding
        self.handle = model.image_head.register_forward_hook(self)
        self.row_linear = decoding.row_linear

        def row_linear(layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = self.row_linear(layer, x, *args, **kwargs)
            return self(layer, (x,), out) if layer is self.head else out

        decoding.row_linear = row_linear

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return out if self.lam == 0 else out + self.lam * self.q(inputs[0]).to(out.dtype)

    def q_logits(self, model: nn.Module, text: Tensor, codes: Tensor) -> Tensor:
        """Q at every image position (B, N, V), teacher-forced."""
        return self.q(hidden_states(model, text, codes)[0])

    def remove(self) -> None:
        self.handle.remove()
        self.decoding.row_linear = self.row_linear


class ValueTilt:
    """logits + lam · Q with Q the image logits of a separate value transformer (`train_value`), run in lockstep
    with the sampled model through its own cache: a wrapper of the library sampler's prefill and decode_step."""

    def __init__(self, model: nn.Module, value: nn.Module) -> None:
        from dalle.transformer import decoding, sampling

        self.model, self.value, self.lam, self.sampling = model, value, 0.0, sampling
        self.prefill, self.decode_step = sampling.prefill, sampling.decode_step
        self.cache: Any = None

        def prefill(m: nn.Module, text: Tensor, prefix: Tensor, cache: Any) -> Tensor:
            out = self.prefill(m, text, prefix, cache)
            if m is not self.model or self.lam == 0:
                return out
            self.cache = decoding.KVCache(value.config, text.shape[0], text.device, out.dtype)
            return out + self.lam * self.prefill(value, text, prefix, self.cache)

        def decode_step(m: nn.Module, token: Tensor, cache: Any) -> Tensor:
            out = self.decode_step(m, token, cache)
            if m is not self.model or self.lam == 0:
                return out
            return out + self.lam * self.decode_step(value, token, self.cache)

        sampling.prefill, sampling.decode_step = prefill, decode_step

    def q_logits(self, model: nn.Module, text: Tensor, codes: Tensor) -> Tensor:
        return self.value(text, codes)[1]

    def remove(self) -> None:
        self.sampling.prefill, self.sampling.decode_step = self.prefill, self.decode_step


@torch.no_grad()
def taken_q(value: nn.Module, text: Tensor, codes: Tensor, batch: int = 256) -> Tensor:
    """A value transformer's Q of each taken token, (S, N), teacher-forced in batches."""
    return torch.cat([value(text[b : b + batch], codes[b : b + batch])[1].gather(-1, codes[b : b + batch, :, None])
                      .squeeze(-1) for b in range(0, len(codes), batch)])


def train_value(model: nn.Module, text: Tensor, codes: Tensor, adv: Tensor, val: Tensor, steps: int, lr: float,
                batch: int = 32, every: int = 100) -> tuple[nn.Module, dict[int, float]]:
    """A copy of `model` whose image head (zeros at the start) gives Q(x_<t)[a], trained by least squares of
    Q[x_t] on the sample's advantage at every position, on the rows not in `val`; the checkpoint of the `every`
    that explains most of the `val` rows' variance is returned with every checkpoint's share."""
    import copy

    value = copy.deepcopy(model)
    value.image_head = nn.Linear(model.config.n_embd, model.config.image_vocab_size, bias=False)
    nn.init.zeros_(value.image_head.weight)
    for param in value.parameters():
        param.requires_grad_(True)
    head = list(value.image_head.parameters())
    body = [p for n, p in value.named_parameters() if not n.startswith("image_head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": 10 * lr}], weight_decay=0.01)
    rows = torch.nonzero(~val).squeeze(1)
    g = torch.Generator().manual_seed(0)

    def share() -> float:
        value.eval()
        explained = share_explained(taken_q(value, text[val], codes[val]), adv[val])
        value.train()
        return explained

    curve, best, best_state = {}, -float("inf"), None
    value.train()
    for step in range(1, steps + 1):
        b = rows[torch.randint(len(rows), (batch,), generator=g)]
        pred = value(text[b], codes[b])[1].gather(-1, codes[b][..., None]).squeeze(-1)
        loss = (pred - adv[b][:, None]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve[step] = share()
            if curve[step] > best:
                best, best_state = curve[step], copy.deepcopy(value.state_dict())
            print(f"value step {step}: held-out share explained {curve[step]:.4f}", flush=True)
    value.load_state_dict(best_state)
    value.eval()
    for param in value.parameters():
        param.requires_grad_(False)
    return value, curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dalle/default_model", help="the supervised model (default: the shipped one)")
    p.add_argument("--reward", default="gold", help="'gold' (the detector: all correct + 0.1 per check right) or a "
                   "reward model directory (tools/train_feedback.py reward)")
    p.add_argument("--exclude-store", type=Path, help="a comparisons store whose prompts are neither judged nor "
                   "fitted on (the reward model's, so that no held-out prompt is one it was trained on)")
    p.add_argument("--prompts", type=int, default=1500, help="shapes train prompts Q is fitted on (1500)")
    p.add_argument("--samples", type=int, default=4, help="samples of each of them (4)")
    p.add_argument("--lam", type=float, nargs="+", help="tilts to judge (default: those whose KL, estimated on the "
                   "fitting samples as c lam^2, is each of --kl-targets)")
    p.add_argument("--kl-targets", type=float, nargs="+", default=[0.5, 1.0, 1.85, 3.0],
                   help="nats, without --lam (0.5 1 1.85 3)")
    p.add_argument("--eval-n", type=int, default=150, help="held-out prompts a split (150)")
    p.add_argument("--draws", type=int, default=8, help="samples a held-out prompt judged per lambda (8)")
    p.add_argument("--q", choices=["linear", "transformer"], default="linear",
                   help="Q: one linear layer on the frozen model's last hidden state (ridge), or a copy of the "
                   "whole transformer trained as a value model (linear)")
    p.add_argument("--value-steps", type=int, default=800, help="training steps of the value transformer (800)")
    p.add_argument("--value-lr", type=float, default=2e-5, help="its learning rate; 10x for its new head (2e-5)")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1e3, 1e4, 1e5],
                   help="ridge penalties tried; the one that explains most of held-out prompts' advantages is kept")
    p.add_argument("--fit-only", action="store_true", help="stop after fitting Q: write its held-out figures only")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled together (64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--out", type=Path, required=True, help="JSON of every figure (refused if it exists)")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; name another file or delete it")
    if args.exclude_store is not None and not args.exclude_store.is_file():
        p.error(f"--exclude-store {args.exclude_store} does not exist")
    if args.reward != "gold" and not Path(args.reward).is_dir():
        p.error(f"--reward {args.reward}: not 'gold' and not a reward model directory")
    if min(args.lam or [1.0]) <= 0 or min(args.kl_targets) <= 0 or args.prompts < 10 or args.samples < 2:
        p.error("--lam and --kl-targets must be positive, --prompts at least 10 and --samples at least 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from dalle.data.shapes import make_sample
    from dalle.evaluation.compositional import Prompt
    from dalle.feedback.losses import best_of_n_kl, position_kl, sequence_kl
    from dalle.feedback.policy_eval import _judge_draws, _text, draw, held_out_prompts, reward_scorer
    from dalle.feedback.raters import gold_rewards
    from dalle.pipeline import load_pipeline
    from dalle.transformer.sampling import token_logprobs

    try:
        pipe = load_pipeline(args.model)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--model {args.model}: {e}")
    model = pipe.model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    t0 = time.time()

    # held out first, so that Q's prompts can avoid them; Q's come from another seed of the train split
    excluded: list[str] = []
    if args.exclude_store is not None:
        from dalle.feedback.store import Store

        store = Store(args.exclude_store)
        excluded = [row[0] for row in store.db.execute("SELECT text FROM prompts")]
        store.close()
    size = pipe.dvae.config.image_size
    held = {split: held_out_prompts(split, args.eval_n, excluded, image_size=size) for split in ("train", "zeroshot")}
    held_captions = {split: [pr.caption for pr in prs] for split, prs in held.items()}
    seen = {pr.caption for prs in held.values() for pr in prs} | set(excluded)
    fit_prompts: list[Prompt] = []
    i = 0
    while len(fit_prompts) < args.prompts:
        sample = make_sample(i, "train", 1, size)
        if sample.caption not in seen:
            fit_prompts.append(Prompt(sample.caption, sample))
        i += 1
    if args.reward == "gold":
        def reward(prompts: list[Prompt], codes: Tensor, images: Tensor) -> Tensor:
            return gold_rewards(prompts, images.float() / 255)
    else:
        from dalle.checkpoint import load_pretrained, resolve_model_dir
        from dalle.tokenizer import TextTokenizer

        rm = load_pretrained(args.reward, expect="reward").eval()
        scorer = reward_scorer(rm, TextTokenizer.from_file(resolve_model_dir(args.reward) / "tokenizer.json"))

        def reward(prompts: list[Prompt], codes: Tensor, images: Tensor) -> Tensor:
            return scorer([pr.caption for pr in prompts], codes, images)

    codes, images = draw(pipe, [pr.caption for pr in fit_prompts], args.samples, seed=10_000,
                         batch_size=args.batch_size)
    flat_prompts = [pr for pr in fit_prompts for _ in range(args.samples)]
    flat = [pr.caption for pr in flat_prompts]
    r = reward(flat_prompts, codes.flatten(0, 1), images.flatten(0, 1)).view(len(fit_prompts), args.samples)
    adv = (r - r.mean(dim=1, keepdim=True)).flatten()
    c_all = codes.flatten(0, 1)
    # a tenth of the prompts (all their samples) held out to choose the penalty or the checkpoint
    val = torch.arange(len(flat)) // args.samples % 10 == 0
    text_all = torch.cat([_text(pipe, flat[s : s + 256]) for s in range(0, len(flat), 256)])
    if args.q == "linear":
        with torch.no_grad():
            h_all = torch.cat([hidden_states(model, text_all[s : s + args.batch_size],
                                             c_all[s : s + args.batch_size])[0]
                               for s in range(0, len(flat), args.batch_size)])
        fits = {alpha: explained(fit_q(h_all[~val], c_all[~val], adv[~val], model.config.image_vocab_size, alpha),
                                 h_all[val], c_all[val], adv[val]) for alpha in args.alpha}
        alpha = max(fits, key=fits.get)
        held_q = fit_q(h_all[~val], c_all[~val], adv[~val], model.config.image_vocab_size, alpha)
        q = fit_q(h_all, c_all, adv, model.config.image_vocab_size, alpha)
        q.requires_grad_(False)
        print(f"held-out share of the advantage's variance explained, by penalty: {fits}; kept {alpha}", flush=True)
        tilt: Any = Tilt(model, q)
        fit_info: dict[str, Any] = {"explained_by_alpha": fits, "alpha": alpha}
    else:
        with torch.enable_grad():
            value, curve = train_value(model, text_all, c_all, adv, val, args.value_steps, args.value_lr)
        tilt = ValueTilt(model, value)
        fit_info = {"explained_by_step": curve}
        held_q = None
    # how much of the advantage Q explains on the held-out tenth, by quarter of the image's positions: the
    # last quarter has seen most of the image, so it says whether the features know the verdict at all. The
    # linear Q of the tilt is refitted on every prompt, so this takes the one fitted without the tenth.
    with torch.no_grad():
        cv = c_all[val]
        pred = (taken_q(value, text_all[val], cv) if held_q is None else
                (h_all[val] * held_q.weight[cv]).sum(dim=-1) + held_q.bias[cv])
    quarters = [share_explained(pred[:, k], adv[val]) for k in torch.arange(pred.shape[1]).chunk(4)]
    fit_info["explained_by_quarter"] = quarters
    print(f"held-out share explained by quarter of the positions: {[round(x, 4) for x in quarters]}", flush=True)
    if args.fit_only:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "fit": fit_info, "held_out": held_captions},
                                       indent=1) + "\n")
        return 0
    lams = args.lam
    if lams is None:  # the exact KL of the tilt at lam 1 on the held-out fitting samples, KL ≈ c lam^2 near 0
        with torch.no_grad():
            t, cv = text_all[val][:256], c_all[val][:256]
            logits = model(t, cv)[1]
            c = float(position_kl(logits + tilt.q_logits(model, t, cv), logits).sum(dim=1).mean())
        lams = [round((target / c) ** 0.5, 3) for target in args.kl_targets]
        print(f"KL at lam 1 about {c:.3f} nats; lam {lams}", flush=True)
    out: dict[str, Any] = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                           "fit": {"prompts": len(fit_prompts), "samples": args.samples,
                                   "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                                   **fit_info, "lams": lams,
                                   "seconds": time.time() - t0}, "held_out": held_captions, "rows": []}
    print(f"fitted Q on {len(flat)} samples in {time.time() - t0:.0f} s", flush=True)

    for split, prompts in held.items():
        names = [pr.caption for pr in prompts]
        two = [k for k, pr in enumerate(prompts) if len(pr.sample.scene.objects) == 2]
        for lam in [0.0, *lams]:
            tilt.lam = lam
            k = max(args.draws, 16) if lam == 0 else args.draws
            codes, images = draw(pipe, names, k, seed=0, batch_size=args.batch_size)
            judged = _judge_draws(prompts, images[:, : args.draws])
            two_judged = _judge_draws([prompts[j] for j in two], images[two, : args.draws])
            row = {"split": split, "lam": lam, "all_correct": judged["all_correct"],
                   "two_objects": two_judged["all_correct"], "n": len(prompts), "n_two": len(two)}
            if lam == 0:
                row["kl"] = 0.0
                flat_prompts = [pr for pr in prompts for _ in range(k)]
                scores = reward(flat_prompts, codes.flatten(0, 1), images.flatten(0, 1)).view(len(names), k)
                for n in (4, 16):
                    groups = scores[:, : k // n * n].view(len(names), -1, n)
                    best = groups.argmax(dim=2) + torch.arange(0, k // n * n, n)  # (P, groups)
                    kept = images[torch.arange(len(names))[:, None], best]  # (P, groups, 3, H, W)
                    out["rows"].append({"split": split, "best_of": n, "kl": best_of_n_kl(n),
                                        "all_correct": _judge_draws(prompts, kept)["all_correct"],
                                        "two_objects": _judge_draws([prompts[j] for j in two],
                                                                    kept[two])["all_correct"]})
            else:
                flat = [c for c in names for _ in range(args.draws)]
                drawn = codes[:, : args.draws].flatten(0, 1)
                mc, exact = [], []
                with torch.no_grad():
                    for b in range(0, len(flat), args.batch_size):
                        text, c = _text(pipe, flat[b : b + args.batch_size]), drawn[b : b + args.batch_size]
                        tilt.lam = 0.0
                        ref = model(text, c)[1]
                        pi = ref + lam * tilt.q_logits(model, text, c)
                        tilt.lam = lam
                        mc.append(sequence_kl(token_logprobs(pi, c), token_logprobs(ref, c)))
                        exact.append(position_kl(pi, ref).sum(dim=-1))
                row["kl"], row["kl_exact"] = float(torch.cat(mc).mean()), float(torch.cat(exact).mean())
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    tilt.remove()
    out["seconds"] = time.time() - t0
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
