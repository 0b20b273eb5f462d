"""The transformer's training objective for the shared engine (paper sec. 2.2, appendix B.2).

Loss: cross-entropy of the text tokens and of the image tokens, weighted 1/8 and 7/8 (the paper's
weighting: the model is mainly an image model). Captions get BPE dropout, and are dropped to the empty
prompt with probability `caption_drop`, so the unconditional branch of classifier-free guidance is
trained. Evaluation reports held-out losses and saves a grid of samples for fixed prompts.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from dalle.data.sources import eval_batches
from dalle.tokenizer import TextTokenizer
from dalle.train.engine import matrix_decay_groups
from dalle.transformer.fit import check_fit
from dalle.transformer.model import DALLE

if TYPE_CHECKING:
    from dalle.train.engine import EvalSink
    from dvae.model import DiscreteVAE


@dataclass(frozen=True)
class DALLEObjective:
    text_loss_weight: float = 1 / 8
    image_loss_weight: float = 7 / 8
    caption_drop: float = 0.1  # share of captions replaced by the empty prompt (for cond_scale > 1)
    bpe_dropout: bool = True  # the tokenizer's BPE dropout (10% in the paper) on training captions
    val_samples: int = 512  # held-out samples for the validation losses
    sample_prompts: tuple[str, ...] = ()  # captions sampled at each eval into a grid
    sample_top_k: int = 0
    sample_cond_scale: float = 1.0
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.caption_drop < 1:
            raise ValueError(f"caption_drop must be in [0, 1), got {self.caption_drop}")


@dataclass(frozen=True)
class DALLEInputs:
    """Files the transformer's training reads besides its data."""

    tokenizer: str = ""  # tokenizer.json from tools/train_bpe.py
    dvae: str = ""  # dVAE model or run directory: encodes raw images, decodes sample grids


class Captioned(Dataset):
    """Adds tokenised text to a data set's samples; seeds come from the engine's sampler."""

    accepts_seed = True

    def __init__(self, base: Dataset, tokenizer: TextTokenizer, text_len: int, objective: DALLEObjective,
                 train: bool) -> None:
        self.base, self.tok, self.text_len, self.obj, self.train = base, tokenizer, text_len, objective, train

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, seed = key if isinstance(key, tuple) else (key, key)
        sample = self.base[key] if getattr(self.base, "accepts_seed", False) else self.base[index]
        return self.tokenize(sample, seed)

    def tokenize(self, sample: dict[str, Any] | None, seed: int) -> dict[str, Any] | None:
        if sample is None:
            return None
        rng = random.Random(seed ^ 0x5EED)  # the sample's own stream: caption drop, then BPE dropout
        caption = "" if self.train and rng.random() < self.obj.caption_drop else sample["caption"]
        ids, _ = self.tok.encode_batch([caption], self.text_len, dropout=self.train and self.obj.bpe_dropout,
                                       rng=rng, truncate_warn=False)
        out = {"text": ids[0], "key": sample["key"]}
        for k in ("codes", "image"):
            if k in sample:
                out[k] = sample[k]
        return out


class CaptionedStream(IterableDataset):
    """`Captioned` for streaming data sets (webdataset): each sample's seed comes from its key."""

    def __init__(self, base: IterableDataset, *args: Any) -> None:
        self.base, self.captioned = base, Captioned(base, *args)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        for sample in self.base:
            key = "" if sample is None else sample["key"]
            yield self.captioned.tokenize(sample, zlib.crc32(f"{self.epoch}/{key}".encode()))


def captioned(ds: Dataset, tokenizer: TextTokenizer, text_len: int, objective: DALLEObjective,
              train: bool) -> Dataset:
    """Tokenised captions for a map-style or a streaming data set."""
    kind = CaptionedStream if isinstance(ds, IterableDataset) else Captioned
    return kind(ds, tokenizer, text_len, objective, train)


class DALLETask:
    best_metric = ("val_image_loss", "min")  # held-out image-token loss: checkpoints/best, early stopping

    def __init__(self, model: DALLE, objective: DALLEObjective, tokenizer: TextTokenizer, train: Dataset,
                 val: Dataset, dvae: DiscreteVAE | None = None, dvae_path: str = "") -> None:
        cfg = model.config
        check_fit(cfg, text_vocab_size=tokenizer.vocab_size, dvae_grid_size=dvae and dvae.config.grid_size,
                  dvae_vocab_size=dvae and dvae.config.vocab_size, where="model")
        self.model, self.objective, self.tokenizer, self.dvae = model, objective, tokenizer, dvae
        self.dvae_path = dvae_path
        self.tokens_per_sample = cfg.seq_len  # text + image slots: what tokens/s in the logs counts
        self.train = captioned(train, tokenizer, cfg.text_seq_len, objective, True)
        self.val = captioned(val, tokenizer, cfg.text_seq_len, objective, False)

    def train_dataset(self) -> Dataset:
        return self.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return matrix_decay_groups(model)

    def _codes(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        if "codes" in batch:
            return batch["codes"].to(device)
        if self.dvae is None:
            raise ValueError("batches hold raw images: set inputs.dvae so they can be encoded to codes")
        return self.dvae.to(device).encode(batch["image"].to(device)).flatten(1)

    def losses(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        device = next(model.parameters()).device
        text, codes = batch["text"].to(device), self._codes(batch, device)
        text_logits, image_logits = model(text, codes)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten())
        return text_loss, image_loss

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        text_loss, image_loss = self.losses(model, batch)
        o = self.objective
        loss = o.text_loss_weight * text_loss + o.image_loss_weight * image_loss
        return loss, {"text_loss": text_loss.item(), "image_loss": image_loss.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        totals, n = [0.0, 0.0], 0
        for batch in eval_batches(self.val, self.objective.val_samples, batch_size=32):
            t, i = self.losses(model, batch)
            b = len(batch["text"])
            totals[0], totals[1], n = totals[0] + t.item() * b, totals[1] + i.item() * b, n + b
        metrics = {"val_text_loss": totals[0] / max(n, 1), "val_image_loss": totals[1] / max(n, 1)}
        if self.objective.sample_prompts and self.dvae is not None:
            self._sample_grid(model, step, sink)
        return metrics

    def _sample_grid(self, model: nn.Module, step: int, sink: EvalSink) -> None:
        from torchvision.utils import make_grid

        from dalle.transformer.sampling import sample

        o, device = self.objective, next(model.parameters()).device
        text, _ = self.tokenizer.encode_batch(list(o.sample_prompts), model.config.text_seq_len,
                                              truncate_warn=False)
        g = torch.Generator(device=device).manual_seed(o.sample_seed)
        codes = sample(model, text.to(device), top_k=o.sample_top_k, cond_scale=o.sample_cond_scale, generator=g)
        grid = model.config.image_grid_size
        images = self.dvae.to(device).decode(codes.view(-1, grid, grid))
        sink.image("samples", step, make_grid(images.float().cpu(), nrow=len(images), padding=1))

    def save_extra(self, directory: Any) -> None:
        """A transformer checkpoint carries its tokenizer, and names the dVAE that decodes its codes."""
        self.tokenizer.save(directory / "tokenizer.json")
        if self.dvae_path:
            (directory / "dvae.json").write_text(json.dumps({"path": self.dvae_path}) + "\n")
