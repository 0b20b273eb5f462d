"""Every shipped config parses into its dataclasses, and its model builds (big ones on `meta`)."""

from pathlib import Path

import pytest
import torch

from dalle.config import from_dict
from dalle.data.sources import DataConfig
from dalle.train.config import TrainConfig, apply_overrides, load_yaml
from dalle.train.tasks.dvae import DVAEObjective
from dalle.train.tasks.transformer import DALLEInputs, DALLEObjective
from dalle.transformer.model import DALLE, DALLEConfig
from dvae.model import DiscreteVAE, DVAEConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "dvae").glob("*.yaml")), ids=lambda p: p.stem)
def test_dvae_configs(path):
    data = load_yaml(path)
    assert set(data) <= {"model", "objective", "train", "data"}
    cfg = from_dict(DVAEConfig, data["model"])
    for cls, key in ((DVAEObjective, "objective"), (TrainConfig, "train"), (DataConfig, "data")):
        from_dict(cls, data.get(key))
    small = cfg.image_size <= 64
    with torch.device("cpu" if small else "meta"):
        model = DiscreteVAE(cfg)
        x = torch.rand(1, 3, cfg.image_size, cfg.image_size, device="cpu" if small else "meta")
        assert model.logits(x).shape == (1, cfg.vocab_size, cfg.grid_size, cfg.grid_size)


@pytest.mark.parametrize("path", sorted((CONFIGS / "dalle").glob("*.yaml")), ids=lambda p: p.stem)
def test_dalle_configs(path):
    data = load_yaml(path)
    assert set(data) <= {"model", "objective", "train", "data", "inputs"}
    cfg = from_dict(DALLEConfig, data["model"])
    for cls, key in ((DALLEObjective, "objective"), (TrainConfig, "train"), (DataConfig, "data"),
                     (DALLEInputs, "inputs")):
        from_dict(cls, data.get(key))
    if cfg.text_vocab_size == 0:
        cfg = DALLEConfig(**{**cfg.to_dict(), "text_vocab_size": 100})
    small = cfg.n_embd * cfg.n_layer <= 2048
    with torch.device("cpu" if small else "meta"):
        model = DALLE(cfg)
    if small:
        text = cfg.text_vocab_size + torch.arange(cfg.text_seq_len)[None]
        image = torch.zeros(1, cfg.image_seq_len, dtype=torch.long)
        assert model(text, image)[1].shape == (1, cfg.image_seq_len, cfg.image_vocab_size)


def test_overrides_parse_numbers_as_numbers():
    # YAML 1.1 reads "3e-3" (no dot) as a string; a float field must still get the number.
    data = apply_overrides({"train": {"lr": 1.0e-3}}, ["train.lr=3e-3", "train.steps=7", "train.betas=[0.9, 0.95]"])
    cfg = from_dict(TrainConfig, data["train"], "train")
    assert cfg.lr == 3e-3 and cfg.steps == 7 and cfg.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match=r"train\.lr: expected a number, got 'fast'"):
        from_dict(TrainConfig, {"lr": "fast"}, "train")


def test_integer_and_boolean_keys_refuse_what_they_cannot_mean():
    # A wrong type is named at its key, not met later as a comparison of a string with an int.
    from dalle.train.tasks.transformer import DALLEObjective

    assert from_dict(TrainConfig, {"steps": "1e4", "save_every": 500.0}, "train").steps == 10000
    for bad in ("abc", 1.5, [1], True):
        with pytest.raises(ValueError, match=r"objective\.second_mix_at: expected an integer, got "):
            from_dict(DALLEObjective, {"second_mix_at": bad}, "objective")
    with pytest.raises(ValueError, match=r"objective\.bpe_dropout: expected true or false, got 3"):
        from_dict(DALLEObjective, {"bpe_dropout": 3}, "objective")
    with pytest.raises(ValueError, match=r"train\.lr: expected a number, got True"):
        from_dict(TrainConfig, {"lr": True}, "train")
