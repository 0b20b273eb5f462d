"""Train the stage-1 discrete VAE (paper sec. 2.1) with the shared engine.

    python tools/train_dvae.py --config configs/dvae/shapes.yaml --out runs/dvae-shapes

Config sections: model (DVAEConfig), objective (DVAEObjective: temperature and KL schedules), train
(TrainConfig: optimizer, precision, steps) and data (DataConfig). Re-running the same command after a
crash continues from the last checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.data.sources import DataConfig, build_dataset
from dalle.train.cli import run_training, start, training_parser
from dalle.train.config import TrainConfig
from dalle.train.tasks.dvae import DVAEObjective, DVAETask
from dvae.model import DiscreteVAE, DVAEConfig

SECTIONS = {"model": DVAEConfig, "objective": DVAEObjective, "train": TrainConfig, "data": DataConfig}


def main(argv: list[str] | None = None) -> int:
    args, cfg = start(training_parser(__doc__.split("\n\n")[0]), SECTIONS, argv)
    model_cfg: DVAEConfig = cfg["model"]
    train = build_dataset(cfg["data"], "train", model_cfg.image_size, "dvae")
    val = build_dataset(cfg["data"], "val", model_cfg.image_size, "eval")
    task = DVAETask(DiscreteVAE(model_cfg), cfg["objective"], train, val)
    return run_training(task, cfg, args, f"dVAE: {model_cfg.grid_size}x{model_cfg.grid_size} grid of "
                                         f"{model_cfg.vocab_size} codes")


if __name__ == "__main__":
    cli.run(main)
