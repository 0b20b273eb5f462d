"""Model directories: the one format every model is saved in and every tool loads.

    config.json          {"model_type": "dvae", "config": {...}, "format_version": 1}
    model.safetensors    the weights to use (the EMA weights when training kept an EMA)

`load_pretrained` rebuilds a model from its config.json alone, with strict key and shape checks. Nothing
is unpickled: weights are safetensors. Every write goes to a temporary directory that is renamed into
place, so a crash mid-save leaves the previous directory intact. Training checkpoints (a `train/` folder
beside the weights, `latest` pointers, DeepSpeed shards) are `dalle.train.checkpoints`' business; this
module only follows a run directory's `latest` pointer and refuses a DeepSpeed checkpoint's shards.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEEPSPEED_DIR = "deepspeed"  # in a DeepSpeed checkpoint: every rank's ZeRO shard, instead of WEIGHTS_NAME
EXPORT_HINT = "python tools/export.py {path} --out MODEL_DIR"


def _registry() -> dict[str, tuple[type, Callable[[Any], nn.Module]]]:
    # Imported here so that loading a dVAE never imports the transformer and vice versa.
    from dvae.model import DiscreteVAE, DVAEConfig

    models: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {"dvae": (DVAEConfig, DiscreteVAE)}
    from dalle.reranker.model import Reranker, RerankerConfig
    from dalle.transformer.model import DALLE, DALLEConfig

    models["dalle"] = (DALLEConfig, DALLE)
    models["reranker"] = (RerankerConfig, Reranker)
    from dalle.feedback.reward import RewardConfig, RewardModel

    models["reward"] = (RewardConfig, RewardModel)
    return models


# Names that earlier versions of the project wrote into config.json, read as today's: model types, then
# config keys per model type. A directory written before a rename still loads.
LEGACY_TYPES = {"clip": "reranker"}
LEGACY_KEYS = {"dalle": {"image_grid": "image_grid_size"}}


def model_type_of(model: nn.Module) -> str:
    for name, (_, cls) in _registry().items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"no checkpoint model type is registered for {type(model).__name__}")


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (the first name wins), contiguous, on the CPU."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_weights(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(path))


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load safetensors weights into `model`, naming every missing, unexpected or misshapen tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as e:  # a pickle or a truncated file posing as safetensors
        raise ValueError(f"{path} is not a readable safetensors file ({e}); replace it with the file that "
                         "save_pretrained or tools/export.py wrote") from None
    load_state(model, state, str(path), strict=strict)


def load_tensor_file(path: str | Path, *, allow: Sequence[Any] = (), map_location: Any = "cpu",
                     mmap: bool | None = None) -> Any:
    """`torch.load` of a file that must hold only tensors and plain containers (plus the `allow`ed
    classes): weights_only, so a pickled object that would run code on load is refused, in one line
    that names the file, instead of executed."""
    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is a page long and suggests allow-listing the offender; name the offender only.
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"Unsupported operand \d+", str(e))
        why = f"it refers to {found[1]}" if found and found.lastindex else found[0] if found else "not weights only"
        raise ValueError(f"{path} is not a plain tensor file ({why}); refusing to unpickle it, as that could run "
                         "code. Use a checkpoint that you or this project wrote") from None
    except (RuntimeError, EOFError) as e:  # not a torch file at all, or a truncated one
        raise ValueError(f"{path} is not a readable PyTorch tensor file ({str(e).splitlines()[0]})") from None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, strict: bool = True) -> None:
    """Copy `state` into `model` in place, with the checks of `load_weights`; `source` names it in errors."""
    expected = model.state_dict()
    tied = set(expected) - set(unique_state(model))
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if strict and (missing or unexpected or shapes):
        parts = [f"missing tensors {missing}" if missing else "",
                 f"unexpected tensors {unexpected}" if unexpected else "",
                 f"shape mismatches {shapes}" if shapes else ""]
        raise ValueError(f"{source} does not match the model ({'; '.join(p for p in parts if p)}); "
                         "was it written for another config?")
    with torch.no_grad():
        for k, v in state.items():
            if k in expected and v.shape == expected[k].shape:
                expected[k].copy_(v)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_model_config(model: nn.Module, directory: Path) -> None:
    write_json(directory / CONFIG_NAME, {
        "model_type": model_type_of(model), "config": model.config.to_dict(), "format_version": FORMAT_VERSION,
    })


def model_dir_contents(model: nn.Module, directory: Path, *, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors for `model` into an existing directory."""
    write_model_config(model, directory)
    save_weights(unique_state(model), directory / WEIGHTS_NAME, dtype)


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create `final` by filling a temporary sibling and renaming it; an old `final` is replaced."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def save_pretrained(model: nn.Module, directory: str | Path, *, dtype: torch.dtype | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write a model directory atomically. `extra(tmpdir)` may add files (a tokenizer, say)."""
    def fill(tmp: Path) -> None:
        model_dir_contents(model, tmp, dtype=dtype)
        if extra is not None:
            extra(tmp)
    return atomic_dir(Path(directory), fill)


