"""Policy evaluation after learning from feedback (Stiennon et al. 2020, sec. 4.1 and fig. 3 and 7): how right
are the images of each policy by a judge that is not the reward model (the shapes detector), how far has the
policy moved from the supervised model (KL), how much does the reward model like what it kept, and how much
variety is left.

Rows, each on held-out shapes prompts with the same seeds:

    first sample   the supervised (SFT) model's sample c = 0; KL 0 by definition
    best of N      N samples of the SFT model, the one the reward model scores highest kept; KL analytic,
                   log N - (N - 1) / N (`best_of_n_kl`), since the kept sample's distribution is known
    fine-tuned     each policy's sample c = 0; KL by Monte Carlo, mean over the policy's own samples of
                   sum over image tokens of log pi - log pi_SFT
    sft guided     the SFT model's sample c = 0 with classifier-free guidance at a scale s (`sft_guided`): a
                   policy that moves by sampling, not training. KL by Monte Carlo as above, pi the guided
                   next-token distribution softmax(uncond + s (cond - uncond)), exact at each token
    sft at T       the SFT model's sample c = 0 at a sampling temperature T (`sft_temperature`), the same way:
                   pi = softmax(cond / T). A fine-tuned model can be exactly this policy (its output layer
                   scaled by 1 / T), so it marks what one parameter buys on the KL axis

Every other row samples plainly (temperature 1, no top-k/top-p, no guidance): the KL is then that of the
distributions actually sampled, and best-of-N's formula holds. Candidate c of every prompt is sampled with
seed `seed + c`, so the first-sample rows of two identical models are identical. With `judged` j > 1 each
row also gets the mean all-correct of up to j independent draws of its selection per prompt (samples 0..j-1;
for best of N, the best of each of the disjoint groups of N among the samples drawn): the same expectation as
the first sample's, with much less of the sampling noise that one image a prompt carries. Diversity, among
`diversity` samples per prompt: the share of distinct code sequences (1/k when all k are equal) and the mean
absolute pixel difference of every pair of them, in [0, 1]. Pure library code: no file I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.data.shapes import make_sample
from dalle.evaluation.compositional import Prompt, score_images, summarise
from dalle.evaluation.report import markdown_table
from dalle.feedback.losses import best_of_n_kl, sequence_kl
from dalle.generation import sample_codes
from dalle.pipeline import Pipeline
from dalle.transformer.sampling import empty_text, token_logprobs

# (prompts, codes (B, N), images (B, 3, H, W) uint8) -> rewards (B,)
Scorer = Callable[[Sequence[str], Tensor, Tensor], Tensor]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class EvalSettings:
    best_of: tuple[int, ...] = (4, 16, 64)  # N of the best-of-N rows
    diversity: int = 16  # samples per prompt for the diversity figures and the Monte-Carlo KL
    seed: int = 0  # candidate c of each prompt is sampled with seed + c
    batch_size: int = 32  # images sampled together
    # draws per prompt the detector judges for the "mean" columns (1: the first sample only); at most the
    # samples drawn anyway (diversity, and the largest best_of for the supervised model)
    judged: int = 1
    # cond scale of one more averaged column (0: none): each first-sample row's `judged` draws again, sampled with
    # classifier-free guidance, as generate.py --cond-scale samples. Guidance leaves the KL and best-of-N
    # formulas behind (the distribution sampled is no longer the model's), so only the detector judges these.
    guided: float = 0.0
    # cond scales of the "sft guided" rows: the supervised model's guided sample as a policy, on the KL axis
    sft_guided: tuple[float, ...] = ()
    # temperatures of the "sft at T" rows: the supervised model sampled colder (or hotter), on the same KL axis
    sft_temperature: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if any(s <= 0 or s == 1 for s in self.sft_guided):
            raise ValueError(f"sft_guided scales must be > 0 and other than 1 (1 is the plain sft row), "
                             f"got {self.sft_guided}")
        if any(t <= 0 or t == 1 for t in self.sft_temperature):
            raise ValueError(f"sft_temperature values must be > 0 and other than 1 (1 is the plain sft row), "
                             f"got {self.sft_temperature}")
        if any(n < 1 for n in self.best_of) or self.diversity < 0 or self.batch_size < 1 or self.judged < 1 \
                or self.guided < 0:
            raise ValueError(f"need best_of >= 1, diversity >= 0, batch_size >= 1, judged >= 1 and guided >= 0, "
                             f"got {self.best_of}, {self.diversity}, {self.batch_size}, {self.judged}, {self.guided}")


def held_out_prompts(split: str, n: int, exclude: Iterable[str] = (), seed: int = 0, image_size: int = 64,
                     ) -> list[Prompt]:
    """The first `n` prompts of a shapes split whose caption is not in `exclude` (what fine-tuning saw)."""
    exclude, out = set(exclude), []
    limit = 20 * (n + len(exclude))  # captions repeat across the split, so excluded ones come back later too
    for i in range(limit):
        if len(out) == n:
            return out
        sample = make_sample(i, split, seed, image_size)
        if sample.caption not in exclude:
            out.append(Prompt(sample.caption, sample))
    if len(out) < n:
        raise ValueError(f"only {len(out)} of the first {limit} {split} prompts are held out; ask for fewer")
    return out


@torch.no_grad()
def draw(pipe: Pipeline, prompts: Sequence[str], k: int, seed: int, batch_size: int,
         progress: Progress | None = None, cond_scale: float = 1.0, temperature: float = 1.0
         ) -> tuple[Tensor, Tensor]:
    """k samples per prompt (plain, unless `cond_scale` guides them or `temperature` is not 1): codes (P, k, N)
    and images (P, k, 3, H, W) uint8, quantised as a PNG is. progress(n) is called with the prompts whose k
    samples are complete."""
    jobs = [(i, seed + c) for i in range(len(prompts)) for c in range(k)]
    codes, images, done = [], [], 0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        c, im = sample_codes(pipe, [prompts[i] for i, _ in chunk], [s for _, s in chunk], cond_scale=cond_scale,
                             temperature=temperature)
        codes.append(c)
        images.append(im.clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8))
        if progress is not None:
            progress((start + len(chunk)) // k - done)
            done = (start + len(chunk)) // k
    codes_t, images_t = torch.cat(codes), torch.cat(images)
    return codes_t.view(len(prompts), k, -1), images_t.view(len(prompts), k, *images_t.shape[1:])


def diversity(codes: Tensor, images: Tensor) -> dict[str, float]:
    """codes (P, k, N), images (P, k, 3, H, W) uint8 or in [0, 1] -> the mean over prompts of the share of
    distinct code sequences among the k, and of the mean absolute pixel difference over their pairs."""
    p, k = codes.shape[:2]
    if k < 2:
        raise ValueError(f"diversity needs at least 2 samples per prompt, got {k}")
    distinct = sum(len({tuple(row.tolist()) for row in codes[i]}) for i in range(p)) / (p * k)
    a, b = (list(x) for x in zip(*itertools.combinations(range(k), 2)))
    per_prompt = []
    for i in range(p):  # one prompt at a time: all pairs of all prompts at once would hold P x k^2 / 2 images
        x = images[i].float() / 255 if images.dtype == torch.uint8 else images[i].float()  # (k, 3, H, W)
        per_prompt.append((x[a] - x[b]).abs().mean().item())
    distance = sum(per_prompt) / p
    return {"distinct": distinct, "pixel_distance": distance}


@torch.no_grad()
def policy_kl(policy: Pipeline, ref: Pipeline, prompts: Sequence[str], codes: Tensor, batch_size: int) -> Tensor:
    """Monte-Carlo KL(pi || pi_SFT) per sample (B,), in nats: sum over image tokens of log pi - log pi_SFT
    for codes (B, N) sampled from the policy. Each model reads the prompt through its own tokenizer."""
    out = []
    for texts, c in _batches(prompts, codes, batch_size):
        logp = [token_logprobs(pipe.model(_text(pipe, texts), c.to(pipe.device))[1], c.to(pipe.device)).cpu()
                for pipe in (policy, ref)]
        out.append(sequence_kl(*logp))
    return torch.cat(out)


@torch.no_grad()
def sampling_kl(ref: Pipeline, prompts: Sequence[str], codes: Tensor, batch_size: int, cond_scale: float = 1.0,
                temperature: float = 1.0) -> Tensor:
    """Monte-Carlo KL(pi || pi_SFT) per sample (B,), in nats, for codes (B, N) sampled from `ref` with
    classifier-free guidance at `cond_scale` and at `temperature`: sum over image tokens of
    log softmax((uncond + s (cond - uncond)) / T) - log softmax(cond), both of `ref`."""
    out = []
    for texts, c in _batches(prompts, codes, batch_size):
        c = c.to(ref.device)
        cond = ref.model(_text(ref, texts), c)[1].float()
        pi = cond
        if cond_scale != 1:
            uncond = ref.model(empty_text(ref.model, len(c), ref.device), c)[1].float()
            pi = torch.lerp(uncond, cond, cond_scale)
        out.append(sequence_kl(token_logprobs(pi / temperature, c), token_logprobs(cond, c)).cpu())
    return torch.cat(out)


def _batches(prompts: Sequence[str], codes: Tensor, batch_size: int) -> Iterator[tuple[list[str], Tensor]]:
    """(prompts, codes) in consecutive batches of batch_size rows."""
    for start in range(0, len(codes), batch_size):
        yield list(prompts[start : start + batch_size]), codes[start : start + batch_size]


def _text(pipe: Pipeline, texts: list[str]) -> Tensor:
    return pipe.tokenizer.encode_batch(texts, pipe.model.config.text_seq_len, truncate_warn=False)[0].to(pipe.device)


def reward_scorer(model: Any, tokenizer: Any, batch_size: int = 64) -> Scorer:
    """A RewardModel as a Scorer: pixels (resized to its reranker's size) or codes, as its body reads."""
    cfg = model.config
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(prompts: Sequence[str], codes: Tensor, images: Tensor) -> Tensor:
        out = []
        for start in range(0, len(codes), batch_size):
            part = slice(start, start + batch_size)
            text = tokenizer.encode_batch(list(prompts[part]), cfg.text_seq_len, truncate_warn=False)[0]
            image = codes[part]
            if cfg.reads_pixels:
                image, size = images[part].float() / 255, cfg.reranker.image_size
                if image.shape[-1] != size:
                    image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True).clamp(0, 1)
            out.append(model(text.to(device), image.to(device)).float().cpu())
        return torch.cat(out)
    return score


