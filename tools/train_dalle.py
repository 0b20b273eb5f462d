"""Train the stage-2 transformer (paper sec. 2.2) with the shared engine.

    python tools/train_dalle.py --config configs/dalle/shapes.yaml --out runs/dalle-shapes

Config sections: model (DALLEConfig), objective (DALLEObjective: loss weights, caption drop, sample
prompts), train (TrainConfig: AdamW, schedule, precision), data (DataConfig: pre-tokenised `tokens`
directories, or raw images encoded on the fly) and inputs (DALLEInputs: the tokenizer and the dVAE).
Re-running the same command after a crash continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle import cli
from dalle.checkpoint import load_pretrained, resolve_model_dir
from dalle.cli import resolve_device
from dalle.data.sources import DataConfig, build_dataset
from dalle.tokenizer import TextTokenizer
from dalle.train.cli import run_training, start, training_parser
from dalle.train.config import TrainConfig
from dalle.train.tasks.transformer import DALLEInputs, DALLEObjective, DALLETask
from dalle.transformer.model import DALLE, DALLEConfig

SECTIONS = {"model": DALLEConfig, "objective": DALLEObjective, "train": TrainConfig, "data": DataConfig,
            "inputs": DALLEInputs}


def main(argv: list[str] | None = None) -> int:
    args, cfg = start(training_parser(__doc__.split("\n\n")[0]), SECTIONS, argv)
    inputs: DALLEInputs = cfg["inputs"]
    if not inputs.tokenizer:
        raise SystemExit("inputs.tokenizer is not set: train one with tools/train_bpe.py and point to it")
    switch, steps = cfg["objective"].second_mix_at, cfg["train"].steps
    if switch >= steps:
        raise SystemExit(f"objective.second_mix_at {switch} is not before train.steps ({steps}): the second mix "
                         f"would never be used; give a step in 1..{steps - 1}, or 0 for one mix throughout")
    cli.require_input("inputs.tokenizer", inputs.tokenizer, "train_bpe.py")
    tokenizer = TextTokenizer.from_file(inputs.tokenizer)
    device = resolve_device(args.device)
    if inputs.dvae:
        cli.require_input("inputs.dvae", inputs.dvae, "train_dvae.py")
    dvae = load_pretrained(inputs.dvae, expect="dvae", map_location=device) if inputs.dvae else None
    image_size = dvae.config.image_size if dvae is not None else 0
    if cfg["data"].source != "tokens" and dvae is None:
        raise SystemExit(f"data.source {cfg['data'].source!r} gives raw images: set inputs.dvae to encode them, "
                         "or pre-tokenise them with tools/pretokenize.py and use data.source: tokens")
    train = build_dataset(cfg["data"], "train", image_size, "dalle")
    val = build_dataset(cfg["data"], "val", image_size, "eval")
    if cfg["model"].text_vocab_size == 0:  # "take it from the tokenizer"
        cfg["model"] = dataclasses.replace(cfg["model"], text_vocab_size=tokenizer.vocab_size)
    dvae_path = str(resolve_model_dir(inputs.dvae).resolve()) if inputs.dvae else ""
    task = DALLETask(DALLE(cfg["model"]), cfg["objective"], tokenizer, train, val, dvae, dvae_path)
    m = cfg["model"]
    return run_training(task, cfg, args, f"DALL-E: {m.n_layer} layers, stream {m.text_seq_len} text + "
                                         f"{m.image_seq_len} image tokens")


if __name__ == "__main__":
    cli.run(main)
