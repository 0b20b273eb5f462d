"""Train the stage-1 discrete VAE (paper sec. 2.1) with the shared engine.

    python tools/train_dvae.py --config configs/dvae/shapes.yaml --out runs/dvae-shapes

Config sections: model (DVAEConfig), objective (DVAEObjective: temperature and KL schedules), train
(TrainConfig: optimizer, precision, steps) and data (DataConfig). Re-running the same command after a
crash continues from the last checkpoint.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle.cli import apply_threads, load_sections, record, resolve_device, setup_logging, training_parser
from dalle.data.sources import DataConfig, build_dataset
from dalle.engine import TrainConfig, Trainer
from dvae.model import DiscreteVAE, DVAEConfig
from dvae.task import DVAEObjective, DVAETask

SECTIONS = {"model": DVAEConfig, "objective": DVAEObjective, "train": TrainConfig, "data": DataConfig}


def main(argv: list[str] | None = None) -> int:
    parser = training_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    apply_threads(args.threads)
    cfg = load_sections(args, SECTIONS)
    model_cfg: DVAEConfig = cfg["model"]
    train = build_dataset(cfg["data"], "train", model_cfg.image_size, "dvae")
    val = build_dataset(cfg["data"], "val", model_cfg.image_size, "eval")
    task = DVAETask(DiscreteVAE(model_cfg), cfg["objective"], train, val)
    trainer = Trainer(task, cfg["train"], args.out, device=resolve_device(args.device), resume=args.resume,
                      record=record(cfg, args), progress=not args.no_progress)
    n_params = sum(p.numel() for p in task.model.parameters())
    logging.getLogger("dalle").info("dVAE: %.2fM parameters, %dx%d grid of %d codes, run dir %s",
                                    n_params / 1e6, model_cfg.grid_size, model_cfg.grid_size,
                                    model_cfg.vocab_size, args.out)
    metrics = trainer.fit()
    print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    print(f"model directory: {trainer.checkpoints / (trainer.checkpoints / 'latest').read_text().strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
