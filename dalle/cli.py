"""What the command-line tools share: the common training flags, config loading and logging setup.

Every training tool reads a YAML config (one section per dataclass), applies `--set section.key=value`
overrides, records the resolved config in the run directory and hands a Task to the engine.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

from dalle.config import apply_overrides, from_dict, load_yaml, to_dict


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def training_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True,
                   help="YAML config with one section per dataclass (model, train, data, ...)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs, eval grids")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from OUT's latest checkpoint if any; never: refuse a run "
                        "directory that has checkpoints; or a checkpoint directory to start from")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default, one per core)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def load_sections(args: argparse.Namespace, schema: dict[str, type]) -> dict[str, Any]:
    """Parse the config file into one dataclass per section of `schema`; unknown sections are errors."""
    data = apply_overrides(load_yaml(args.config), args.overrides)
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise SystemExit(f"{args.config}: unknown section(s) {unknown}; expected {sorted(schema)}")
    try:
        return {name: from_dict(cls, data.get(name), where=f"{args.config} [{name}]")
                for name, cls in schema.items()}
    except (TypeError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from None


def record(sections: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {"config_file": os.path.abspath(args.config), "overrides": args.overrides,
            **{name: to_dict(value) for name, value in sections.items()}}


def apply_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def run_training(task: Any, sections: dict[str, Any], args: argparse.Namespace, describe: str) -> int:
    """The common end of every training tool: build the engine, say what is trained, train, report."""
    from dalle.engine import Trainer

    trainer = Trainer(task, sections["train"], args.out, device=resolve_device(args.device), resume=args.resume,
                      record=record(sections, args), progress=not args.no_progress)
    n = sum(p.numel() for p in task.model.parameters())
    logging.getLogger("dalle").info("%s; %.2fM parameters, run dir %s", describe, n / 1e6, args.out)
    metrics = trainer.fit()
    print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    print(f"model directory: {trainer.checkpoints / (trainer.checkpoints / 'latest').read_text().strip()}")
    return 0
