"""The transformer's training objective for the shared engine (paper sec. 2.2, appendix B.2).

Loss: cross-entropy of the text tokens and of the image tokens, weighted 1/8 and 7/8 (the paper's
weighting: the model is mainly an image model). Captions get BPE dropout, and are dropped to the empty
prompt with probability `caption_drop`, so the unconditional branch of classifier-free guidance is
trained. Evaluation reports held-out losses and saves a grid of samples for fixed prompts.

Both directions (`dalle.transformer.layouts`): each training sample is drawn text-to-image, caption (read the
image, write its caption) or qa (read the image and a question, write the answer) with the shares
`mix_t2i`, `mix_caption` and `mix_qa`, from its own seed. A reading row's loss is the cross-entropy of the
text it writes (the caption or the answer, and its end-of-text token) only; each row counts in the step's loss
by its share of the batch, a reading row with weight `reading_loss_weight`. The default mix is text-to-image
only, and then training is exactly what it was before the reading layouts existed. A second mix from a given
step on (`second_mix_*`) makes a curriculum under one learning-rate schedule.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from dalle.data.qa import qa_for_sample
from dalle.data.shapes import converse_caption
from dalle.data.sources import eval_batches
from dalle.tokenizer import TextTokenizer
from dalle.train.engine import matrix_decay_groups
from dalle.transformer.fit import check_fit
from dalle.transformer.layouts import CAPTION, LAYOUTS, QA, T2I, generated_mask, pack_qa
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
    # shares of the directions samples are drawn in (normalised); caption and qa need model.layouts to have them
    mix_t2i: float = 1.0
    mix_caption: float = 0.0
    mix_qa: float = 0.0  # a sample without questions is captioned instead
    reading_loss_weight: float = 1.0  # a caption or answer row's loss against a text-to-image row's
    # A curriculum under one learning-rate schedule: from step `second_mix_at` on (0: never), samples are drawn
    # with the second mix's shares instead. Drawing first, reading last (0.9 text to image, then 0.25) is the
    # order measured best in docs/evaluation.md. The same as --stop-at there and resuming with the second mix.
    second_mix_at: int = 0
    second_mix_t2i: float = 0.0
    second_mix_caption: float = 0.0
    second_mix_qa: float = 0.0
    # Caption rows write a two-object shapes caption in either order, the stored one or its converse ("a
    # circle left of a square", "a square right of a circle"), half each: the same image named both ways is
    # what teaches which relation word follows which object. Other captions are written as stored.
    caption_either_order: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.caption_drop < 1:
            raise ValueError(f"caption_drop must be in [0, 1), got {self.caption_drop}")
        shares = (self.mix_t2i, self.mix_caption, self.mix_qa)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"mix_t2i, mix_caption and mix_qa must be >= 0 with a positive sum, got {shares}")
        second = (self.second_mix_t2i, self.second_mix_caption, self.second_mix_qa)
        if self.second_mix_at < 0:
            raise ValueError(f"second_mix_at must be >= 0 (0: one mix throughout), got {self.second_mix_at}")
        if self.second_mix_at and (min(second) < 0 or sum(second) <= 0):
            raise ValueError(f"second_mix_at is {self.second_mix_at}: second_mix_t2i, second_mix_caption and "
                             f"second_mix_qa must be >= 0 with a positive sum, got {second}")

    @property
    def mix(self) -> dict[str, float]:
        """The layouts trained, each with its share (> 0)."""
        total = self.mix_t2i + self.mix_caption + self.mix_qa
        shares = {T2I: self.mix_t2i, CAPTION: self.mix_caption, QA: self.mix_qa}
        return {name: share / total for name, share in shares.items() if share > 0}

    def at(self, step: int) -> DALLEObjective:
        """The objective samples of `step` are drawn with: the second mix as the first, from `second_mix_at` on."""
        if not self.second_mix_at or step < self.second_mix_at:
            return self
        return replace(self, mix_t2i=self.second_mix_t2i, mix_caption=self.second_mix_caption,
                       mix_qa=self.second_mix_qa, second_mix_at=0)

    @property
    def phases(self) -> tuple[DALLEObjective, ...]:
        return (self,) if not self.second_mix_at else (self, self.at(self.second_mix_at))


@dataclass(frozen=True)
class DALLEInputs:
    """Files the transformer's training reads besides its data."""

    tokenizer: str = ""  # tokenizer.json from tools/train_bpe.py
    dvae: str = ""  # dVAE model or run directory: encodes raw images, decodes sample grids


