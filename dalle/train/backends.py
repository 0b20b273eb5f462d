"""Where the training engine meets the hardware: one process, DDP under torchrun, or DeepSpeed ZeRO.

The engine (`dalle.train.engine`) owns the loop, the schedule, logging and the checkpoint layout. A back end
owns only what differs between runtimes: starting the process group, wrapping the model, backward with
gradient accumulation, the optimizer step with clipping and overflow detection, and where the weights
and optimizer state of a checkpoint go.

    PlainBackend      one process, or DistributedDataParallel when WORLD_SIZE > 1 (torchrun, or any
                      launcher that sets RANK/WORLD_SIZE/MASTER_ADDR); never imports DeepSpeed
    DeepSpeedBackend  `deepspeed.initialize` with a JSON from configs/deepspeed/ (ZeRO stage, precision,
                      buckets). Batch sizes, accumulation and clipping are filled in from TrainConfig; the
                      optimizer (AdamW over the task's groups) and the LR schedule are the engine's, so a
                      JSON that sets them is an error rather than a second source of truth.

Both build the same AdamW from TrainConfig, and the engine sets each step's learning rate on
`backend.optimizer.param_groups`, which DeepSpeed's ZeRO optimizers expose unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import itertools
import json
import logging
import math
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: its functions take `group=group.WORLD` as a
# default evaluated at import, and a world group held that way (DeepSpeed imports the module after
# initialising) outlives destroy_process_group into interpreter shutdown, where tearing down its gloo
# threads can abort a finished run ("terminate called without an active exception").
import torch.distributed.nn.functional  # noqa: F401
from torch import Tensor, nn

from dalle.train import checkpoints as ckpt
from dalle.train.config import TrainConfig

log = logging.getLogger("dalle.train.backends")

# How long collectives wait: train.collective_timeout_minutes (see TrainConfig for the default's reason).
TIMEOUT = timedelta(minutes=TrainConfig.collective_timeout_minutes)
DEEPSPEED_TAG = ckpt.DEEPSPEED_DIR  # DeepSpeed's "tag": the sub-directory its shards go to


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and the deepspeed launcher set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def adamw(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


class _Wrapped:
    """What a task's loss is handed: calls run through the wrapper (DDP's gradient hooks, ZeRO-3's
    parameter gathering), every attribute (config, parameters(), methods) is the model's own."""

    def __init__(self, wrapper: Any, module: nn.Module) -> None:
        self._wrapper, self._module = wrapper, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class Backend:
    """What the two back ends share: rank bookkeeping and the few collectives the engine needs."""

    sharded = False  # True when no single rank holds the whole training state (checkpoint = shards)
    stage = 0  # ZeRO stage (0: every rank holds full weights, gradients and optimizer state)

    def __init__(self, device: torch.device, timeout: timedelta = TIMEOUT) -> None:
        self.device, self.timeout = device, timeout
        self.rank, self.world, self.local_rank = launcher_env()
        self.module: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.forward_model: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _start_group(self) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=self.timeout)

    def broadcast_weights(self, model: nn.Module) -> None:
        """Start every rank from rank 0's weights (tools build models with unseeded initialisation)."""
        if self.world > 1:
            with torch.no_grad():
                for t in model.state_dict().values():
                    buf = t.contiguous()  # gloo wants dense tensors; channels_last weights are not
                    dist.broadcast(buf, 0)
                    if buf.data_ptr() != t.data_ptr():
                        t.copy_(buf)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over ranks of a small float64 vector."""
        if self.world == 1:
            return values
        out = values.to(self.device)
        dist.all_reduce(out)
        return out.cpu()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any: ranks must agree to skip a step together."""
        return bool(self.sum(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)

    def weight_spread(self) -> float | None:
        """Largest difference between ranks of any parameter's sum: 0 when the replicas agree. None when
        there is nothing to compare (one rank, or ZeRO-3, where each rank holds only a shard)."""
        if self.world == 1 or self.stage == 3:
            return None
        sums = torch.stack([p.detach().double().sum() for p in self.module.parameters()]).to(self.device)
        gathered = [torch.empty_like(sums) for _ in range(self.world)]
        dist.all_gather(gathered, sums)
        return max((g - gathered[0]).abs().max().item() for g in gathered)

    def evaluation_model(self) -> nn.Module | None:
        """The model rank 0 evaluates (a collective call under ZeRO-3); None on the other ranks."""
        return self.module if self.is_main else None

    def loss_scale(self) -> float | None:
        return None

    def close(self) -> None:
        if dist.is_initialized():
            self.barrier()  # no rank tears its group down while a peer is still inside a collective
            dist.destroy_process_group()
        # A group object that outlives the interpreter's shutdown takes its gloo worker threads down with
        # it, and the process aborts ("terminate called without an active exception") after a good run.
        gc.collect()


class PlainBackend(Backend):
    """Plain PyTorch: one process, or DDP over WORLD_SIZE processes, with torch's GradScaler for fp16."""

    def __init__(self, device: torch.device, timeout: timedelta = TIMEOUT) -> None:
        super().__init__(device, timeout)
        self._start_group()
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.name = f"DDP over {self.world} processes" if self.world > 1 else "single process"

    def wrap(self, model: nn.Module, param_groups: list[dict[str, Any]], cfg: TrainConfig) -> None:
        self.module, self.cfg = model, cfg
        self.optimizer = adamw(param_groups, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.forward_model = _Wrapped(self.ddp, model) if self.ddp is not None else model

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP all-reduces once per step, on the last one."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def backward(self, loss: Tensor, *, last: bool) -> None:
        # Also for a non-finite loss: DDP's reducer expects the backward its forward prepared, and the
        # step is dropped in step() on every rank alike.
        loss = loss / self.cfg.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, *, bad: bool) -> tuple[str, float]:
        """Apply the accumulated gradients: ("applied" | "overflow" | "nonfinite", gradient norm)."""
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return "nonfinite", math.nan
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        outcome = "applied"
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
            outcome = "overflow" if self.scaler.get_scale() < scale else outcome
        elif not torch.isfinite(norm):
            outcome = "nonfinite"
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return outcome, norm.item()

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None

    # Rank 0 alone writes: every rank holds the same optimizer state.
    def save_state(self, directory: Path | None) -> None:
        if directory is not None:
            ckpt.save_optimizer(self.optimizer, directory / "train")

    def load_state(self, checkpoint: Path) -> None:
        ckpt.load_optimizer(self.optimizer, checkpoint / "train")

    def state(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_extra(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(path: str | Path, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill in what TrainConfig decides; a disagreement is an error."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist; see configs/deepspeed/") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{path}: remove the {key!r} section. The optimizer (AdamW) and its schedule come from "
                             "the train section of the run's config (train.lr, train.betas, train.eps, "
                             "train.weight_decay, train.warmup_steps, train.lr_schedule), so one file decides them")
    ours = {"train_micro_batch_size_per_gpu": (cfg.batch_size, "train.batch_size"),
            "gradient_accumulation_steps": (cfg.grad_accum, "train.grad_accum"),
            "train_batch_size": (cfg.batch_size * cfg.grad_accum * world,
                                 f"train.batch_size x train.grad_accum x {world} ranks"),
            "gradient_clipping": (cfg.grad_clip, "train.grad_clip")}
    for key, (value, origin) in ours.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(f"{path}: {key} is {given}, but {origin} gives {value}; set it to \"auto\" "
                             "(filled in from the train config) or change the train config")
        ds[key] = value
    _fill_precision(ds, cfg.precision, path)
    ds.setdefault("steps_per_print", 2**31 - 1)  # the engine logs; DeepSpeed's own progress lines are noise
    return ds


# DeepSpeed's dynamic loss scaling for fp16 when the JSON does not set it: start at 2^16, halve on an
# overflow (after 2 in a row), double after 1000 clean steps.
FP16_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                "min_loss_scale": 1}


def _fill_precision(ds: dict[str, Any], precision: str, path: str | Path) -> None:
    """Set the JSON's bf16 and fp16 sections from train.precision. A section whose "enabled" is "auto" or
    absent is filled in; one that says true or false must agree with train.precision."""
    for key, aliases in (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16",))):
        want = precision == key
        for name in aliases:
            given = ds.get(name, {}).get("enabled", "auto")
            if given != "auto" and bool(given) != want:
                raise ValueError(f"{path}: {name}.enabled is {str(given).lower()}, but train.precision is "
                                 f"{precision}; set it to \"auto\" (filled in from train.precision) or remove it")
        section = dict(ds.pop("bfloat16", {})) if key == "bf16" else {}
        section.update(ds.get(key, {}))
        section["enabled"] = want
        if key == "fp16" and want:
            section = {**FP16_SCALING, **section}
        ds[key] = section


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every tensor on the meta device: its structure and settings, no memory."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 1-3 in fp32, bf16 or fp16 (DeepSpeed's dynamic loss scaling)."""

    sharded = True

    def __init__(self, device: torch.device, config: str | Path, timeout: timedelta = TIMEOUT) -> None:
        if "WORLD_SIZE" not in os.environ:  # one process without a launcher: DeepSpeed would look for mpi4py
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(device, timeout)
        import deepspeed

        if device.type == "cpu":
            # The shared-memory all-reduce is a C++ op that DeepSpeed compiles on first use (about 40 s);
            # gloo does the same job for CPU runs, which are for tests and debugging.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines (config dumps) drown ours
        deepspeed.init_distributed(timeout=self.timeout, verbose=False)
        self.config_path = config

    def wrap(self, model: nn.Module, param_groups: list[dict[str, Any]], cfg: TrainConfig) -> None:
        import deepspeed

        ds = deepspeed_config(self.config_path, cfg, self.world)
        self.stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if cfg.ema_decay and self.stage == 3:
            raise ValueError("train.ema_decay needs ZeRO stage 0-2: under ZeRO-3 no rank holds the whole model to "
                             "average; set train.ema_decay=0 or use a zero2 config")
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if self.stage == 3 and scalars:  # ZeRO-3 broadcasts each parameter as bytes when it partitions it
            raise ValueError(f"DeepSpeed's ZeRO-3 cannot partition 0-dim parameters ({', '.join(scalars)}): "
                             "use a zero1 or zero2 config for this model")
        self.cfg, self.precision = cfg, cfg.precision
        with torch.no_grad():  # DeepSpeed views parameters as bytes, which channels_last conv weights refuse
            for p in model.parameters():
                if p.dim() and p.stride() != torch.empty(p.shape, device="meta").stride():
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
        self._skeleton = meta_copy(model) if self.stage == 3 else None
        from deepspeed.runtime.engine import DeepSpeedEngine

        # The replicas already start equal (broadcast_weights). DeepSpeed 0.19.8's own broadcast views each
        # parameter as bytes, which fails for 0-dim ones (CLIP's logit_scale), so it is skipped.
        broadcast, DeepSpeedEngine._broadcast_model = DeepSpeedEngine._broadcast_model, lambda engine: None
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw(param_groups, cfg),
                                                                     config=ds)
        finally:
            DeepSpeedEngine._broadcast_model = broadcast
        self.module = self.engine.module
        self.forward_model = _Wrapped(self.engine, self.module)
        self.name = f"DeepSpeed ZeRO-{self.stage} {cfg.precision} over {self.world} processes"

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed counts micro-batches and reduces at the boundary itself

    def backward(self, loss: Tensor, *, last: bool) -> None:
        # A non-finite loss goes through backward on purpose: its NaN gradients make DeepSpeed's overflow
        # check drop the whole accumulated step on every rank and clear its gradient buffers.
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # between boundaries this only counts the micro-batch

    def step(self, *, bad: bool) -> tuple[str, float]:
        self.engine.step()
        applied = self.engine.was_step_applied()
        if bad and applied:
            raise RuntimeError("DeepSpeed applied a step whose loss was non-finite, so the weights are no longer "
                               "finite: keep its overflow check on (bf16.check_grad_overflow, ZeRO stage >= 1)")
        norm = self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else float(norm)
        if applied:
            return "applied", norm
        return ("overflow" if self.precision == "fp16" and not bad else "nonfinite"), norm

    def loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        scale = getattr(self.optimizer, "loss_scale", None)  # ZeRO optimizers; the stage-0 one calls it cur_scale
        return float(scale if scale is not None else self.optimizer.cur_scale)

    # Every rank writes its own shard; rank 0 chose the directory and passes None elsewhere.
    def save_state(self, directory: Path | None) -> None:
        target = [str(directory) if directory is not None else None]
        if self.world > 1:
            dist.broadcast_object_list(target, src=0)
        self.engine.save_checkpoint(target[0], tag=DEEPSPEED_TAG, save_latest=False)

    def load_state(self, checkpoint: Path) -> None:
        from dalle.train.deepspeed_files import install, weights_only_everywhere

        install(self.engine)  # DeepSpeed's own reader unpickles whatever a shard holds
        with weights_only_everywhere():
            path, _ = self.engine.load_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {checkpoint / DEEPSPEED_TAG}")

    def state(self) -> dict[str, Any]:
        return {}  # DeepSpeed keeps its loss scaler in its own shards

    def load_extra(self, state: dict[str, Any]) -> None:
        pass

    def evaluation_model(self) -> nn.Module | None:
        if self.stage != 3:
            return super().evaluation_model()
        import deepspeed

        # ZeRO-3 hooks would fetch (and free) parameters collectively inside every forward, and sampling
        # calls methods outside forward; so rank 0 evaluates a plain copy of the gathered weights.
        full = None
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())), torch.no_grad():
            if self.is_main:
                full = copy.deepcopy(self._skeleton).to_empty(device=self.device)
                for dst, src in zip(itertools.chain(full.parameters(), full.buffers()),
                                    itertools.chain(self.module.parameters(), self.module.buffers())):
                    dst.copy_(src)
        return full

    def close(self) -> None:
        # DeepSpeed's engine and optimizer and its `groups` module hold process groups; drop them while
        # the interpreter is alive (deepspeed.comm's destroy releases the module's references).
        if dist.is_initialized():
            self.barrier()
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.destroy()
        for name in ("optimizer", "forward_model"):
            self.__dict__.pop(name, None)
        del engine
        if dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        gc.collect()


def make_backend(device: torch.device, deepspeed: str | Path | None, timeout: timedelta = TIMEOUT
                 ) -> PlainBackend | DeepSpeedBackend:
    return DeepSpeedBackend(device, deepspeed, timeout) if deepspeed else PlainBackend(device, timeout)
