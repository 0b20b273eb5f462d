"""The best checkpoint by a held-out metric, kept beside the latest one.

A model that overfits gets worse on held-out data while training goes on, so the newest checkpoint is not
the one to use and may be the only one retention keeps. Each task names its metric (`best_metric`: a key
of its evaluation and "min" or "max"); the trainer saves a checkpoint at every evaluation that improves on
it and points `run/checkpoints/best` at it. Retention never removes that checkpoint, `--model RUN` loads it,
and `--resume auto` still continues from `latest`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEST = "best"


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `run_dir/checkpoints/best` points to, or None when there is none (or it is gone)."""
    return pointed(Path(run_dir) / "checkpoints" / BEST)


def pointed(pointer: Path) -> Path | None:
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    return target if (target / "config.json").is_file() else None


def set_best(checkpoints: Path, name: str) -> None:
    """Point `best` at checkpoint `name`, atomically like `latest`: a reader sees the old or the new name."""
    tmp = checkpoints / f"{BEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, checkpoints / BEST)


@dataclass
class BestTracker:
    """Follows one held-out metric across evaluations; its state rides in each checkpoint's state.json."""

    metric: str = ""  # "" : the task names none, so nothing is tracked
    mode: str = "min"
    value: float | None = None
    step: int = -1
    evals_since: int = 0  # evaluations since the last improvement

    @classmethod
    def for_task(cls, task: Any) -> BestTracker:
        metric, mode = getattr(task, "best_metric", ("", "min"))
        return cls(metric, mode)

    def observe(self, metrics: dict[str, float], step: int) -> bool:
        """Count an evaluation; True when it improved on the best so far (a new best to save)."""
        v = metrics.get(self.metric)
        if v is None or not math.isfinite(v):
            return False
        better = self.value is None or (v < self.value if self.mode == "min" else v > self.value)
        if better:
            self.value, self.step, self.evals_since = float(v), step, 0
        else:
            self.evals_since += 1
        return better

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step,
                "evals_since": self.evals_since}

    def load(self, state: dict[str, Any] | None) -> None:
        if state and state.get("metric") == self.metric:
            self.value, self.step, self.evals_since = state["value"], state["step"], state["evals_since"]

    def describe(self) -> str:
        if self.value is None:
            return ""
        return f"best {self.metric} {self.value:.4g} at step {self.step}"
