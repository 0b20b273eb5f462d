"""The one check that a transformer, a dVAE and a tokenizer belong together, used by generation
(`dalle.pipeline.load_pipeline`) and training (the transformer's task) alike."""

from __future__ import annotations

from dalle.transformer.model import DALLEConfig


def check_fit(model: DALLEConfig, *, text_vocab_size: int | None = None, dvae_grid_size: int | None = None,
              dvae_vocab_size: int | None = None, where: str = "the model") -> None:
    """Raise ValueError naming what does not fit: the tokenizer's vocabulary against the model's text
    vocabulary, the dVAE's grid and codebook against the model's image grid and image vocabulary."""
    if text_vocab_size is not None and text_vocab_size != model.text_vocab_size:
        raise ValueError(f"the tokenizer has {text_vocab_size} tokens but {where} was trained with "
                         f"text_vocab_size {model.text_vocab_size}: they do not belong together (set "
                         f"model.text_vocab_size to {text_vocab_size}, or use the model's own tokenizer.json)")
    if dvae_grid_size is None or dvae_vocab_size is None:
        return
    if (dvae_grid_size, dvae_vocab_size) != (model.image_grid_size, model.image_vocab_size):
        g = model.image_grid_size
        raise ValueError(f"the dVAE makes {dvae_grid_size}x{dvae_grid_size} grids of {dvae_vocab_size} codes; "
                         f"{where} expects image_grid_size {g} ({g}x{g}) and image_vocab_size "
                         f"{model.image_vocab_size}: use the dVAE the model was trained with")
