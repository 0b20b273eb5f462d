"""The training side of configs: YAML files with one section per dataclass, `--set` overrides, and
`TrainConfig`, the settings of a run that are not the model's architecture.

A config file has one section per dataclass (`model:`, `objective:`, `train:`, `data:`, ...); keys are
the dataclass field names (see `dalle.config`). Model configs hold architecture only; how a run trains,
and the runtime knobs that change speed and memory but not the result (attention back end, gradient
checkpointing, channels-last), live here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML: 1e-3, true, [0.9, 0.96])."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return data


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # samples per micro-batch on each rank (process)
    grad_accum: int = 1  # micro-batches per optimizer step; effective batch = batch_size x grad_accum x ranks
    lr: float = 1e-3
    min_lr: float = 0.0  # the cosine schedule decays to this
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # "cosine" or "constant" (both after the linear warm-up)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to the parameter groups the task marks for decay
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the EMA; evaluation and exports use the EMA when enabled
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + loss scaling, GPU)
    seed: int = 0
    num_workers: int = 0
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    early_stop_evals: int = 0  # stop after this many evaluations without a better held-out metric (0: off)
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    # Stop at the first evaluation after this many minutes of training in this process (0: off), with a
    # checkpoint as at the end; tools/train_all.py sets it from its --budget so a busy machine cannot overrun.
    time_limit_minutes: float = 0.0
    # How long a rank waits in a collective (all-reduce, barrier) before the run fails: a rank that hangs or
    # is stopped (SIGSTOP, a dead node) would otherwise hold every other GPU idle. 10 is torch's own NCCL
    # default; waits here are a step's all-reduce (seconds) and rank 0's evaluation and checkpoint writing
    # (under a minute at the shipped configs): raise it if a large model's sample grids take longer.
    collective_timeout_minutes: float = 10.0
    # A regular expression: only the parameters whose names it matches (re.search) are trained, the others keep
    # their starting values (fine-tuning part of a model, e.g. "^(ln_f|image_head)" for the transformer's output
    # layer); "": every parameter the task trains.
    trainable: str = ""
    # Runtime knobs: speed and memory, not the result (each model takes those that apply to it).
    attn_backend: str = "auto"  # transformer: "sdpa" (dense masks), "flex" (block-sparse; CUDA) or "auto"
    gradient_checkpointing: bool = False  # transformer: recompute activations in backward (less memory)
    channels_last: bool = False  # convolutional models (the dVAE): faster convolutions on CPUs under bf16

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "save_every", "max_nonfinite"):
            _check(key, getattr(self, key), "an integer >= 1", lambda v: isinstance(v, int) and v >= 1)
        for key in ("warmup_steps", "num_workers", "seed", "keep_checkpoints", "early_stop_evals"):
            _check(key, getattr(self, key), "an integer >= 0", lambda v: isinstance(v, int) and v >= 0)
        # AdamW moves each weight by about lr per step, so an lr above 1 only ever diverges.
        _check("lr", self.lr, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _check("min_lr", self.min_lr, f"a number in [0, train.lr = {self.lr}]", lambda v: 0 <= v <= self.lr)
        _check("betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]",
               lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v))
        _check("eps", self.eps, "a number in (0, 1], e.g. 1e-8", lambda v: 0 < v <= 1)
        _check("weight_decay", self.weight_decay, "a number in [0, 1/train.lr)", lambda v: 0 <= v * self.lr < 1)
        _check("grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)", lambda v: v >= 0)
        _check("ema_decay", self.ema_decay, "a number in [0, 1) (0 disables the EMA)", lambda v: 0 <= v < 1)
        choices = {"lr_schedule": ("cosine", "constant"), "precision": ("fp32", "bf16", "fp16"),
                   "attn_backend": ("auto", "sdpa", "flex")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"train.{key} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, key)!r}")
        _check("time_limit_minutes", self.time_limit_minutes, "a number of minutes >= 0 (0: no limit)",
               lambda v: _number(v) and 0 <= v < float("inf"))
        try:
            re.compile(self.trainable)
        except (re.error, TypeError) as e:
            raise ValueError(f"train.trainable must be a regular expression over parameter names, got "
                             f"{self.trainable!r} ({e})") from None
        if not 0 < self.collective_timeout_minutes < float("inf"):
            raise ValueError(f"train.collective_timeout_minutes must be a positive number of minutes, got "
                             f"{self.collective_timeout_minutes}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(key: str, value: Any, allowed: str, ok: Any) -> None:
    """Raise a one-line error naming train.<key> and its allowed range unless `ok(value)`."""
    numeric = _number(value) or isinstance(value, (tuple, list))
    if not numeric or not ok(value):
        raise ValueError(f"train.{key} must be {allowed}, got {value!r}")