def _judge(prompts: Sequence[Prompt], images: Tensor) -> dict[str, Any]:
    """Compositional figures of one kept image per prompt, images (P, 3, H, W) uint8."""
    summary = summarise(prompts, score_images(prompts, [im.permute(1, 2, 0).numpy() for im in images]))
    return {"accuracy": summary["all"], "two_objects": summary.get("2 objects", {"n": 0})}


def _judge_draws(prompts: Sequence[Prompt], images: Tensor) -> dict[str, Any]:
    """Mean all-correct over j draws per prompt, images (P, j, 3, H, W) uint8: overall and on two objects."""
    j = images.shape[1]
    figures = _judge([p for p in prompts for _ in range(j)], images.flatten(0, 1))
    return {"draws": j, "all_correct": figures["accuracy"]["all_correct"],
            "two_objects_all_correct": figures["two_objects"].get("all_correct")}


def _guided(pipe: Pipeline, prompts: Sequence[Prompt], s: EvalSettings, progress: Progress | None
            ) -> dict[str, Any]:
    """The "guided" figures of a first-sample row: its `judged` draws a prompt at cond scale `guided`."""
    if not s.guided:
        return {}
    _, images = draw(pipe, [p.caption for p in prompts], s.judged, s.seed, s.batch_size, progress,
                     cond_scale=s.guided)
    return {"guided": {**_judge_draws(prompts, images), "cond_scale": s.guided}}