class Captioned(Dataset):
    """Adds tokenised text to a data set's samples; seeds come from the engine's sampler. Each sample is drawn
    in one of the objective's layouts, or always in `layout` when given (validation of one direction)."""

    accepts_seed = True

    def __init__(self, base: Dataset, tokenizer: TextTokenizer, text_len: int, objective: DALLEObjective,
                 train: bool, layout: str | None = None) -> None:
        self.base, self.tok, self.text_len, self.obj, self.train = base, tokenizer, text_len, objective, train
        self.layout = layout

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, seed = key if isinstance(key, tuple) else (key, key)
        sample = self.base[key] if getattr(self.base, "accepts_seed", False) else self.base[index]
        return self.tokenize(sample, seed)

    def _draw_layout(self, seed: int) -> str:
        if self.layout is not None:
            return self.layout
        mix = self.obj.mix
        if len(mix) == 1:
            return next(iter(mix))
        # a stream of its own, so the caption drop and BPE dropout draw as they did before directions existed
        return random.Random(seed ^ 0xD1EC).choices(list(mix), weights=list(mix.values()))[0]

    def tokenize(self, sample: dict[str, Any] | None, seed: int) -> dict[str, Any] | None:
        if sample is None:
            return None
        layout, answer_at = self._draw_layout(seed), 0
        pairs = qa_for_sample(sample) if layout == QA else []
        if layout == QA and not pairs:  # no questions about this image: it teaches captioning instead
            layout = CAPTION
        if layout != T2I and not sample["caption"] and not pairs:
            layout = T2I
        if self.layout is not None and layout != self.layout:
            return None  # validating one direction: this sample has nothing for it
        rng = random.Random(seed ^ 0x5EED)  # the sample's own stream: caption drop, then BPE dropout
        if layout == T2I:
            caption = "" if self.train and rng.random() < self.obj.caption_drop else sample["caption"]
            ids, _ = self.tok.encode_batch([caption], self.text_len, dropout=self.train and self.obj.bpe_dropout,
                                           rng=rng, truncate_warn=False)
            text = ids[0]
        elif layout == CAPTION:
            caption = sample["caption"]
            if self.train and self.obj.caption_either_order and rng.random() < 0.5:
                caption = converse_caption(caption) or caption
            # No BPE dropout on written text: the model is to write (and score) the canonical tokens.
            text = self.tok.encode_batch([caption], self.text_len, truncate_warn=False)[0][0]
        else:
            question, answer = pairs[rng.randrange(len(pairs))]
            row, answer_at = pack_qa(self.tok.encode(question), self.tok.encode(answer), self.text_len,
                                     self.tok.vocab_size)
            text = torch.tensor(row)
        out = {"text": text, "key": sample["key"], "layout": torch.tensor(LAYOUTS.index(layout)),
               "answer_at": torch.tensor(answer_at)}
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
              train: bool, layout: str | None = None) -> Dataset:
    """Tokenised captions for a map-style or a streaming data set."""
    kind = CaptionedStream if isinstance(ds, IterableDataset) else Captioned
    return kind(ds, tokenizer, text_len, objective, train, layout)


