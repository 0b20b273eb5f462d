"""The training engine shared by every stage: dVAE, transformer and reranker.

A stage supplies a `Task` (its model, data and loss); the engine owns everything else: the optimizer
and learning-rate schedule, mixed precision, gradient clipping, the EMA, skipping non-finite steps,
evaluation, logging, and checkpoints that resume exactly.

Exact resume rests on one rule: every random choice of step k is a function of (seed, k). The global
torch RNG is re-seeded at each step, the data order is a seeded permutation per epoch, and each sample
gets its own seed, so a resumed run needs only the step, the weights, the EMA and the optimizer state.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from dalle import checkpoint as ckpt

log = logging.getLogger("dalle.engine")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
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
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


class Task(Protocol):
    """What a stage gives the engine. `model` is trained; the rest are pure functions of their inputs."""

    model: nn.Module

    def train_dataset(self) -> Dataset: ...

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]: ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...


def matrix_decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups with weight decay on matrices only: biases, gains and learned tokens are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def mix_seed(*parts: int) -> int:
    """Combine integers into a 63-bit seed (splitmix64 rounds); stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler):
    """Endless stream of (index, sample_seed): a fresh seeded permutation per epoch, started at any
    position, so the batches after a resume are the ones an uninterrupted run would have seen."""

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            for i in torch.randperm(self.size, generator=g)[offset:].tolist():
                yield i, mix_seed(self.seed, epoch, i)
            epoch, offset = epoch + 1, 0


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of a model's floating-point state (weights and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        live = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ema, live, 1 - self.decay)


class EvalSink:
    """Where a task's evaluation writes images: PNG files under the run directory and TensorBoard."""

    def __init__(self, directory: Path, writer: Any | None) -> None:
        self.directory, self.writer = directory, writer

    def image(self, name: str, step: int, grid: Tensor) -> Path:  # (3, H, W) in [0, 1]
        from torchvision.utils import save_image

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}-{step:07d}.png"
        save_image(grid.float().clamp(0, 1), path)
        if self.writer is not None:
            self.writer.add_image(name, grid.float().clamp(0, 1), step)
        return path


class NonFiniteLossError(RuntimeError):
    pass


def _endless(loader: DataLoader) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        if hasattr(loader.dataset, "set_epoch"):  # new shard order and augmentations each epoch
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