def _sft_rows(sft: Pipeline, split: str, prompts: Sequence[Prompt], reward: Scorer, s: EvalSettings,
              progress: Progress | None) -> list[dict[str, Any]]:
    texts = [p.caption for p in prompts]
    k = max([*s.best_of, s.diversity, s.judged, 1])
    codes, images = draw(sft, texts, k, s.seed, s.batch_size, progress)
    scores = reward([t for t in texts for _ in range(k)], codes.flatten(0, 1), images.flatten(0, 1)).view(-1, k)
    first = {"name": "sft", "model_id": sft.model_id, "selection": "first sample", "split": split, "kl": 0.0,
             "kl_estimate": "reference",
             "reward": scores[:, 0].mean().item(), **_judge(prompts, images[:, 0])}
    if s.diversity > 1:
        first.update(diversity(codes[:, : s.diversity], images[:, : s.diversity]))
    if s.judged > 1:
        first["mean"] = _judge_draws(prompts, images[:, : s.judged])
    first.update(_guided(sft, prompts, s, progress))
    rows, every = [first], torch.arange(len(prompts))
    for n in sorted(s.best_of):
        pick = scores[:, :n].argmax(1)  # among the first n candidates, so the rows differ only in selection
        row = {"name": f"sft best of {n}", "model_id": sft.model_id, "selection": f"best of {n} by the reward model",
               "split": split, "kl": best_of_n_kl(n), "kl_estimate": "analytic",
               "reward": scores[every, pick].mean().item(), **_judge(prompts, images[every, pick])}
        groups = min(s.judged, k // n)
        if s.judged > 1 and groups > 1:  # group g is candidates g*n .. g*n + n - 1; group 0 is the row's pick
            picks = scores[:, : groups * n].view(-1, groups, n).argmax(-1) + n * torch.arange(groups)
            row["mean"] = _judge_draws(prompts, images[every[:, None], picks])
        rows.append(row)
    return rows


def _policy_row(name: str, policy: Pipeline, sft: Pipeline, split: str, prompts: Sequence[Prompt], reward: Scorer,
                s: EvalSettings, progress: Progress | None, cond_scale: float = 1.0, temperature: float = 1.0
                ) -> dict[str, Any]:
    """A fine-tuned policy's row; with cond_scale or temperature other than 1 (policy is sft), the supervised
    model's guided or tempered sample."""
    texts = [p.caption for p in prompts]
    k = max(s.diversity, s.judged, 1)
    plain = cond_scale == 1 and temperature == 1
    codes, images = draw(policy, texts, k, s.seed, s.batch_size, progress, cond_scale=cond_scale,
                         temperature=temperature)
    every = [t for t in texts for _ in range(k)]
    kl = policy_kl(policy, sft, every, codes.flatten(0, 1), s.batch_size) if plain else \
        sampling_kl(sft, every, codes.flatten(0, 1), s.batch_size, cond_scale, temperature)
    selection = "first sample" + (f" at cond scale {cond_scale:g}" if cond_scale != 1 else "") \
        + (f" at temperature {temperature:g}" if temperature != 1 else "")
    row = {"name": name, "model_id": policy.model_id, "selection": selection, "split": split,
           "kl": kl.mean().item(),
           "kl_estimate": f"monte carlo, {len(kl)} samples",
           "reward": reward(texts, codes[:, 0], images[:, 0]).mean().item(), **_judge(prompts, images[:, 0])}
    if s.diversity > 1:
        row.update(diversity(codes[:, : s.diversity], images[:, : s.diversity]))
    if s.judged > 1:
        row["mean"] = _judge_draws(prompts, images[:, : s.judged])
    if plain:
        row.update(_guided(policy, prompts, s, progress))
    return row


def evaluate(sft: Pipeline, policies: Iterable[tuple[str, Pipeline]], prompts: dict[str, list[Prompt]],
             reward: Scorer, settings: EvalSettings = EvalSettings(),
             bar: Callable[[str, int], Progress | None] = lambda desc, total: None) -> list[dict[str, Any]]:
    """One row per (model or N, split). `policies` may load each model lazily (a generator): one is held at a
    time. bar(description, total) gives a progress callback for one model and split, counting prompts drawn
    (twice each with `guided`)."""
    rows, times = [], 2 if settings.guided else 1
    for split, ps in prompts.items():
        rows += _sft_rows(sft, split, ps, reward, settings, bar(f"sft {split}", times * len(ps)))
        for scale in settings.sft_guided:
            name = f"sft cond scale {scale:g}"
            rows.append(_policy_row(name, sft, sft, split, ps, reward, settings, bar(f"{name} {split}", len(ps)),
                                    cond_scale=scale))
        for t in settings.sft_temperature:
            name = f"sft at temperature {t:g}"
            rows.append(_policy_row(name, sft, sft, split, ps, reward, settings, bar(f"{name} {split}", len(ps)),
                                    temperature=t))
    for name, policy in policies:
        for split, ps in prompts.items():
            rows.append(_policy_row(name, policy, sft, split, ps, reward, settings,
                                    bar(f"{name} {split}", times * len(ps))))
    return rows


ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "count", "all_correct")


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per model or N, splits side by side: KL, reward and diversity averaged over the splits (each
    has the same number of prompts), all-correct per split, overall and on two-object prompts."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        e = out.setdefault(r["name"], {"name": r["name"], "model_id": r["model_id"], "selection": r["selection"],
                                       "splits": {}})
        e["splits"][r["split"]] = {"all_correct": r["accuracy"].get("all_correct"),
                                   "two_objects_all_correct": r["two_objects"].get("all_correct")}
        for key in ("mean", "guided"):
            if key in r:
                e["splits"][r["split"]][key] = r[key]
    for name, e in out.items():
        mine = [r for r in rows if r["name"] == name]
        for key in ("kl", "reward", "distinct", "pixel_distance"):
            values = [r[key] for r in mine if r.get(key) is not None]
            e[key] = sum(values) / len(values) if len(values) == len(mine) else None
    return list(out.values())


