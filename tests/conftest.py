import json
import os

import pytest
import torch
from tiny import tiny_config

# Tests must not depend on how many cores the machine has, and must not fight over them.
torch.set_num_threads(int(os.environ.get("DALLE_TEST_THREADS", min(2, os.cpu_count() or 1))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# tools/bench.py waits up to 30 s for a quiet machine before each timed call; tests check figures' arithmetic,
# never timings, so a busy machine must not slow them by minutes.
os.environ.setdefault("BENCH_MAX_WAIT", "0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """For generation and evaluation tests: an untrained transformer run (dVAE by pointer, no reranker)
    and a separate Reranker checkpoint, on 32x32 images."""
    from dalle.checkpoint import save_pretrained
    from dalle.reranker.model import Reranker
    from dalle.tokenizer import TextTokenizer
    from dalle.transformer.model import DALLE
    from dalle_tools import train_bpe
    from dvae.model import DiscreteVAE

    root = tmp_path_factory.mktemp("generate")
    assert train_bpe.main(["--shapes", "400", "--vocab", "300", "--out", str(root / "tokenizer.json")]) == 0
    tok = TextTokenizer.from_file(root / "tokenizer.json")
    torch.manual_seed(0)
    save_pretrained(DiscreteVAE(tiny_config("dvae", downsample=8)), root / "dvae")  # the tiny transformer's 4x4 grid
    dalle = DALLE(tiny_config("dalle", text_vocab_size=tok.vocab_size, n_layer=2))

    def extra(d):
        tok.save(d / "tokenizer.json")
        (d / "dvae.json").write_text(json.dumps({"path": str(root / "dvae")}))
    save_pretrained(dalle, root / "model", extra=extra)
    reranker = Reranker(tiny_config("reranker", text_vocab_size=tok.vocab_size, layers=1, embed_dim=16))
    save_pretrained(reranker, root / "reranker", extra=lambda d: tok.save(d / "tokenizer.json"))
    return root
