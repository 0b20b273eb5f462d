"""A training recipe sized to a data set and a time budget, for tools/train_all.py.

The recipe is three config files in the format every training tool reads (model, objective, train and
data sections), built from the named configs (`tiny` under a 5-minute budget, else `shapes`) with:

- the image size from the data: the largest of 32, 64, 128, 256 that the images' typical shorter side
  reaches, capped by the budget (64 under 6 hours on a CPU, where a 128-pixel dVAE step costs 4x);
- the dVAE grid and code count from the image size and the image count (more images, more codes);
- the text length from the captions' BPE lengths (their 99th percentile, padded to a multiple of 8);
- batch sizes that fit the split sizes (a contrastive batch needs distinct pairs);
- steps from the budget: each stage's share of it divided by the seconds a step takes, measured on
  this machine by timing a few training steps of the very model with random inputs (`time_steps`).

Early stopping on the held-out metric guards the small data sets against the longer schedules.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Shares of the budget; the rest (about 12%) is the tokenizer, the probes, encoding and evaluation.
SHARES = {"dvae": 0.40, "dalle": 0.36, "reranker": 0.12}
MIN_STEPS = 10

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_budget(text: str) -> float:
    """"1h", "90m", "1h30m", "45min", "600s" or "600" (seconds) -> seconds; ValueError otherwise."""
    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(min|sec|hr|s|m|h|d)", t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ValueError(f"budget {text!r} is not a duration: use e.g. 45m, 1h, 1h30m or 600s")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"budget {text!r} must be more than zero")
    return seconds


def image_size_for(side: int, budget_s: float) -> int:
    cap = 32 if budget_s < 300 else 64 if budget_s < 6 * 3600 else 128 if budget_s < 48 * 3600 else 256
    fits = [s for s in (32, 64, 128, 256) if s <= max(side, 32)]
    return min(fits[-1], cap)


def codes_for(images: int, tier: str) -> int:
    if tier == "tiny":
        return 64
    return 512 if images < 20_000 else 1024 if images < 200_000 else 8192


def text_len_for(lengths: list[int]) -> int:
    """The 99th percentile of the captions' token counts, padded to a multiple of 8, in 8..256."""
    if not lengths:
        return 16
    p99 = sorted(lengths)[min(len(lengths) - 1, math.ceil(0.99 * len(lengths)) - 1)]
    return max(8, min(256, 8 * math.ceil(p99 / 8)))


def base(kind: str, tier: str) -> dict[str, Any]:
    from dalle.train.config import load_yaml

    return load_yaml(CONFIGS / kind / f"{tier}.yaml")