def _draws_table(entries: Sequence[dict[str, Any]], splits: Sequence[str], key: str) -> str:
    """The averaged figures under `key` ("mean" or "guided") of each summary entry, per split."""
    head = ["model"] + [f"{x}: {s}" for s in splits for x in ("draws", "all correct", "2 objects")]
    return markdown_table(head, ([e["name"]] + [e["splits"][s].get(key, {}).get(k) for s in splits
                                                for k in ("draws", "all_correct", "two_objects_all_correct")]
                                 for e in entries))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary table (true accuracy against KL, with the reward beside it), then per split the accuracy of
    each attribute."""
    entries = summary(rows)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    head = ["model", "KL (nats)", "reward"] + [f"{x}: {s}" for s in splits for x in ("all correct", "2 objects")]
    table = [[e["name"], e["kl"], e["reward"]]
             + [e["splits"][s][k] for s in splits for k in ("all_correct", "two_objects_all_correct")]
             + [e["distinct"], e["pixel_distance"]] for e in entries]
    parts = [markdown_table(head + ["distinct", "pixel distance"], table)]
    if any("mean" in r for r in rows):  # rows without it (a best of N with one group) show as blanks
        parts.append("Mean over several draws of each row's selection per prompt\n")
        parts.append(_draws_table(entries, splits, "mean"))
    guided = [e for e in entries if all("guided" in e["splits"][s] for s in splits)]
    if guided:
        scale = guided[0]["splits"][splits[0]]["guided"]["cond_scale"]
        parts.append(f"The first sample at cond scale {scale:g}, averaged over its draws per prompt\n")
        parts.append(_draws_table(guided, splits, "guided"))
    for split in splits:
        mine = [r for r in rows if r["split"] == split]
        n = mine[0]["accuracy"].get("n", 0)
        parts.append(f"{split} ({n} prompts; two-object prompts: {mine[0]['two_objects'].get('n', 0)})\n")
        cols = [a for a in ATTRIBUTES if any(a in r["accuracy"] for r in mine)]
        parts.append(markdown_table(["model"] + [c.replace("_", " ") for c in cols] + ["2 objects: all correct"],
                                    ([r["name"]] + [r["accuracy"].get(c) for c in cols]
                                     + [r["two_objects"].get("all_correct")] for r in mine)))
    return "\n".join(parts)
