"""The tiny configs every test builds its models from: the `model` section of configs/<kind>/tiny.yaml,
with a test's own changes on top (named, so a reader sees how a test's model differs from the tiny one)."""

from pathlib import Path
from typing import Any

from dalle.config import from_dict
from dalle.train.config import load_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(kind: str, **changes: Any) -> Any:
    """kind: "dvae", "dalle" or "reranker" -> its config dataclass."""
    from dalle.reranker.model import RerankerConfig
    from dalle.transformer.model import DALLEConfig
    from dvae.model import DVAEConfig

    cls = {"dvae": DVAEConfig, "dalle": DALLEConfig, "reranker": RerankerConfig}[kind]
    path = CONFIGS / kind / "tiny.yaml"
    return from_dict(cls, {**load_yaml(path)["model"], **changes}, where=str(path))


def save_joint_model(t2i: Path, out: Path) -> Path:
    """An untrained tiny transformer with every layout (t2i, caption, qa), saved to `out` beside the
    text-to-image model directory `t2i`, whose tokenizer and dVAE pointer it shares."""
    import json
    import shutil

    import torch

    from dalle.checkpoint import save_pretrained
    from dalle.transformer.model import DALLE

    cfg = json.loads((t2i / "config.json").read_text())["config"]
    torch.manual_seed(0)
    model = DALLE(tiny_config("dalle", text_vocab_size=cfg["text_vocab_size"], n_layer=2, text_seq_len=32,
                              layouts=("t2i", "caption", "qa")))

    def extra(d: Path) -> None:
        shutil.copy(t2i / "tokenizer.json", d / "tokenizer.json")
        shutil.copy(t2i / "dvae.json", d / "dvae.json")

    save_pretrained(model, out, extra=extra)
    return out
