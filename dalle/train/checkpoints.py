"""Training checkpoints: model directories with the state to resume, kept atomically and pruned.

    run/checkpoints/step-N/config.json, model.safetensors   a model directory (the EMA weights, if any)
    run/checkpoints/step-N/train/                           live weights, optimizer state, step, counters
    run/checkpoints/latest                                  the newest complete checkpoint's name

A checkpoint is written into a temporary directory and renamed into place, then `latest` is replaced
atomically, so a crash mid-save leaves the previous checkpoint intact and `latest` pointing at it. The
optimizer state is safetensors + JSON too (checkpoints of before 2026-12-05 hold a torch.save, read with
`torch.load(weights_only=True)`). A DeepSpeed checkpoint has, instead of
model.safetensors, a `deepspeed/` folder with every rank's ZeRO shard; `export` consolidates it into a
model directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dalle.checkpoint import (
    CONFIG_NAME,
    DEEPSPEED_DIR,
    EXPORT_HINT,
    WEIGHTS_NAME,
    atomic_dir,
    build_model,
    is_zero_checkpoint,
    load_pretrained,
    load_state,
    load_tensor_file,
    load_weights,
    model_dir_contents,
    read_config,
    resolve_model_dir,
    save_pretrained,
    save_weights,
    unique_state,
    write_json,
    write_model_config,
)
from dalle.train.best import BEST, pointed

# The engine reaches the model-directory helpers it builds on through this module too.
__all__ = ["CONFIG_NAME", "DEEPSPEED_DIR", "EXPORT_HINT", "WEIGHTS_NAME", "atomic_dir", "build_model", "export",
           "is_zero_checkpoint", "latest_checkpoint", "load_optimizer", "load_pretrained", "load_state",
           "load_weights", "model_dir_contents", "prune", "read_config", "resolve_model_dir", "save_optimizer",
           "save_pretrained", "save_weights", "set_latest", "unique_state", "write_json", "write_model_config"]


def export(checkpoint: str | Path, out: str | Path, *, live: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Turn a training checkpoint (a run directory's latest, or step-N) into a model directory at `out`.

    Exports the EMA weights when the run kept an EMA (what a plain checkpoint's model.safetensors holds),
    else, or with `live`, the trained weights. For a DeepSpeed checkpoint of any ZeRO stage the trained
    weights are the fp32 master weights gathered from every rank's shard, on the CPU, without a launcher.
    Files beside the weights (tokenizer.json, dvae.json) are copied along."""
    src = resolve_model_dir(checkpoint)
    model = build_model(src)
    train = src / "train"
    if not is_zero_checkpoint(src):
        chosen = train / "live.safetensors" if live and (train / "live.safetensors").is_file() else src / WEIGHTS_NAME
        load_weights(model, chosen)
    elif not live and (train / "ema.safetensors").is_file():
        load_weights(model, train / "ema.safetensors")
    else:
        from dalle.train.deepspeed_files import fp32_state_dict

        state = fp32_state_dict(src, DEEPSPEED_DIR)
        load_state(model, state, f"the ZeRO shards in {src / DEEPSPEED_DIR}")
    extras = [p for p in src.iterdir()  # tokenizer.json, dvae.json; not DeepSpeed's recovery script
              if p.is_file() and p.name not in (CONFIG_NAME, WEIGHTS_NAME) and p.suffix != ".py"]

    def fill(tmp: Path) -> None:
        model_dir_contents(model, tmp, dtype=dtype)
        for p in extras:
            shutil.copy2(p, tmp / p.name)
    return atomic_dir(Path(out), fill)



def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `run_dir/checkpoints/latest` points to, or None when there is none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    if not (target / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{pointer} points to {target}, which is not a complete checkpoint")
    return target


def set_latest(checkpoints: Path, name: str) -> None:
    tmp = checkpoints / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, checkpoints / "latest")


def prune(checkpoints: Path, keep: int) -> None:
    """Remove all but the newest `keep` step directories, and stale temporaries of dead saves."""
    steps = sorted(p for p in checkpoints.glob("step-*") if p.is_dir())
    best = pointed(checkpoints / BEST)  # the best by the held-out metric is kept on top of the newest
    steps = [p for p in steps if p != best]
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoints.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


