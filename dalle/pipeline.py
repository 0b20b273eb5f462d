"""Prompt -> tokens -> transformer -> image codes -> dVAE decoder: the generation path, as one object.

A transformer checkpoint directory holds `config.json`, `model.safetensors` and `tokenizer.json`, and
finds its dVAE in a `dvae/` subdirectory (a bundled model) or through `dvae.json` (a training run's
pointer to the dVAE it was trained with), and its optional reranker in a `reranker/` subdirectory.
Every image gets its own seed, so any image can be made again from its seed alone, whatever else shared
its batch. The model that ships with the package lives in `DEFAULT_MODEL` (written by tools/bundle.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dalle.checkpoint import WEIGHTS_NAME, load_pretrained, resolve_model_dir
from dalle.reranker.model import Reranker
from dalle.reranker.score import rerank
from dalle.tokenizer import TextTokenizer
from dalle.transformer.fit import check_fit
from dalle.transformer.model import DALLE
from dvae.model import DiscreteVAE

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


@dataclass
class Pipeline:
    model: DALLE
    tokenizer: TextTokenizer
    dvae: DiscreteVAE
    model_id: str  # directory name and a hash of the weights: names the exact model in image metadata
    reranker: Reranker | None = None  # the reranker, when the model has one
    reranker_tokenizer: TextTokenizer | None = None
    reranker_id: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def find_dvae(model_dir: Path, dvae_dir: str | Path | None) -> Path:
    if dvae_dir is not None:
        return Path(dvae_dir)
    if (model_dir / "dvae").is_dir():
        return model_dir / "dvae"
    pointer = model_dir / "dvae.json"
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    raise FileNotFoundError(f"{model_dir} names no dVAE (no dvae/ folder or dvae.json): pass --dvae DIR")


def _weights_id(directory: Path) -> str:
    return f"{directory.name}@{hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()[:12]}"


def load_reranker(reranker_dir: str | Path, device: str = "cpu") -> tuple[Reranker, TextTokenizer, str]:
    """A reranker checkpoint and the tokenizer it was trained with."""
    reranker_dir = resolve_model_dir(reranker_dir)
    reranker = load_pretrained(reranker_dir, expect="reranker", map_location=device)
    if not (reranker_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{reranker_dir} has no tokenizer.json; copy the one the reranker was trained with")
    tokenizer = TextTokenizer.from_file(reranker_dir / "tokenizer.json")
    if tokenizer.vocab_size != reranker.config.text_vocab_size:
        raise ValueError(f"{reranker_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the reranker was "
                         f"trained with {reranker.config.text_vocab_size}: they do not belong together")
    return reranker.eval(), tokenizer, _weights_id(reranker_dir)


def load_pipeline(model_dir: str | Path, *, dvae_dir: str | Path | None = None,
                  reranker_dir: str | Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Pipeline:
    """Load a transformer, its tokenizer, its dVAE and its reranker (`reranker_dir`, else the model's `reranker/`
    folder, else none), checking that they fit together."""
    model_dir = resolve_model_dir(model_dir)
    model = load_pretrained(model_dir, expect="dalle", map_location=device).to(dtype)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; copy the one the model was trained with")
    tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json")
    dvae_path = find_dvae(model_dir, dvae_dir)
    dvae = load_pretrained(dvae_path, expect="dvae", map_location=device)
    try:
        check_fit(model.config, text_vocab_size=tokenizer.vocab_size, dvae_grid_size=dvae.config.grid_size,
                  dvae_vocab_size=dvae.config.vocab_size, where=str(model_dir))
    except ValueError as e:
        raise ValueError(f"{e} (tokenizer {model_dir / 'tokenizer.json'}, dVAE {dvae_path})") from None
    pipe = Pipeline(model.eval(), tokenizer, dvae.eval(), _weights_id(model_dir))
    for folder in ("reranker", "clip"):  # clip/: bundles written before the reranker had its name
        if reranker_dir is None and (model_dir / folder).is_dir():
            reranker_dir = model_dir / folder
    if reranker_dir is not None:
        pipe.reranker, pipe.reranker_tokenizer, pipe.reranker_id = load_reranker(reranker_dir, device)
    return pipe


def score(pipe: Pipeline, prompt: str, images: Tensor) -> Tensor:
    """The reranker's scores (N,) of images (N, 3, H, W) for `prompt`, higher is better."""
    if pipe.reranker is None:
        raise ValueError("this model has no reranker (no reranker/ folder): pass a reranker checkpoint as reranker_dir")
    return rerank(pipe.reranker, pipe.reranker_tokenizer, prompt, images)


def prime_codes(pipe: Pipeline, image: Tensor, rows: int) -> Tensor:
    """The first `rows` rows of an image's code grid, to prime sampling. image: (3, H, W) -> (rows*G,)"""
    g = pipe.model.config.image_grid_size
    if not 0 < rows < g:
        raise ValueError(f"prime rows must be between 1 and {g - 1}, got {rows}")
    codes = pipe.dvae.encode(image[None].to(pipe.device))  # (1, G, G)
    return codes[0, :rows].flatten()
