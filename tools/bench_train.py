"""Time the training engine on synthetic tokens: throughput, peak memory and the fp16 loss scaler.

    python tools/bench_train.py --config configs/dalle/bench-300m.yaml --out /tmp/bench --json bf16.json \
        --set train.precision=bf16 --deepspeed configs/deepspeed/zero2.json   # under `deepspeed`

Random text ids and image codes of the config's shapes stand in for data (no tokenizer, dVAE or data set),
trained by the same Trainer and back ends as tools/train_dalle.py, logging every step. Rank 0 writes one
JSON object: tokens/s and samples/s (median over the steps after --warmup), model FLOPs per token (as
tools/estimate.py counts them), peak GPU memory, applied and overflowed steps, the loss scales seen, and
the loss at the start and the end.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import Dataset

from dalle import cli
from dalle.cli import resolve_device
from dalle.data.sources import DataConfig
from dalle.train.cli import start, training_parser
from dalle.train.config import TrainConfig
from dalle.train.engine import Trainer, matrix_decay_groups
from dalle.train.tasks.transformer import DALLEInputs, DALLEObjective, DALLETask
from dalle.transformer.model import DALLE, DALLEConfig, training_flops_per_token

# data and inputs are read so that any transformer config is accepted; the tokens are synthetic.
SECTIONS = {"model": DALLEConfig, "objective": DALLEObjective, "train": TrainConfig, "data": DataConfig,
            "inputs": DALLEInputs}


class RandomTokens(Dataset):
    """Sample i: text ids and image codes drawn from a generator seeded with i."""

    def __init__(self, cfg: DALLEConfig, size: int = 100_000) -> None:
        self.cfg, self.size = cfg, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"text": torch.randint(self.cfg.text_vocab_total, (self.cfg.text_seq_len,), generator=g),
                "codes": torch.randint(self.cfg.image_vocab_size, (self.cfg.image_seq_len,), generator=g)}


class SyntheticTask(DALLETask):
    """The transformer's loss and settings over random tokens; evaluation is left out."""

    save_extra = None  # no tokenizer or dVAE to carry into checkpoints

    def __init__(self, model: DALLE, objective: DALLEObjective) -> None:
        self.model, self.objective, self.dvae = model, objective, None
        self.tokens_per_sample = model.config.seq_len
        self.data = RandomTokens(model.config)

    def train_dataset(self) -> Dataset:
        return self.data

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return matrix_decay_groups(model)

    def evaluate(self, model: torch.nn.Module, step: int, sink: object) -> dict[str, float]:
        return {}


def summary(run: Path, warmup: int) -> dict[str, object]:
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    timed = [r for r in train if r["step"] > warmup and "loss" in r] or train  # overflowed steps train nothing
    return {"steps": train[-1]["step"], "tokens_per_s": statistics.median(r.get("tokens_per_s", 0) for r in timed),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
            "overflow_steps": train[-1]["overflow_steps"], "nonfinite_steps": train[-1]["nonfinite_steps"],
            "applied_steps": sum("loss" in r for r in train),
            "loss_scales": [r["loss_scale"] for r in train if "loss_scale" in r],
            "first_loss": next((r["loss"] for r in train if "loss" in r), None),
            "last_loss": next((r["loss"] for r in reversed(train) if "loss" in r), None)}


def main(argv: list[str] | None = None) -> int:
    parser = training_parser(__doc__.split("\n\n")[0], resumable=False)
    parser.add_argument("--json", help="write the figures here too (rank 0)")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=10,
                        help="steps left out of the timing (compilation), >= 0")
    args, cfg = start(parser, SECTIONS, argv)
    device = resolve_device(args.device)
    task = SyntheticTask(DALLE(cfg["model"]), cfg["objective"])
    trainer = Trainer(task, cfg["train"], args.out, device=device, resume="never", progress=not args.no_progress,
                      deepspeed=args.deepspeed)
    if trainer.is_main:
        print(trainer.describe(), flush=True)
    trainer.fit()
    if trainer.is_main:
        result = {"backend": trainer.backend.name, "precision": trainer.cfg.precision,
                  "effective_batch": trainer.global_batch, "seq_len": cfg["model"].seq_len,
                  "model_flops_per_token": sum(training_flops_per_token(cfg["model"])),
                  **summary(Path(args.out), args.warmup)}
        if torch.device(device).type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["device_name"] = torch.cuda.get_device_name()
        print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    trainer.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