OPTIMIZER_TENSORS, OPTIMIZER_META = "optimizer.safetensors", "optimizer.json"
LEGACY_OPTIMIZER = "optimizer.pt"  # what checkpoints held before 2026-12-05 (a torch.save)


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The optimizer's state_dict as `directory`/optimizer.safetensors (every tensor) + optimizer.json (the
    rest, with each tensor's place), so that resuming unpickles nothing."""
    tensors: dict[str, torch.Tensor] = {}

    def split(prefix: str, values: dict) -> dict:
        out = {}
        for k, v in values.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()  # channels_last moments: stored packed
                out[k] = {"tensor": f"{prefix}.{k}"}
            else:
                out[k] = v
        return out

    sd = optimizer.state_dict()
    meta = {"state": {str(i): split(f"state.{i}", v) for i, v in sd["state"].items()},
            "param_groups": [split(f"group.{i}", g) for i, g in enumerate(sd["param_groups"])]}
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    write_json(directory / OPTIMIZER_META, meta)


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Restore what `save_optimizer` wrote into `directory`; ValueError naming the file when it is broken."""
    tensors_path, meta_path = directory / OPTIMIZER_TENSORS, directory / OPTIMIZER_META
    if not tensors_path.is_file() and (directory / LEGACY_OPTIMIZER).is_file():
        # A checkpoint written before the safetensors format: weights_only, so only tensors and plain
        # containers load and anything else is refused in one line naming the file.
        optimizer.load_state_dict(load_tensor_file(directory / LEGACY_OPTIMIZER))
        return
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensors_path))

        def join(values: dict) -> dict:
            return {k: tensors[v["tensor"]] if isinstance(v, dict) and set(v) == {"tensor"} else v
                    for k, v in values.items()}

        sd = {"state": {int(i): join(v) for i, v in meta["state"].items()},
              "param_groups": [join(g) for g in meta["param_groups"]]}
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename}: missing from the checkpoint; resume from an earlier one") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise ValueError(f"{directory}: unreadable optimizer state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else e!r}); resume from an earlier checkpoint") from None
    optimizer.load_state_dict(sd)
    for param, state in optimizer.state.items():  # a moment of a channels_last weight gets its layout back
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == param.shape and v.stride() != param.stride():
                state[k] = torch.empty_like(param, dtype=v.dtype).copy_(v)


# A torch.save that runs out of space fails inside its zip writer with a message that never mentions space
# ("[enforce fail at inline_container.cc:672] . unexpected pos 41024 vs 40916"); it counts as a full disk
# when less than this is left (or less than the newest checkpoint's size, whichever is more).
LOW_SPACE = 16 * 2**20


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(directory: Path | None) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory is not None else 0


def disk_problem(error: BaseException, run_dir: str | Path) -> str | None:
    """One line for a write that failed because the disk of `run_dir` is full or read-only (None for any
    other failure): which path, which checkpoint survived, and how to go on."""
    run_dir = Path(run_dir)
    path = Path(getattr(error, "filename", None) or run_dir / "checkpoints")
    code = getattr(error, "errno", None)
    try:
        kept = latest_checkpoint(run_dir)
    except (OSError, ValueError):
        kept = None
    if code == errno.EROFS:
        if kept is None:
            return (f"cannot write {path}: the file system is read-only and nothing was written. Pass a writable "
                    "--out, or remount it writable and re-run the same command")
        return (f"cannot write {path}: the file system is read-only; the last checkpoint {kept} is intact. Remount "
                f"it writable and re-run the same command, or continue elsewhere with --out NEW --resume {kept}")
    free = shutil.disk_usage(_existing(path)).free
    writer_failed = isinstance(error, RuntimeError) and ("inline_container" in str(error) or "write" in str(error))
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error) or (
        writer_failed and free < max(LOW_SPACE, _size(kept)))
    if not full:
        return None
    resume = (f"the last good checkpoint {kept} is intact: free space and re-run the same command to resume "
              "from it") if kept else "no checkpoint had been written yet: free space and re-run the same command"
    left = f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free // 1024} KiB"
    return f"the disk is full ({left} free) while writing under {path}; {resume}"
