"""The reward model: a trained network with a scalar head, scoring how much people prefer an image for a prompt
(Stiennon et al. 2020, sec. 3.4 "Reward models").

Three bodies, each initialised from a trained network of the project:

    reranker     the CLIP-style reranker's two encoders (pixels in). The reward is the reranker's own logit,
                 scale * cos(image, text), plus a learned linear map of (image * text, image) embeddings that
                 starts at zero: before training the reward ranks images exactly as the raw reranker does.
    transformer  the transformer itself, as Stiennon et al. did (codes in): the stream [text][image codes]
                 with every code at its own grid cell (the order the reading layouts use), and a scalar head
                 on the last slot's final hidden state, which has read the whole image. The head starts as
                 N(0, 1 / (d + 1)), the paper's initialisation.
    reader       a transformer that reads images (its caption layout; codes in): the reward is
                 w * log p(prompt | image) + b, the model's own judgement of how well the image fits the prompt
                 (generate.py --rerank self), with w = 1 and b = 0 at the start: before training it ranks images
                 exactly as self-reranking does, and training moves the whole network.

Bradley-Terry training sees only reward differences, so the level is free: `offset` (a buffer, saved with
the weights) is set after training to the mean raw reward of the supervised model's samples, so that those
average 0 (the paper's normalisation). Pure model code: no I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dalle.config import from_dict
from dalle.reranker.model import Reranker, RerankerConfig
from dalle.transformer.layouts import CAPTION
from dalle.transformer.model import DALLE, DALLEConfig
from dalle.transformer.reading import text_logprob_grad

BODIES = ("reranker", "transformer", "reader")


@dataclass(frozen=True)
class RewardConfig:
    body: str = "reranker"  # "reranker" (pixels in), "transformer" or "reader" (image codes in)
    # The body's architecture: the init model's config (the training tool copies it from inputs.init); the
    # "transformer" and "reader" bodies both keep it in `transformer`.
    reranker: RerankerConfig | None = None
    transformer: DALLEConfig | None = None

    def __post_init__(self) -> None:
        if self.body not in BODIES:
            raise ValueError(f"body must be one of {BODIES}, got {self.body!r}")
        # config.json and YAML give the nested configs as dicts
        for name, cls in (("reranker", RerankerConfig), ("transformer", DALLEConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, from_dict(cls, value, where=f"reward {name}"))
        other = "transformer" if self.body == "reranker" else "reranker"
        if self.body == "reader" and self.transformer is not None and CAPTION not in self.transformer.layouts:
            raise ValueError("a 'reader' reward model starts from a transformer that reads images (model.layouts "
                             f"with 'caption'); this one has {list(self.transformer.layouts)}")
        if getattr(self, other) is not None:
            raise ValueError(f"a {self.body!r} reward model has no {other} config; remove it")

    @property
    def body_field(self) -> str:
        """The field holding the body's config."""
        return body_field(self.body)

    @property
    def body_config(self) -> RerankerConfig | DALLEConfig | None:
        return getattr(self, self.body_field)

    @property
    def reads_pixels(self) -> bool:
        return self.body == "reranker"

    @property
    def text_seq_len(self) -> int:
        return self.body_config.text_seq_len

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as config.json holds them


def body_field(body: str) -> str:
    """The RewardConfig field that holds a body's config: "reranker" or "transformer"."""
    return "reranker" if body == "reranker" else "transformer"


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__()
        if cfg.body_config is None:
            raise ValueError(f"the reward model's {cfg.body} config is not set (the training tool takes it from "
                             "inputs.init)")
        self.config = cfg
        if cfg.body == "reranker":
            self.body = Reranker(cfg.reranker)
            e = cfg.reranker.embed_dim
            self.head = nn.Linear(2 * e, 1)
            nn.init.zeros_(self.head.weight)
        elif cfg.body == "reader":
            self.body = DALLE(cfg.transformer)
            self.head = nn.Linear(1, 1)  # w * log p(prompt | image) + b
            nn.init.ones_(self.head.weight)
            if not cfg.transformer.tie_embeddings:  # the image head is unused: frozen, so DDP and AdamW skip it
                self.body.image_head.requires_grad_(False)
        else:
            self.body = DALLE(cfg.transformer)
            d = cfg.transformer.n_embd
            self.head = nn.Linear(d, 1)
            nn.init.normal_(self.head.weight, std=1 / math.sqrt(d + 1))
            if not cfg.transformer.tie_embeddings:  # unused token heads: frozen, so DDP and AdamW skip them
                self.body.text_head.requires_grad_(False)
                self.body.image_head.requires_grad_(False)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("offset", torch.zeros(()))  # the supervised samples' mean raw reward

    def load_body(self, body: nn.Module) -> None:
        """Start from a trained reranker or transformer (the same architecture as the config's)."""
        if body.config != self.config.body_config:
            raise ValueError(f"the init model's config differs from the reward model's {self.config.body} config")
        self.body.load_state_dict(body.state_dict())

    def raw(self, text: Tensor, image: Tensor) -> Tensor:
        """Rewards before normalisation. text: (B, T) ids; image: (B, 3, H, W) pixels in [0, 1] for the
        reranker body, (B, N) codes for the transformer body -> (B,)."""
        if self.config.body == "reranker":
            image_emb, text_emb = self.body.encode_image(image), self.body.encode_text(text)  # (B, E) each
            logit = self.body.scale() * (image_emb * text_emb).sum(-1)
            return logit + self.head(torch.cat([image_emb * text_emb, image_emb], dim=-1)).squeeze(-1)
        body, n = self.body, self.config.transformer.image_seq_len
        if image.ndim != 2 or image.shape[1] != n:
            raise ValueError(f"image codes must be (B, {n}), got {tuple(image.shape)}")
        if self.config.body == "reader":  # log p(prompt | image) in the caption layout, as self-reranking scores
            start = torch.zeros(len(text), dtype=torch.long, device=text.device)
            logp = text_logprob_grad(body, image, text, CAPTION, start)  # (B,)
            return self.head(logp[:, None].to(self.head.weight.dtype)).squeeze(-1)
        x = torch.cat([body.embed_text(text), body.image_emb(image) + body.image_pos(0, n)], dim=1)  # (B, T+N, d)
        h = body.backbone(x)  # (B, T+N, d)
        return self.head(h[:, -1]).squeeze(-1)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:  # -> (B,) normalised rewards
        return self.raw(text, image) - self.offset
