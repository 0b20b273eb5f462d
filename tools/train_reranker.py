"""Train the CLIP-style reranker (paper sec. 2.5) with the shared engine.

    python tools/train_reranker.py --config configs/reranker/shapes.yaml --out runs/reranker-shapes

Config sections: model (RerankerConfig), objective (RerankerObjective: BPE dropout, held-out retrieval figures),
train (TrainConfig: AdamW, schedule, precision), data (DataConfig: raw images and captions from shapes,
a folder or webdataset shards) and inputs (RerankerInputs: the tokenizer, best the transformer's own).
Re-running the same command after a crash continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.data.sources import DataConfig, build_dataset
from dalle.reranker.model import Reranker, RerankerConfig
from dalle.tokenizer import TextTokenizer
from dalle.train.cli import run_training, start, training_parser
from dalle.train.config import TrainConfig
from dalle.train.tasks.reranker import RerankerInputs, RerankerObjective, RerankerTask

SECTIONS = {"model": RerankerConfig, "objective": RerankerObjective, "train": TrainConfig, "data": DataConfig,
            "inputs": RerankerInputs}


def main(argv: list[str] | None = None) -> int:
    args, cfg = start(training_parser(__doc__.split("\n\n")[0]), SECTIONS, argv)
    inputs: RerankerInputs = cfg["inputs"]
    if not inputs.tokenizer:
        raise SystemExit("inputs.tokenizer is not set: train one with tools/train_bpe.py and point to it")
    if cfg["data"].source == "tokens":
        raise SystemExit("data.source 'tokens' holds dVAE codes, not pixels: the reranker trains on raw images "
                         "(shapes, folder or webdataset)")
    cli.require_input("inputs.tokenizer", inputs.tokenizer, "train_bpe.py")
    tokenizer = TextTokenizer.from_file(inputs.tokenizer)
    if cfg["model"].text_vocab_size == 0:  # "take it from the tokenizer"
        cfg["model"] = dataclasses.replace(cfg["model"], text_vocab_size=tokenizer.vocab_size)
    m: RerankerConfig = cfg["model"]
    train = build_dataset(cfg["data"], "train", m.image_size, "dalle")  # the transformer's crops (Listing 2)
    val = build_dataset(cfg["data"], "val", m.image_size, "eval")
    task = RerankerTask(Reranker(m), cfg["objective"], tokenizer, train, val)
    return run_training(task, cfg, args, f"Reranker: {m.layers} layers x 2 towers of width {m.width}, "
                                         f"{m.image_size}x{m.image_size} images in a {m.grid}x{m.grid} grid")


if __name__ == "__main__":
    cli.run(main)
