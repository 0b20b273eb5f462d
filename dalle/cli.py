"""What every command-line program shares, training or not: the device, threads, weights dtype and
sampling flags. Training's own flags and the run's start and end live in `dalle.train.cli`.
"""

from __future__ import annotations

import argparse
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags generate.py and the evaluation tools share."""
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")


def resolve_device(name: str) -> str:
    """The device for this process: under a launcher, "auto" and "cuda" mean this rank's own GPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(name)
    return name


def default_threads() -> int:
    """CPU threads that do not oversubscribe: the cores this process may use, less the ones the 1-minute
    load average says are busy. Oversubscribed torch threads spin-wait on each other, which on a small
    shared machine slowed training tenfold, far worse than using fewer threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, cores - round(load))


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: auto, the cores not already busy by the load average)")


def apply_threads(threads: int) -> None:
    """Set torch's thread count: `threads` if positive, else default_threads()."""
    torch.set_num_threads(threads if threads > 0 else default_threads())