def read_config(directory: str | Path) -> tuple[str, dict[str, Any]]:
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not directory.is_dir():
        what = "is a file, not a model directory" if directory.is_file() else "does not exist"
        raise FileNotFoundError(f"model directory {directory} {what}")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}, so it is neither a model directory "
                                "nor a run directory with checkpoints")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {data['format_version']}; this version of the "
                         f"project reads up to {FORMAT_VERSION}: upgrade the package")
    model_type = LEGACY_TYPES.get(data["model_type"], data["model_type"])
    renamed = LEGACY_KEYS.get(model_type, {})
    config = {renamed.get(k, k): v for k, v in data["config"].items()}
    if model_type == "dalle" and set(config.get("layouts", ["t2i"])) - {"t2i"}:
        # joint transformers saved before the key existed read each image token at its own cell
        config.setdefault("reading_image", "cells")
    return model_type, config


def load_pretrained(directory: str | Path, *, expect: str | None = None,
                    map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a model directory: its config.json alone decides the architecture."""
    directory = resolve_model_dir(directory)
    if is_zero_checkpoint(directory) and not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(f"{directory} is a DeepSpeed ZeRO training checkpoint: its weights are split into "
                         "per-rank shards. Consolidate them into a model directory first: "
                         + EXPORT_HINT.format(path=directory))
    model = build_model(directory, expect)
    load_weights(model, directory / WEIGHTS_NAME)
    return model.to(map_location).eval()


def build_model(directory: Path, expect: str | None = None) -> nn.Module:
    """The freshly initialised model that `directory`'s config.json describes."""
    from dalle.config import from_dict

    model_type, cfg_dict = read_config(directory)
    registry = _registry()
    if model_type not in registry:
        raise ValueError(f"{directory}: unknown model_type {model_type!r}; known: {sorted(registry)}")
    if expect is not None and model_type != expect:
        raise ValueError(f"{directory} holds a {model_type!r} model, but a {expect!r} model is needed here")
    cfg_cls, model_cls = registry[model_type]
    return model_cls(from_dict(cfg_cls, cfg_dict, where=str(directory / CONFIG_NAME)))


def is_zero_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / DEEPSPEED_DIR).is_dir()


def _pointed(pointer: Path) -> Path | None:
    """The checkpoint a `best` or `latest` pointer file names, or None where it is not such a file."""
    if not pointer.is_file() or pointer.stat().st_size > 255:
        return None
    try:
        return pointer.parent / pointer.read_text().strip()
    except UnicodeDecodeError:
        return None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory itself, or a run directory's (or its checkpoints/') best checkpoint by the held-out
    metric when training recorded one, else its latest; checkpoints/best and checkpoints/latest (files naming a
    checkpoint) lead to the one they name."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if path.name in ("best", "latest") and (target := _pointed(path)) is not None:  # the paths the log names
        return target
    for pointer in (path / "best", path / "checkpoints" / "best"):
        target = _pointed(pointer)
        if target is not None and (target / CONFIG_NAME).is_file():
            return target
    for pointer in (path / "latest", path / "checkpoints" / "latest"):
        if (target := _pointed(pointer)) is not None:
            return target
    return path


