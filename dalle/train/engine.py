"""The training engine shared by every stage: dVAE, transformer and reranker.

A stage supplies a `Task` (its model, data and loss); the engine owns everything else: the optimizer
and learning-rate schedule, gradient accumulation, mixed precision, gradient clipping, the EMA, skipping
non-finite steps, evaluation, logging, and checkpoints that resume exactly. What differs between one
process, DDP and DeepSpeed ZeRO lives in a back end (`dalle.train.backends`).

Exact resume rests on one rule: every random choice of step k is a function of (seed, k). The global
torch RNG is re-seeded at each step (and rank), the data order is a seeded permutation per epoch that
the ranks read strided, and each sample gets its own seed, so a resumed run needs only the step, the
data position, the weights, the EMA and the optimizer state.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dalle.data.order import ResumableSampler, Seeded, endless, mix_seed
from dalle.train import checkpoints as ckpt
from dalle.train.backends import make_backend
from dalle.train.best import BestTracker, set_best
from dalle.train.config import TrainConfig

log = logging.getLogger("dalle.train.engine")


class Task(Protocol):
    """What a stage gives the engine. `model` is trained; the rest are pure functions of their inputs.
    A task may also define `tokens_per_sample` (throughput in tokens/s), `save_extra(directory)`, and
    `data_changes_at`: steps from which `train_dataset(step)` gives other data (a curriculum); the engine starts
    a new loader there, at the same data position, exactly as a run resumed at that step would."""

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


def freeze_untrainable(model: nn.Module, pattern: str) -> None:
    """Freeze every parameter whose name `pattern` does not match (train.trainable); "" leaves all as they are."""
    if not pattern:
        return
    rx = re.compile(pattern)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(rx.search(n) for n, _ in named):
        raise ValueError(f"train.trainable {pattern!r} matches none of the trained parameters of "
                         f"{type(model).__name__} (names such as {', '.join(n for n, _ in named[:3])})")
    for n, p in named:
        if not rx.search(n):
            p.requires_grad_(False)


def apply_runtime(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Set the train config's runtime knobs on the model; a knob the model has no use for is an error
    only when it asks for something (gradient checkpointing of a model that cannot)."""
    if hasattr(model, "set_attention_backend"):
        model.set_attention_backend(cfg.attn_backend)
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.gradient_checkpointing
    elif cfg.gradient_checkpointing:
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it false")
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of a model's floating-point state (weights and buffers), kept in the
    model's own precision (fp32 also when DeepSpeed trains bf16 or fp16 working weights)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        live = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ema, [v.to(e.dtype) for e, v in zip(ema, live)], 1 - self.decay)


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