class DALLETask:
    best_metric = ("val_image_loss", "min")  # held-out image-token loss: checkpoints/best, early stopping

    def __init__(self, model: DALLE, objective: DALLEObjective, tokenizer: TextTokenizer, train: Dataset,
                 val: Dataset, dvae: DiscreteVAE | None = None, dvae_path: str = "") -> None:
        cfg = model.config
        check_fit(cfg, text_vocab_size=tokenizer.vocab_size, dvae_grid_size=dvae and dvae.config.grid_size,
                  dvae_vocab_size=dvae and dvae.config.vocab_size, where="model")
        self.model, self.objective, self.tokenizer, self.dvae = model, objective, tokenizer, dvae
        self.dvae_path = dvae_path
        trained = list(dict.fromkeys(name for phase in objective.phases for name in phase.mix))  # either mix
        missing = [name for name in trained if name not in cfg.layouts]
        if missing:
            setting = ("mix_" if missing[0] in objective.mix else "second_mix_") + missing[0]
            raise ValueError(f"objective.{setting} > 0 but the model has no {missing[0]!r} layout: set "
                             f"model.layouts to {list(LAYOUTS)} (configs/dalle/shapes.yaml), or the share to 0")
        self.tokens_per_sample = cfg.seq_len  # text + image slots: what tokens/s in the logs counts
        self.train = [captioned(train, tokenizer, cfg.text_seq_len, phase, True) for phase in objective.phases]
        # the engine starts a new loader at this step, as resuming there with the second mix would
        self.data_changes_at = (objective.second_mix_at,) if objective.second_mix_at else ()
        self.val = captioned(val, tokenizer, cfg.text_seq_len, objective, False, T2I)
        # one held-out view per reading direction trained, each sample read in that direction
        self.val_reading = {name: captioned(val, tokenizer, cfg.text_seq_len, objective, False, name)
                            for name in trained if name != T2I}

    def train_dataset(self, step: int = 0) -> Dataset:
        return self.train[sum(step >= at for at in self.data_changes_at)]  # one phase per switch passed

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return matrix_decay_groups(model)

    def _codes(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        if "codes" in batch:
            return batch["codes"].to(device)
        if self.dvae is None:
            raise ValueError("batches hold raw images: set inputs.dvae so they can be encoded to codes")
        return self.dvae.to(device).encode(batch["image"].to(device)).flatten(1)

    def losses(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Text and image losses of a text-to-image batch (every row read as [text][image])."""
        device = next(model.parameters()).device
        text, codes = batch["text"].to(device), self._codes(batch, device)
        text_logits, image_logits = model(text, codes)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten())
        return text_loss, image_loss

    def mixed_losses(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, tuple[Tensor, int]]:
        """Per direction present in the batch, (its loss, its rows): "text" and "image" over the text-to-image
        rows, "caption" and "answer" over the written tokens of the reading rows."""
        device = next(model.parameters()).device
        text, codes = batch["text"].to(device), self._codes(batch, device)
        layout, answer_at = batch["layout"].to(device), batch["answer_at"].to(device)
        text_logits, image_logits = model(text, codes, layout, answer_at)
        b = text.shape[0]
        text_ce = F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten(), reduction="none").view(b, -1)
        image_ce = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten(), reduction="none").view(b, -1)
        # every row's losses stay in the graph, weighted 0 where they do not count, so every weight gets a
        # gradient (a distributed back end expects one) whatever the batch's mix
        t2i = (layout == LAYOUTS.index(T2I)).float()
        n = int(t2i.sum())
        out = {}
        if n:
            out["text"] = ((text_ce.mean(dim=1) * t2i).sum() / n, n)
            out["image"] = ((image_ce.mean(dim=1) * t2i).sum() / n, n)
        else:
            out["unused"] = (0.0 * (text_ce.sum() + image_ce.sum()), 0)
        written = generated_mask(text, answer_at, self.model.config.text_vocab_size)
        for name, index in (("caption", LAYOUTS.index(CAPTION)), ("answer", LAYOUTS.index(QA))):
            rows = layout == index
            if bool(rows.any()):
                mask = (written & rows[:, None]).float()
                out[name] = ((text_ce * mask).sum() / mask.sum(), int(rows.sum()))
        return out

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        o = self.objective.at(step)  # step: the steps done, as data_changes_at counts them
        if T2I in o.mix and len(o.mix) == 1:  # text-to-image only: the loss as it always was
            text_loss, image_loss = self.losses(model, batch)
            loss = o.text_loss_weight * text_loss + o.image_loss_weight * image_loss
            return loss, {"text_loss": text_loss.item(), "image_loss": image_loss.item()}
        parts = self.mixed_losses(model, batch)
        b = len(batch["text"])
        loss = parts.pop("unused", (0.0, 0))[0]
        if "text" in parts:
            (text_loss, n), (image_loss, _) = parts["text"], parts["image"]
            loss = loss + n / b * (o.text_loss_weight * text_loss + o.image_loss_weight * image_loss)
        for name in ("caption", "answer"):
            if name in parts:
                part, n = parts[name]
                loss = loss + n / b * o.reading_loss_weight * part
        return loss, {f"{name}_loss": part.item() for name, (part, _) in parts.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        totals, n = [0.0, 0.0], 0
        for batch in eval_batches(self.val, self.objective.val_samples, batch_size=32):
            t, i = self.losses(model, batch)
            b = len(batch["text"])
            totals[0], totals[1], n = totals[0] + t.item() * b, totals[1] + i.item() * b, n + b
        metrics = {"val_text_loss": totals[0] / max(n, 1), "val_image_loss": totals[1] / max(n, 1)}
        for layout, data in self.val_reading.items():
            name = "caption" if layout == CAPTION else "answer"
            total, rows = 0.0, 0
            for batch in eval_batches(data, self.objective.val_samples, batch_size=32):
                part, b = self.mixed_losses(model, batch)[name]
                total, rows = total + part.item() * b, rows + b
            if rows:
                metrics[f"val_{name}_loss"] = total / rows
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