def plan(*, images: int, n_train: int, n_val: int, side: int, caption_lengths: list[int], budget_s: float,
         data: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The three configs (steps not yet set: `set_steps` does that from measured step times).
    `data` holds source, train, val and the tokenizer path."""
    tier = "tiny" if budget_s < 300 else "shapes"
    size = image_size_for(side, budget_s)
    vocab = codes_for(images, tier)
    text_len = text_len_for(caption_lengths)
    dvae, dalle, rer = base("dvae", tier), base("dalle", tier), base("reranker", tier)
    data_images = {"source": data["source"], "path": data["train"], "val_path": data["val"],
                   "background": data["background"], "preprocess": data["preprocess"]}
    down = 4 if size <= 32 else 8  # an 8x8 grid at 32 and 64 pixels, 16x16 at 128, 32x32 at 256
    dvae["model"].update(image_size=size, downsample=down, vocab_size=vocab)
    dvae["objective"].update(eval_images=min(1024, n_val), grid_images=min(16, n_val))
    dvae["train"].update(batch_size=min(dvae["train"]["batch_size"], max(2, n_train // 4)))
    dvae["data"] = dict(data_images)
    grid = size // down
    dalle["model"].update(text_seq_len=text_len, image_vocab_size=vocab, image_grid_size=grid, text_vocab_size=0)
    if tier != "tiny" and budget_s >= 3 * 3600:
        dalle["model"].update(n_embd=256, n_layer=8, n_head=8)
    dalle["objective"].update(val_samples=min(512, n_val), sample_prompts=data.get("prompts") or [])
    dalle["train"].update(batch_size=min(dalle["train"]["batch_size"], max(4, n_train // 8)))
    dalle["data"] = {"source": "tokens", "path": data["tok_train"], "val_path": data["tok_val"]}
    dalle["inputs"] = {"tokenizer": data["tokenizer"], "dvae": data["dvae"]}
    rer["model"].update(text_seq_len=text_len, image_size=size, text_vocab_size=0,
                        patch_size=min(rer["model"]["patch_size"], size // 4))
    rer["objective"].update(val_samples=min(1024, n_val), val_batch_size=min(128, n_val))
    rer["train"].update(batch_size=min(rer["train"]["batch_size"], max(4, n_train // 4)))
    rer["data"] = dict(data_images)
    rer["inputs"] = {"tokenizer": data["tokenizer"]}
    return {"dvae": dvae, "dalle": dalle, "reranker": rer}


def named_recipe_files(name: str) -> list[Path]:
    """configs/{dvae,dalle,reranker}/NAME.yaml; ValueError for a name that is not a plain file stem."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"recipe {name!r} is not a config name such as shapes or tiny")
    return [CONFIGS / kind / f"{name}.yaml" for kind in SHARES]


def named(name: str, data: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The configs NAME.yaml as they are (models, objectives, steps) with this run's data and inputs, and
    the transformer's grid and codes and the reranker's image size taken from the dVAE's config. Image data
    stays the configs' own source when `data["source"]` is shapes, else it is the run's split."""
    from dalle.train.config import load_yaml

    cfgs = {kind: load_yaml(f) for kind, f in zip(SHARES, named_recipe_files(name))}
    d = cfgs["dvae"]["model"]  # the transformer and reranker follow the dVAE's images and codes
    cfgs["dalle"]["model"].update(image_vocab_size=d["vocab_size"], image_grid_size=d["image_size"] // d["downsample"])
    cfgs["reranker"]["model"]["image_size"] = d["image_size"]
    if data["source"] != "shapes":
        images = {"source": data["source"], "path": data["train"], "val_path": data["val"],
                  "background": data["background"], "preprocess": data["preprocess"]}
        cfgs["dvae"]["data"] = dict(images)
        cfgs["reranker"]["data"] = dict(images)
    cfgs["dalle"]["data"] = {"source": "tokens", "path": data["tok_train"], "val_path": data["tok_val"]}
    cfgs["dalle"]["inputs"] = {"tokenizer": data["tokenizer"], "dvae": data["dvae"]}
    cfgs["reranker"]["inputs"] = {"tokenizer": data["tokenizer"]}
    return cfgs


def steps_for(seconds: float, step_s: float) -> int:
    """The steps that fit in `seconds` at `step_s` seconds a step (at least MIN_STEPS)."""
    return max(MIN_STEPS, int(seconds / max(step_s, 1e-6)))


def set_steps(cfg: dict[str, Any], steps: int, *, early_stop: int) -> int:
    """Fill in steps, evaluation and save intervals, warm-up and schedules for `steps` steps."""
    every = max(5, steps // 8)
    train = cfg["train"]
    obj = cfg.get("objective", {})
    if obj.get("second_mix_at") and train.get("steps"):  # a curriculum switches at the same share of the run
        obj["second_mix_at"] = min(steps - 1, max(1, round(obj["second_mix_at"] * steps / train["steps"])))
    train.update(steps=steps, eval_every=every, save_every=every, log_every=max(1, min(100, every // 2)),
                 early_stop_evals=early_stop)
    if train.get("ema_decay"):  # an average over at most a tenth of the run, or the start's weights linger in it
        train["ema_decay"] = max(0.0, round(min(train["ema_decay"], 1 - 10 / steps), 4))
    if "warmup_steps" in train:
        train["warmup_steps"] = min(train["warmup_steps"], steps // 10)
    if "temp_steps" in obj:
        obj["temp_steps"] = min(obj["temp_steps"], max(1, steps // 3))
    if "kl_steps" in obj:
        obj["kl_steps"] = min(obj["kl_steps"], max(1, steps // 3))
    return steps


# ------------------------------------------------------------------------------------ step timing


def time_steps(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], *, precision: str,
               steps: int = 3) -> float:
    """Seconds per optimizer step (forward, backward, AdamW), after one untimed warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_bf16 = precision == "bf16"
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn()
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def probe_dvae(cfg: dict[str, Any]) -> float:
    from dalle.config import from_dict
    from dalle.train.tasks.dvae import DVAEObjective, DVAETask
    from dvae.model import DiscreteVAE, DVAEConfig

    model = DiscreteVAE(from_dict(DVAEConfig, cfg["model"]))
    if cfg["train"].get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    task = DVAETask(model, from_dict(DVAEObjective, cfg["objective"]), [], [])
    b, s = cfg["train"]["batch_size"], cfg["model"]["image_size"]
    batch = {"image": torch.rand(b, 3, s, s)}
    return time_steps(model, lambda: task.loss(model, batch, 0)[0], precision=cfg["train"].get("precision", "fp32"))


def probe_dalle(cfg: dict[str, Any], text_vocab: int) -> float:
    import torch.nn.functional as F

    from dalle.config import from_dict
    from dalle.transformer.model import DALLE, DALLEConfig

    m = from_dict(DALLEConfig, {**cfg["model"], "text_vocab_size": text_vocab})
    model = DALLE(m)
    b = cfg["train"]["batch_size"]
    text = torch.randint(0, text_vocab, (b, m.text_seq_len))
    codes = torch.randint(0, m.image_vocab_size, (b, m.image_grid_size ** 2))

    def loss() -> torch.Tensor:
        t, i = model(text, codes)
        return F.cross_entropy(t.flatten(0, 1).float(), text.flatten()) + F.cross_entropy(
            i.flatten(0, 1).float(), codes.flatten())
    return time_steps(model, loss, precision=cfg["train"].get("precision", "fp32"))


def probe_reranker(cfg: dict[str, Any], text_vocab: int) -> float:
    from dalle.config import from_dict
    from dalle.reranker.model import Reranker, RerankerConfig, contrastive_loss

    m = from_dict(RerankerConfig, {**cfg["model"], "text_vocab_size": text_vocab})
    model = Reranker(m)
    b = cfg["train"]["batch_size"]
    ids = torch.randint(0, text_vocab, (b, m.text_seq_len))
    images = torch.rand(b, 3, m.image_size, m.image_size)
    return time_steps(model, lambda: contrastive_loss(model(ids, images)[0].float()),
                      precision=cfg["train"].get("precision", "fp32"))