class _Seeded(Dataset):
    """Hands each sample its seed when the dataset takes `(index, seed)` keys (`accepts_seed`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.accepts_seed = getattr(dataset, "accepts_seed", False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key] if self.accepts_seed else self.dataset[key[0]]


class Trainer:
    """Runs a `Task` for `cfg.steps` optimizer steps in `run_dir`, resuming from its last checkpoint.

    run_dir/run.json            everything needed to repeat the run (configs of all sections)
    run_dir/log.jsonl           one JSON object per log and eval event; run_dir/tb/ for TensorBoard
    run_dir/eval/               image grids written by the task's evaluation
    run_dir/checkpoints/step-N  model directories with a train/ folder; `latest` names the newest
    """

    def __init__(self, task: Task, cfg: TrainConfig, run_dir: str | Path, *, device: str = "cpu",
                 resume: str = "auto", record: dict[str, Any] | None = None, progress: bool = True) -> None:
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.device = torch.device(device)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on the CPU")
        self.model = task.model.to(self.device)
        self.optimizer = torch.optim.AdamW(task.param_groups(self.model), lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.step = 0
        self.counters = {"skipped_samples": 0, "nonfinite_steps": 0, "overflow_steps": 0}
        self._nonfinite_run = 0  # consecutive skipped steps
        self.progress = progress
        self.checkpoints = self.run_dir / "checkpoints"
        self._resume(resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if record is not None:
            ckpt.write_json(self.run_dir / "run.json", record)
        self.writer = self._tensorboard()
        self.sink = EvalSink(self.run_dir / "eval", self.writer)

    # -- setup -------------------------------------------------------------------------------
    def _tensorboard(self) -> Any | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a stripped install still trains
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    def _resume(self, resume: str) -> None:
        if resume == "never":
            if ckpt.latest_checkpoint(self.run_dir) is not None:
                raise FileExistsError(f"{self.run_dir} already holds checkpoints; pass --resume auto to "
                                      "continue that run, or choose another --out")
            return
        path = ckpt.latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if path is not None:
            self.load(path)

    def load(self, path: Path) -> None:
        _, saved = ckpt.read_config(path)
        current = self.model.config.to_dict()
        if saved != current:
            diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k)}
            raise ValueError(f"cannot resume from {path}: its model config differs in {diff} "
                             "(saved, current); use another --out for a new model")
        train = path / "train"
        live = train / "live.safetensors"
        ckpt.load_weights(self.model, live if live.is_file() else path / ckpt.WEIGHTS_NAME)
        if self.ema is not None:
            ckpt.load_weights(self.ema.model, path / ckpt.WEIGHTS_NAME)
        ckpt.load_optimizer(self.optimizer, train / "optimizer.pt")
        state = json.loads((train / "state.json").read_text())
        self.step = state["step"]
        self.counters.update(state.get("counters", {}))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        name = f"step-{self.step:07d}"

        def fill(tmp: Path) -> None:
            ckpt.model_dir_contents(self.eval_model, tmp)
            (tmp / "train").mkdir()
            if self.ema is not None:
                ckpt.save_weights(ckpt.unique_state(self.model), tmp / "train" / "live.safetensors")
            ckpt.save_optimizer(self.optimizer, tmp / "train" / "optimizer.pt")
            ckpt.write_json(tmp / "train" / "state.json", {
                "step": self.step, "counters": self.counters,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            })
            extra = getattr(self.task, "save_extra", None)
            if extra is not None:
                extra(tmp)

        path = ckpt.atomic_dir(self.checkpoints / name, fill)
        ckpt.set_latest(self.checkpoints, name)
        ckpt.prune(self.checkpoints, self.cfg.keep_checkpoints)
        return path

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def _loader(self) -> Iterator[dict[str, Any]]:
        from dalle.data.readers import collate_skip_bad

        cfg, ds = self.cfg, self.task.train_dataset()
        common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_skip_bad,
                      persistent_workers=cfg.num_workers > 0)
        if isinstance(ds, IterableDataset):
            # Streams cannot seek: replaying the consumed batches keeps a resumed run on the same data.
            it = _endless(DataLoader(ds, **{**common, "persistent_workers": False}))
            for _ in range(self.step):
                next(it)
            return it
        sampler = ResumableSampler(len(ds), cfg.seed, start=self.step * cfg.batch_size)
        return iter(DataLoader(_Seeded(ds), sampler=sampler, **common))

    # -- the loop ----------------------------------------------------------------------------
    def _autocast(self) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in batch.items()}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """One optimizer step; returns its metrics, or None when the step was skipped."""
        cfg = self.cfg
        torch.manual_seed(mix_seed(cfg.seed, self.step, 1))  # dropout and any task noise
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step) * group.get("lr_scale", 1.0)
        with self._autocast():
            loss, metrics = self.task.loss(self.model, self._to_device(batch), self.step)
        if not torch.isfinite(loss):
            return self._skip(f"loss is {loss.item()}")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when grads overflowed
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.counters["overflow_steps"] += 1
                self.optimizer.zero_grad(set_to_none=True)
                return None
        elif not torch.isfinite(grad_norm):
            return self._skip(f"gradient norm is {grad_norm.item()}")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self._nonfinite_run = 0
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), **metrics}

    def _skip(self, why: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["nonfinite_steps"] += 1
        self._nonfinite_run += 1
        log.warning("step %d skipped: %s (%d in a row)", self.step, why, self._nonfinite_run)
        if self._nonfinite_run >= self.cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_run} non-finite steps in a row at step {self.step}; stopped without "
                f"saving. The last good checkpoint is {ckpt.latest_checkpoint(self.run_dir)}. Lower "
                "train.lr, check the data, or switch precision to fp32")
        return None

    def evaluate(self) -> dict[str, float]:
        model = self.eval_model
        was_training = model.training
        model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(model, self.step, self.sink)
        model.train(was_training)
        self._log({"event": "eval", **metrics})
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        record = {"step": self.step, **record}
        with (self.run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "eval/" if record.get("event") == "eval" else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(prefix + k, v, self.step)

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to `cfg.steps` (or stop early at `stop_at`, as a crash would); returns the last eval."""
        from tqdm.auto import tqdm

        cfg, end = self.cfg, min(self.cfg.steps, stop_at or self.cfg.steps)
        self.model.train()
        batches = self._loader()
        window: dict[str, list[float]] = {}
        samples, t0 = 0, time.perf_counter()
        eval_metrics: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True)
        while self.step < end:
            batch = next(batches)
            self.counters["skipped_samples"] += int(batch.pop("skipped", 0))
            if not any(isinstance(v, Tensor) and v.shape[0] for v in batch.values()):
                continue  # every sample of this batch was unreadable
            metrics = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if metrics is not None:
                samples += next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if self.step % cfg.log_every == 0 or self.step == end:
                dt = time.perf_counter() - t0
                means = {k: sum(v) / len(v) for k, v in window.items()}
                self._log({"event": "train", "lr": lr_at(cfg, self.step - 1), "samples_per_s": samples / dt,
                           **means, **self.counters})
                window, samples, t0 = {}, 0, time.perf_counter()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                eval_metrics = self.evaluate()
                bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
            if self.step % cfg.save_every == 0 or self.step == end:
                self.save()
        bar.close()
        if self.counters["skipped_samples"]:
            log.warning("%d unreadable samples were skipped in this run", self.counters["skipped_samples"])
        if self.writer is not None:
            self.writer.flush()
        return eval_metrics
