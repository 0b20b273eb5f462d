import json
import os

import pytest
import torch

# Tests must not depend on how many cores the machine has, and must not fight over them.
torch.set_num_threads(int(os.environ.get("DALLE_TEST_THREADS", min(2, os.cpu_count() or 1))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """For generation and evaluation tests: an untrained transformer run (dVAE by pointer, no reranker)
    and a separate Reranker checkpoint, on 32x32 images."""
    from dalle.checkpoint import save_pretrained
    from dalle.reranker.model import Reranker, RerankerConfig
    from dalle.tokenizer import TextTokenizer
    from dalle.transformer.model import DALLE, DALLEConfig
    from dalle_tools import train_bpe
    from dvae.model import DiscreteVAE, DVAEConfig

    root = tmp_path_factory.mktemp("generate")
    assert train_bpe.main(["--shapes", "400", "--vocab", "300", "--out", str(root / "tokenizer.json")]) == 0
    tok = TextTokenizer.from_file(root / "tokenizer.json")
    torch.manual_seed(0)
    save_pretrained(DiscreteVAE(DVAEConfig(image_size=32, downsample=8, vocab_size=64, n_hid=8, n_blk_per_group=1,
                                           n_init=16)), root / "dvae")
    dalle = DALLE(DALLEConfig(text_vocab_size=tok.vocab_size, text_seq_len=12, image_vocab_size=64, image_grid_size=4,
                              n_embd=32, n_layer=2, n_head=4, conv_kernel=3))

    def extra(d):
        tok.save(d / "tokenizer.json")
        (d / "dvae.json").write_text(json.dumps({"path": str(root / "dvae")}))
    save_pretrained(dalle, root / "model", extra=extra)
    reranker = Reranker(RerankerConfig(text_vocab_size=tok.vocab_size, text_seq_len=16, image_size=32, patch_size=8,
                           stem="patch", width=32, layers=1, heads=2, embed_dim=16))
    save_pretrained(reranker, root / "reranker", extra=lambda d: tok.save(d / "tokenizer.json"))
    return root
