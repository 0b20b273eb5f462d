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
