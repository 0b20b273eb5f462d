"""What the command-line tools share: the common training flags, config loading and logging setup.

Every training tool reads a YAML config (one section per dataclass), applies `--set section.key=value`
overrides, records the resolved config in the run directory and hands a Task to the engine. The same
command runs in one process, under `torchrun` (DDP) or under the `deepspeed` launcher (`--deepspeed`).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

from dalle.cli import HelpFormatter, add_debug_flag, apply_threads, non_negative_int, positive_int, resolve_device
from dalle.config import from_dict, to_dict
from dalle.train.config import apply_overrides, load_yaml


def setup_logging(level: str = "INFO") -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    if int(os.environ.get("RANK", 0)) > 0:  # one voice per run: other ranks only warn
        numeric = max(numeric, logging.WARNING)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def training_parser(description: str, resumable: bool = True) -> argparse.ArgumentParser:
    """The flags every training tool shares; `resumable=False` leaves out --resume and --stop-at (a benchmark
    that always starts afresh)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=HelpFormatter)
    p.add_argument("--config", required=True,
                   help="YAML config with one section per dataclass (model, train, data, ...)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs, eval grids")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (cuda when available; cuda:LOCAL_RANK under a launcher)")
    p.add_argument("--deepspeed", metavar="CONFIG.json", default=os.environ.get("DALLE_DEEPSPEED") or None,
                   help="train with DeepSpeed using this JSON (configs/deepspeed/: ZeRO stage, precision); batch "
                        "sizes, accumulation, clipping, optimizer and LR schedule still come from the train "
                        "section. Default: $DALLE_DEEPSPEED, else plain PyTorch (DDP under torchrun)")
    p.add_argument("--local_rank", "--local-rank", type=non_negative_int, default=None,
                   help=argparse.SUPPRESS)  # the deepspeed launcher passes it; LOCAL_RANK says the same
    if resumable:
        p.add_argument("--resume", default="auto",
                       help="auto: continue from OUT's latest checkpoint if any; never: refuse a run "
                            "directory that has checkpoints; or a checkpoint directory to start from")
        p.add_argument("--stop-at", type=positive_int, default=None, metavar="STEP",
                       help="stop after this step, with a checkpoint, as if interrupted there (the learning-rate "
                            "schedule still runs to train.steps): the same command without it continues the run; "
                            "--out NEW --resume OUT/checkpoints/step-STEP with other --set objective values "
                            "continues it in another phase (docs/training.md)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="CPU threads for torch (0: auto, the cores not already busy by the load average; >= 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much the run logs")
    add_debug_flag(p)
    return p


def start(parser: argparse.ArgumentParser, schema: dict[str, type], argv: list[str] | None
          ) -> tuple[argparse.Namespace, dict[str, Any]]:
    """What every training tool does first: parse the flags, set up logging and threads, load the config."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    apply_threads(args.threads)
    return args, load_sections(args, schema)


def load_sections(args: argparse.Namespace, schema: dict[str, type]) -> dict[str, Any]:
    """Parse the config file into one dataclass per section of `schema`; unknown sections are errors.
    Also seeds torch with train.seed, so the model the tool builds next starts from the same weights
    for the same command (on every back end and rank)."""
    data = apply_overrides(load_yaml(args.config), args.overrides)
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise SystemExit(f"{args.config}: unknown section(s) {unknown}; expected {sorted(schema)}")
    try:
        sections = {name: from_dict(cls, data.get(name), where=f"{args.config} [{name}]")
                    for name, cls in schema.items()}
    except (TypeError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from None
    if hasattr(sections.get("train"), "seed"):
        torch.manual_seed(sections["train"].seed)
    return sections


def record(sections: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {"config_file": os.path.abspath(args.config), "overrides": args.overrides,
            "deepspeed": os.path.abspath(args.deepspeed) if args.deepspeed else None,
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            **{name: to_dict(value) for name, value in sections.items()}}


def run_training(task: Any, sections: dict[str, Any], args: argparse.Namespace, describe: str) -> int:
    """The common end of every training tool: build the engine, say what is trained, train, report."""
    from dalle.train.best import best_checkpoint
    from dalle.train.checkpoints import EXPORT_HINT, latest_checkpoint
    from dalle.train.engine import NonFiniteLossError, Trainer

    n = sum(p.numel() for p in task.model.parameters())  # before ZeRO-3 splits them across ranks
    stop_at, steps = getattr(args, "stop_at", None), sections["train"].steps
    if stop_at is not None and stop_at > steps:
        raise SystemExit(f"--stop-at {stop_at} is past train.steps ({steps}): give a step in 1..{steps}, or raise "
                         "train.steps (which also stretches the learning-rate schedule)")
    try:
        trainer = Trainer(task, sections["train"], args.out, device=resolve_device(args.device),
                          resume=args.resume, record=record(sections, args), progress=not args.no_progress,
                          deepspeed=args.deepspeed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot start training: {e}") from None
    except Exception as e:
        _exit_if_disk_problem(e, args.out)
        raise
    if stop_at is not None and stop_at <= trainer.step:
        trainer.close()
        raise SystemExit(f"--stop-at {stop_at}: the run is already at step {trainer.step} ({args.out}); give a "
                         f"step in {trainer.step + 1}..{trainer.cfg.steps}, or leave the flag out to train to the end")
    if trainer.is_main:
        logging.getLogger("dalle").info("%s; %.2fM parameters, run dir %s", describe, n / 1e6, args.out)
        print(trainer.describe(), flush=True)
    try:
        metrics = trainer.fit(stop_at=stop_at)
    except NonFiniteLossError as e:
        raise SystemExit(f"training stopped: {e}") from None
    except Exception as e:
        _exit_if_disk_problem(e, args.out)
        raise
    if trainer.is_main:
        if metrics:  # none when the run stopped before its first evaluation in this process
            at = trainer.last_eval_step
            head = "final" if at == trainer.step else f"last evaluation (step {at})"
            print(f"{head}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        latest = latest_checkpoint(args.out)
        if trainer.backend.sharded:
            print(f"DeepSpeed checkpoint: {latest}; make a model directory with: {EXPORT_HINT.format(path=latest)}")
        else:
            print(f"model directory: {latest}")
        if trainer.best.describe():  # --model RUN loads this one
            print(f"best checkpoint ({trainer.best.describe()}): {best_checkpoint(args.out)}")
        if stop_at is not None and trainer.step == stop_at < trainer.cfg.steps:
            print(f"stopped at step {stop_at} of {trainer.cfg.steps} (--stop-at): the same command without "
                  "--stop-at continues the run")
    trainer.close()
    return 0


def _exit_if_disk_problem(error: Exception, out: str) -> None:
    """A full or read-only disk ends the tool with one line; the atomic saves kept the last checkpoint whole."""
    from safetensors import SafetensorError

    from dalle.train.checkpoints import disk_problem

    if isinstance(error, (OSError, RuntimeError, SafetensorError)):
        problem = disk_problem(error, out)
        if problem is not None:
            raise SystemExit(f"training stopped: {problem}") from None
