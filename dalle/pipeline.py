"""Prompt -> tokens -> transformer -> image codes -> dVAE decoder: the generation path, as one object.

A transformer checkpoint directory holds `config.json`, `model.safetensors` and `tokenizer.json`, and
finds its dVAE in a `dvae/` subdirectory (a bundled model) or through `dvae.json` (a training run's
pointer to the dVAE it was trained with), and its optional CLIP reranker in a `clip/` subdirectory.
Every image gets its own seed, so any image can be made again from its seed alone, whatever else shared
its batch. The model that ships with the package lives in `DEFAULT_MODEL` (written by tools/bundle.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dalle.checkpoint import WEIGHTS_NAME, load_pretrained, resolve_model_dir
from dalle.clip import CLIP
from dalle.model import DALLE
from dalle.rerank import rerank
from dalle.sampling import sample
from dalle.tokenizer import TextTokenizer
from dvae.model import DiscreteVAE

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


@dataclass
class Pipeline:
    model: DALLE
    tokenizer: TextTokenizer
    dvae: DiscreteVAE
    model_id: str  # directory name and a hash of the weights: names the exact model in image metadata
    scorer: CLIP | None = None  # the reranker, when the model has one
    scorer_tokenizer: TextTokenizer | None = None
    scorer_id: str | None = None

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


def load_scorer(clip_dir: str | Path, device: str = "cpu") -> tuple[CLIP, TextTokenizer, str]:
    """A CLIP reranker checkpoint and the tokenizer it was trained with."""
    clip_dir = resolve_model_dir(clip_dir)
    scorer = load_pretrained(clip_dir, expect="clip", map_location=device)
    if not (clip_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{clip_dir} has no tokenizer.json; copy the one the reranker was trained with")
    tokenizer = TextTokenizer.from_file(clip_dir / "tokenizer.json")
    if tokenizer.vocab_size != scorer.config.text_vocab_size:
        raise ValueError(f"{clip_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the reranker was "
                         f"trained with {scorer.config.text_vocab_size}: they do not belong together")
    return scorer.eval(), tokenizer, _weights_id(clip_dir)


def load_pipeline(model_dir: str | Path, *, dvae_dir: str | Path | None = None,
                  clip_dir: str | Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Pipeline:
    """Load a transformer, its tokenizer, its dVAE and its reranker (`clip_dir`, else the model's `clip/`
    folder, else none), checking that they fit together."""
    model_dir = resolve_model_dir(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    model = load_pretrained(model_dir, expect="dalle", map_location=device).to(dtype)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; copy the one the model was trained with")
    tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json")
    cfg = model.config
    if tokenizer.vocab_size != cfg.text_vocab_size:
        raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the model was "
                         f"trained with {cfg.text_vocab_size}: they do not belong together")
    dvae_path = find_dvae(model_dir, dvae_dir)
    dvae = load_pretrained(dvae_path, expect="dvae", map_location=device)
    if (dvae.config.grid_size, dvae.config.vocab_size) != (cfg.image_grid, cfg.image_vocab_size):
        raise ValueError(f"the dVAE in {dvae_path} makes {dvae.config.grid_size}x{dvae.config.grid_size} grids "
                         f"of {dvae.config.vocab_size} codes; the model expects {cfg.image_grid}x{cfg.image_grid} "
                         f"of {cfg.image_vocab_size}")
    pipe = Pipeline(model.eval(), tokenizer, dvae.eval(), _weights_id(model_dir))
    if clip_dir is None and (model_dir / "clip").is_dir():
        clip_dir = model_dir / "clip"
    if clip_dir is not None:
        pipe.scorer, pipe.scorer_tokenizer, pipe.scorer_id = load_scorer(clip_dir, device)
    return pipe


def score(pipe: Pipeline, prompt: str, images: Tensor) -> Tensor:
    """The reranker's scores (N,) of images (N, 3, H, W) for `prompt`, higher is better."""
    if pipe.scorer is None:
        raise ValueError("this model has no reranker (no clip/ folder): pass a CLIP checkpoint as clip_dir")
    return rerank(pipe.scorer, pipe.scorer_tokenizer, prompt, images)


def prime_codes(pipe: Pipeline, image: Tensor, rows: int) -> Tensor:
    """The first `rows` rows of an image's code grid, to prime sampling. image: (3, H, W) -> (rows*G,)"""
    g = pipe.model.config.image_grid
    if not 0 < rows < g:
        raise ValueError(f"prime rows must be between 1 and {g - 1}, got {rows}")
    codes = pipe.dvae.encode(image[None].to(pipe.device))  # (1, G, G)
    return codes[0, :rows].flatten()


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], seeds: list[int], *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, cond_scale: float = 1.0, prime: Tensor | None = None,
             on_token: Callable[[int], None] | None = None) -> Tensor:
    """One image per (prompt, seed) pair, as one batch. -> (B, 3, H, W) in [0, 1]"""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cfg = pipe.model.config
    text, _ = pipe.tokenizer.encode_batch(prompts, cfg.text_seq_len)
    gens = [torch.Generator(device=pipe.device).manual_seed(s) for s in seeds]
    primed = None if prime is None else prime[None].expand(len(prompts), -1).to(pipe.device)
    codes = sample(pipe.model, text.to(pipe.device), temperature=temperature, top_k=top_k, top_p=top_p,
                   cond_scale=cond_scale, prime=primed, generator=gens, on_token=on_token)
    return pipe.dvae.decode(codes.view(-1, cfg.image_grid, cfg.image_grid)).float().cpu()
