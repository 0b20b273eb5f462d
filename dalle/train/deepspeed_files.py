"""DeepSpeed's checkpoint shards, read without unpickling arbitrary objects.

DeepSpeed 0.19.8 reads its own files with `torch.load(weights_only=False)` in two places this project goes
through: the engine's checkpoint engine (resuming a `--deepspeed` run) and `zero_to_fp32` (tools/export.py).
A crafted `mp_rank_00_model_states.pt` would run its payload there. Here both read with weights_only=True,
allowing the three DeepSpeed classes its ZeRO shards hold besides tensors (found by saving real ZeRO-1/2
checkpoints in fp32 and bf16 and asking `torch.serialization.get_unsafe_globals_in_checkpoint`; ZeRO-3's
export and resume tests pass with the same list), and anything else is refused in one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dalle.checkpoint import load_tensor_file


def allowed_classes() -> list[type]:
    """The non-tensor classes of a ZeRO optimizer shard: plain data, nothing that runs code on load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_shard(path: str | Path, map_location: Any = None, mmap: bool | None = None) -> Any:
    return load_tensor_file(path, allow=allowed_classes(), map_location=map_location, mmap=mmap)


class _SafeLoads:
    """DeepSpeed's checkpoint engine with `load` replaced (the engine's pluggable reader); writes unchanged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_shard(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install(engine: Any) -> None:
    """Make `engine.load_checkpoint` read every shard with weights_only."""
    if not isinstance(engine.checkpoint_engine, _SafeLoads):
        engine.checkpoint_engine = _SafeLoads(engine.checkpoint_engine)


class _TorchWithSafeLoad:
    """What `zero_to_fp32` sees as `torch`: the real module, except that `load` is `load_shard`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, weights_only: bool | None = None, mmap: bool | None = None,
             **_: Any) -> Any:
        return load_shard(f, map_location, mmap)


@contextlib.contextmanager
def weights_only_everywhere() -> Iterator[None]:
    """Any other `torch.load` that DeepSpeed makes inside the block is forced to weights_only too
    (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD), so a reader missed above refuses rather than executes."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def fp32_state_dict(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights gathered from every rank's ZeRO shard (any stage), on the CPU."""
    from deepspeed.utils import zero_to_fp32

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        with weights_only_everywhere():
            return dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag))
    finally:
        zero_to_fp32.torch = real