class Trainer:
    """Runs a `Task` for `cfg.steps` optimizer steps in `run_dir`, resuming from its last checkpoint.

    run_dir/run.json            everything needed to repeat the run (configs of all sections)
    run_dir/log.jsonl           one JSON object per log and eval event; run_dir/tb/ for TensorBoard
    run_dir/eval/               image grids written by the task's evaluation
    run_dir/checkpoints/step-N  model directories with a train/ folder; `latest` names the newest. Under
                                DeepSpeed, step-N/deepspeed/ holds every rank's shard instead of
                                model.safetensors: tools/export.py turns it into a model directory.
    Only rank 0 writes logs, grids and the checkpoint's shared files; every rank reads its own data.
    """

    def __init__(self, task: Task, cfg: TrainConfig, run_dir: str | Path, *, device: str = "cpu",
                 resume: str = "auto", record: dict[str, Any] | None = None, progress: bool = True,
                 deepspeed: str | Path | None = None) -> None:
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.device = torch.device(device)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on the CPU")
        self.backend = make_backend(self.device, deepspeed, timedelta(minutes=cfg.collective_timeout_minutes))
        self.is_main = self.backend.is_main
        self.model = apply_runtime(task.model, cfg).to(self.device)
        freeze_untrainable(self.model, cfg.trainable)
        self.backend.broadcast_weights(self.model)
        # Copied before the back end wraps the model: DeepSpeed casts it to bf16/fp16 and hooks it.
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.backend.wrap(self.model, task.param_groups(self.model), cfg)
        self.optimizer = self.backend.optimizer
        self.step, self.data_position = 0, 0  # data_position: samples of the shared stream consumed
        # non_utf8_captions: samples drawn whose caption had bytes that are not UTF-8 (used, read as U+FFFD)
        self.counters = {"skipped_samples": 0, "nonfinite_steps": 0, "overflow_steps": 0, "non_utf8_captions": 0}
        self._nonfinite_run, self._new_skipped = 0, 0  # consecutive skipped steps; unreadable samples not yet summed
        self._unconfirmed: Path | None = None  # the checkpoint just written, until a step from it has a finite loss
        self._new_non_utf8 = 0
        self.progress = progress and self.is_main
        self.checkpoints = self.run_dir / "checkpoints"
        self.best = BestTracker.for_task(task)
        self.last_eval_step: int | None = None  # fit's metrics are this step's: a stop may come between evaluations
        # Training seconds the resumed checkpoint holds (earlier processes' work up to it, not work lost in a crash):
        # a run's time and its time limit count across resumes.
        self.seconds_before = 0.0
        self._fit_start: float | None = None
        self._resume(resume)
        if self.step == 0:  # images a folder scan dropped (no usable caption) count once per run, not per rank
            self.counters["skipped_samples"] += getattr(task.train_dataset(), "num_skipped_at_scan", 0)
        self.writer = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if record is not None:
                ckpt.write_json(self.run_dir / "run.json", record)
            self.writer = self._tensorboard()
        self.sink = EvalSink(self.run_dir / "eval", self.writer)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.backend.world

    def describe(self) -> str:
        c = self.cfg
        text = (f"effective batch size {self.global_batch} = {c.batch_size} per rank x {c.grad_accum} accumulation x "
                f"{self.backend.world} ranks; back end: {self.backend.name}")
        if c.trainable:
            counts = [(p.numel(), p.requires_grad) for p in self.model.parameters()]
            trained, total = sum(n for n, on in counts if on), sum(n for n, _ in counts)
            text += f"; training {trained / 1e6:.3g}M of {total / 1e6:.3g}M parameters (train.trainable " \
                    f"{c.trainable!r})"
        return text

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
        if ckpt.is_zero_checkpoint(path) != self.backend.sharded:
            written, now = ("plain PyTorch", "with") if self.backend.sharded else ("DeepSpeed", "without")
            raise ValueError(f"{path} was written by the {written} back end and this run is {now} --deepspeed; "
                             "resume with the same back end, or export it (tools/export.py) and start a new run")
        train = path / "train"
        if self.backend.sharded:
            self.backend.load_state(path)  # weights and optimizer, each rank its shard
            ema_file = train / "ema.safetensors"
        else:
            live = train / "live.safetensors"
            ckpt.load_weights(self.model, live if live.is_file() else path / ckpt.WEIGHTS_NAME)
            self.backend.load_state(path)
            ema_file = path / ckpt.WEIGHTS_NAME
        if self.ema is not None:
            ckpt.load_weights(self.ema.model, ema_file)
        state = json.loads((train / "state.json").read_text())
        self.step = state["step"]
        self.data_position = state.get("data_position", self.step * self.cfg.batch_size)
        self.counters.update(state.get("counters", {}))
        self.seconds_before = float(state.get("seconds", 0.0))
        self.backend.load_extra(state)
        self.best.load(state.get("best"))
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        """Write checkpoint step-N atomically; a collective call (DeepSpeed ranks write their shards)."""
        self._sum_counters()
        final = self.checkpoints / f"step-{self.step:07d}"
        if not self.is_main:
            self.backend.save_state(None)
            self.backend.barrier()
            return final
        path = ckpt.atomic_dir(final, self._fill_checkpoint)
        ckpt.set_latest(self.checkpoints, final.name)
        if self.best.step == self.step:
            set_best(self.checkpoints, final.name)
        ckpt.prune(self.checkpoints, self.cfg.keep_checkpoints)
        best = self.best.describe()
        log.info("saved %s (latest)%s", path, f"; checkpoints/best has the {best}" if best else "")
        self.backend.barrier()
        return path

    def _save_if_good(self, *, final: bool) -> None:
        """`save`, unless the state is not good; a run that ends in such a state is an error."""
        why = self._unsaveable()
        if why is None:
            self._unconfirmed = self.save()
            return
        if final:
            raise NonFiniteLossError(f"training ended at step {self.step}, but {why}, so it was not saved. "
                                     f"{self._last_good()}. Lower train.lr, check the data, or switch precision "
                                     "to fp32")
        log.warning("not saving step %d: %s; the latest checkpoint stays %s", self.step, why,
                    ckpt.latest_checkpoint(self.run_dir))

    def _fill_checkpoint(self, tmp: Path) -> None:
        (tmp / "train").mkdir()
        self.backend.save_state(tmp)
        if self.backend.sharded:  # the weights are in the shards: config.json (and the EMA) only
            ckpt.write_model_config(self.model, tmp)
            if self.ema is not None:
                ckpt.save_weights(ckpt.unique_state(self.ema.model), tmp / "train" / "ema.safetensors")
        else:
            ckpt.model_dir_contents(self.eval_model, tmp)
            if self.ema is not None:
                ckpt.save_weights(ckpt.unique_state(self.model), tmp / "train" / "live.safetensors")
        ckpt.write_json(tmp / "train" / "state.json", {
            "step": self.step, "data_position": self.data_position, "counters": self.counters,
            "seconds": round(self.train_seconds, 1), "world_size": self.backend.world, "backend": self.backend.name,
            **self.backend.state(), "best": self.best.state(),
        })
        extra = getattr(self.task, "save_extra", None)
        if extra is not None:
            extra(tmp)

    @property
    def train_seconds(self) -> float:
        """Seconds of training in this run so far, earlier processes' included (up to the checkpoint resumed)."""
        return self.seconds_before + (0.0 if self._fit_start is None else time.perf_counter() - self._fit_start)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def _train_dataset(self) -> Dataset:
        return self.task.train_dataset(self.step) if getattr(self.task, "data_changes_at", ()) else \
            self.task.train_dataset()

    def _loader(self) -> Iterator[dict[str, Any]]:
        from dalle.data.readers import collate_skip_bad

        cfg, ds = self.cfg, self._train_dataset()
        common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_skip_bad,
                      persistent_workers=cfg.num_workers > 0)
        if isinstance(ds, IterableDataset):
            # Streams cannot seek: replaying the consumed batches keeps a resumed run on the same data.
            # Each rank (and worker) reads its own shards: see dalle.data.readers.WebDatasetReader.
            it = endless(DataLoader(ds, **{**common, "persistent_workers": False}))
            for _ in range(self.step * cfg.grad_accum):
                next(it)
            return it
        sampler = ResumableSampler(len(ds), cfg.seed, start=self.data_position, rank=self.backend.rank,
                                   world=self.backend.world)
        return iter(DataLoader(Seeded(ds), sampler=sampler, **common))

    # -- the loop ----------------------------------------------------------------------------
    def _autocast(self) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in batch.items()}

    def _next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        while True:
            batch = next(batches)
            self._new_skipped += int(batch.pop("skipped", 0))
            self._new_non_utf8 += int(batch.pop("non_utf8_captions", 0))
            if any(isinstance(v, Tensor) and v.shape[0] for v in batch.values()):
                return batch  # else every sample of this batch was unreadable

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, float] | None, int]:
        """One optimizer step over `grad_accum` micro-batches: (metrics or None when skipped, samples)."""
        cfg, backend = self.cfg, self.backend
        seed = (cfg.seed, self.step, 1) + ((backend.rank,) if backend.world > 1 else ())
        torch.manual_seed(mix_seed(*seed))  # dropout and any task noise
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step) * group.get("lr_scale", 1.0)
        bad, why, samples, sums = False, "", 0, {}
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            batch = self._next_batch(batches)
            samples += next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
            with backend.micro_batch(last):
                with self._autocast():
                    loss, metrics = self.task.loss(backend.forward_model, self._to_device(batch), self.step)
                finite = bool(torch.isfinite(loss))
                if not bad and backend.any(not finite):  # every rank must drop the same steps
                    bad, why = True, f"loss is {loss.item()}" if not finite else "loss is not finite on another rank"
                backend.backward(loss, last=last)
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        outcome, grad_norm = backend.step(bad=bad)
        if outcome == "overflow":  # fp16: the loss scaler lowered its scale and dropped the step
            self.counters["overflow_steps"] += 1
            return None, samples
        if outcome == "nonfinite":
            return self._skip(why or f"gradient norm is {grad_norm}"), samples
        if self.ema is not None:
            self.ema.update(self.model)
        self._nonfinite_run, self._unconfirmed = 0, None  # the last checkpoint's weights gave a finite loss
        return {**sums, "grad_norm": grad_norm}, samples

    def _skip(self, why: str) -> None:
        self.counters["nonfinite_steps"] += 1
        self._nonfinite_run += 1
        log.warning("step %d skipped: %s (%d in a row)", self.step, why, self._nonfinite_run)
        if self._nonfinite_run >= self.cfg.max_nonfinite:
            rejected = self._reject_unconfirmed()
            raise NonFiniteLossError(f"{self._nonfinite_run} non-finite steps in a row at step {self.step}; stopped "
                                     f"without saving.{rejected} {self._last_good()}. Lower train.lr, check the "
                                     "data, or switch precision to fp32")
        return None

    def _reject_unconfirmed(self) -> str:
        """A checkpoint whose weights were finite but gave nothing but non-finite losses afterwards (an update
        that blew the weights up without overflowing them) is not good: it leaves `latest` and is renamed
        rejected-step-N (kept for inspection, never resumed from or pruned). Returns a sentence, or ""."""
        bad = self._unconfirmed
        if bad is None or not bad.is_dir():
            return ""
        if self.is_main:
            earlier = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and p != bad)
            bad.rename(bad.with_name("rejected-" + bad.name))
            if earlier:
                ckpt.set_latest(self.checkpoints, earlier[-1].name)
            else:
                (self.checkpoints / "latest").unlink(missing_ok=True)
        self.backend.barrier()
        return f" Checkpoint {bad.name} gave only non-finite losses, so it was renamed rejected-{bad.name}."

    def _last_good(self) -> str:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            return "No good checkpoint was written before it"
        return f"The last good checkpoint is {latest}"

    def _unsaveable(self) -> str | None:
        """Why the current state must not become a checkpoint (None when it may): a checkpoint is "good"
        only if its weights are finite and the last loss computed from them was. A finite loss can still
        come with an update that left the weights non-finite, which only the next step's loss shows, so the
        weights are checked too (each rank its own, then all agree; under ZeRO-3 a rank holds no full
        parameters and DeepSpeed's overflow check stands in)."""
        if self._nonfinite_run:
            return f"the last {self._nonfinite_run} step(s) had a non-finite loss or gradient"
        local = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if self.ema is not None:
            local = local and all(bool(torch.isfinite(p).all()) for p in self.ema.model.parameters())
        return "the weights are not finite" if self.backend.any(not local) else None

    def evaluate(self) -> dict[str, float]:
        """Rank 0 evaluates (and writes grids) while the others wait; they get {}."""
        model = self.ema.model if self.ema is not None else self.backend.evaluation_model()
        metrics: dict[str, float] = {}
        if self.is_main:
            was_training = model.training
            model.eval()
            with torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(model, self.step, self.sink)
            model.train(was_training)
            self._log({"event": "eval", **metrics})
        self.backend.barrier()
        return metrics

    def _evaluate_or_save(self) -> dict[str, float]:
        """`evaluate`, but a failing evaluation first saves the training done since the last checkpoint
        (one process: saving is collective, and the other ranks of a group are not at this call)."""
        try:
            return self.evaluate()
        except Exception:
            if self.backend.world == 1 and self._unsaveable() is None:
                path = self._unconfirmed = self.save()
                log.error("evaluation at step %d failed; the training up to it is saved in %s", self.step, path)
            raise

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": self.step, **record}
        with (self.run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "eval/" if record.get("event") == "eval" else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(prefix + k, v, self.step)

    def _sum_counters(self) -> None:
        """Add every rank's newly skipped unreadable samples to the (then identical) counters; collective."""
        new = self.backend.sum(torch.tensor([self._new_skipped, self._new_non_utf8], dtype=torch.float64))
        self.counters["skipped_samples"] += int(new[0].item())
        self.counters["non_utf8_captions"] += int(new[1].item())
        self._new_skipped = self._new_non_utf8 = 0

    def _log_train(self, window: dict[str, list[float]], samples: int, seconds: float) -> None:
        """Means over the window and the ranks, throughput over all ranks; a collective call."""
        keys = sorted(window)
        local = [samples] + [sum(window[k]) / len(window[k]) for k in keys]
        total = self.backend.sum(torch.tensor(local, dtype=torch.float64)).tolist()
        self._sum_counters()
        record = {"event": "train", "lr": lr_at(self.cfg, self.step - 1), "samples_per_s": total[0] / seconds,
                  **{k: v / self.backend.world for k, v in zip(keys, total[1:])}, **self.counters}
        tokens = getattr(self.task, "tokens_per_sample", 0)
        if tokens:
            record["tokens_per_s"] = record["samples_per_s"] * tokens
        scale = self.backend.loss_scale()
        if scale is not None:
            record["loss_scale"] = scale
        self._log(record)

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to `cfg.steps` (or stop early at `stop_at`, as a crash would); returns the last eval
        (on rank 0; {} elsewhere). Every rank runs it: logging, evaluation and saving are collective."""
        from tqdm.auto import tqdm

        cfg, end = self.cfg, min(self.cfg.steps, stop_at or self.cfg.steps)
        self.model.train()
        batches = self._loader()
        window: dict[str, list[float]] = {}
        samples, t0 = 0, time.perf_counter()
        self._fit_start = t0
        eval_metrics: dict[str, float] = {}
        self._log({"event": "start", "effective_batch_size": self.global_batch, "world_size": self.backend.world,
                   "grad_accum": cfg.grad_accum, "backend": self.backend.name, "seconds_before": self.seconds_before})
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True)
        while self.step < end:
            improved = stop = False
            if self.step in getattr(self.task, "data_changes_at", ()):
                batches = self._loader()
            metrics, n = self.train_step(batches)
            self.step += 1
            self.data_position += self.global_batch
            bar.update(1)
            if metrics is not None:
                samples += n
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if self.step % cfg.log_every == 0 or self.step == end:
                self._log_train(window, samples, time.perf_counter() - t0)
                window, samples, t0 = {}, 0, time.perf_counter()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                eval_metrics, self.last_eval_step = self._evaluate_or_save(), self.step
                if self.is_main:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
                improved, stop = self._judge(eval_metrics)
            if self.step % cfg.save_every == 0 or self.step == end or improved or stop:
                self._save_if_good(final=self.step == cfg.steps or stop)
            if stop:
                if self._out_of_time():
                    log.info("stopped at step %d of %d: train.time_limit_minutes %g is spent; %s", self.step,
                             cfg.steps, cfg.time_limit_minutes, self.best.describe())
                else:
                    log.info("early stop at step %d: %d evaluations without a better %s; %s", self.step,
                             self.best.evals_since, self.best.metric, self.best.describe())
                break
        bar.close()
        self._check_ranks_agree()
        if self.counters["skipped_samples"]:
            log.warning("%d unusable samples were skipped in this run", self.counters["skipped_samples"])
        if self.counters["non_utf8_captions"]:
            log.warning("%d captions were not UTF-8 (read with U+FFFD)", self.counters["non_utf8_captions"])
        if self.writer is not None:
            self.writer.flush()
        return eval_metrics

    def _judge(self, eval_metrics: dict[str, float]) -> tuple[bool, bool]:
        """(a new best to save now, stop early); rank 0 decides, as only it evaluates, and the others follow
        (a collective call: saving is collective too)."""
        # A curriculum is judged from its last phase on: a best kept (or an early stop) before then would be a
        # model that never trained on that phase's data, such as a drawing-first transformer that never read.
        judged = self.step >= max(getattr(self.task, "data_changes_at", ()), default=0)
        improved = self.best.observe(eval_metrics, self.step) if self.is_main and judged else False
        patience = self.cfg.early_stop_evals
        stop = self.is_main and (patience > 0 and judged and self.best.evals_since >= patience or self._out_of_time())
        agreed = self.backend.sum(torch.tensor([float(improved), float(stop)], dtype=torch.float64)).tolist()
        return bool(agreed[0]), bool(agreed[1])

    def _out_of_time(self) -> bool:
        limit = self.cfg.time_limit_minutes
        return limit > 0 and self.train_seconds > 60 * limit

    def _check_ranks_agree(self) -> None:
        spread = self.backend.weight_spread()
        if spread is None:
            return
        self._log({"event": "ranks", "world_size": self.backend.world, "weight_spread": spread})
        if spread > 0:
            log.warning("the ranks' weights differ (largest difference of a parameter sum: %.3g)", spread)

    def close(self) -> None:
        """Flush the logs and leave the process group (so a launcher sees a clean exit)."""
        if self.writer is not None:
            self.writer.close()
        self.__dict__.pop("optimizer", None)  # the backend frees what it wraps only once nothing else holds it
        try:
            self.backend.close()
        except Exception as e:  # the run's checkpoints are already written; say so rather than hide it
            log.warning("leaving the process group failed (%s: %s); the checkpoints are complete", type(e).__name__, e)
