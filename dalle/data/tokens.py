"""Pre-tokenised training data for the transformer: image codes from the dVAE, stored once.

A token directory holds shards of `n` samples each:

    meta.json                  {"grid": 8, "image_vocab_size": 512, "count": ..., "shards": [...], "dvae": {...}}
    tokens-000000.safetensors  "codes": (n, G, G) int16 (int32 for vocabularies over 32767)
    tokens-000000.jsonl        one {"key": ..., "captions": [...][, "qa": [[question, answer], ...]]} per sample

Codes are memory-mapped, so a data set far larger than RAM reads only the rows it samples; captions
stay text so the tokenizer (and its BPE dropout) is applied at load time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

META = "meta.json"


class TokenShardWriter:
    """Appends (key, captions, codes) samples and writes a shard every `shard_size` samples."""

    def __init__(self, directory: str | Path, *, grid: int, image_vocab_size: int, shard_size: int = 100_000,
                 dvae: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / META).exists():
            raise FileExistsError(f"{self.dir} already holds pre-tokenised data; choose another --out")
        self.grid, self.vocab, self.shard_size, self.dvae = grid, image_vocab_size, shard_size, dvae or {}
        self.dtype = torch.int16 if image_vocab_size <= 32767 else torch.int32
        self.codes: list[torch.Tensor] = []
        self.records: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, keys: list[str], captions: list[list[str]], codes: torch.Tensor,
            qa: list[list[tuple[str, str]]] | None = None) -> None:
        """codes: (b, G, G) integers in [0, image_vocab_size); qa: each sample's question-answer pairs, if any."""
        if codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"codes must be (b, {self.grid}, {self.grid}), got {tuple(codes.shape)}")
        for i, key in enumerate(keys):
            self.codes.append(codes[i].to("cpu", self.dtype))
            record: dict[str, Any] = {"key": key, "captions": captions[i]}
            if qa is not None and qa[i]:
                record["qa"] = [list(pair) for pair in qa[i]]
            self.records.append(record)
            if len(self.codes) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.codes:
            return
        name = f"tokens-{len(self.shards):06d}"
        save_file({"codes": torch.stack(self.codes)}, str(self.dir / f"{name}.safetensors"))
        with (self.dir / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self.shards.append({"name": name, "count": len(self.codes)})
        self.codes, self.records = [], []

    def close(self) -> dict[str, Any]:
        self._flush()
        meta = {"grid": self.grid, "image_vocab_size": self.vocab, "count": sum(s["count"] for s in self.shards),
                "shards": self.shards, "dvae": self.dvae}
        (self.dir / META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion
        return meta


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pre-tokenised data directory (no {META}); make one with "
                                "tools/pretokenize.py")
    return json.loads(path.read_text())


class TokenShards(Dataset):
    """Map-style data set over a token directory: {"codes": (N,) long, "caption": str, "key": str[, "qa": pairs]}.

    `dataset[(index, seed)]` picks one of the sample's captions with `random.Random(seed)`.
    """

    accepts_seed = True

    def __init__(self, directory: str | Path, *, limit: int | None = None) -> None:
        self.dir = Path(directory)
        self.meta = read_meta(self.dir)
        self.grid = self.meta["grid"]
        self.image_vocab_size = self.meta["image_vocab_size"]
        self.records: list[dict[str, Any]] = []
        self.index: list[tuple[int, int]] = []  # sample -> (shard, row)
        for s, shard in enumerate(self.meta["shards"]):
            with (self.dir / f"{shard['name']}.jsonl").open() as f:
                rows = [json.loads(line) for line in f]
            self._check_shard(shard["name"], len(rows))
            self.records += rows
            self.index += [(s, r) for r in range(len(rows))]
        if limit is not None:
            self.records, self.index = self.records[:limit], self.index[:limit]
        if not self.records:
            raise ValueError(f"{self.dir} holds no samples")
        self._handles: dict[int, Any] = {}

    def _check_shard(self, name: str, rows: int) -> None:
        """Read a shard's header now, so a damaged file is named before training starts rather than in a
        data-loader worker mid-run."""
        path = self.dir / f"{name}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())  # a safe_open handle has no __contains__
                shape = f.get_slice("codes").get_shape() if "codes" in names else None
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path} is not a readable token shard ({e}); make the directory again with "
                             "tools/pretokenize.py") from None
        if shape != [rows, self.grid, self.grid]:
            raise ValueError(f"{path} holds codes of shape {shape}, but its .jsonl lists {rows} samples on a "
                             f"{self.grid}x{self.grid} grid; make the directory again with tools/pretokenize.py")

    def __len__(self) -> int:
        return len(self.records)

    def _codes(self, shard: int, row: int) -> torch.Tensor:
        if shard not in self._handles:  # opened lazily, so each DataLoader worker maps its own
            name = self.meta["shards"][shard]["name"]
            self._handles[shard] = safe_open(str(self.dir / f"{name}.safetensors"), framework="pt")
        return self._handles[shard].get_slice("codes")[row : row + 1][0]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        record = self.records[index]
        caption = random.Random(seed).choice(record["captions"]) if record["captions"] else ""
        codes = self._codes(*self.index[index]).long().flatten()
        out = {"codes": codes, "caption": caption, "key": record["key"]}
        if "qa" in record:
            out["qa"] = record["qa"]
        return out

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}
