"""Readers for (image, caption) pairs: a folder reader, a webdataset reader and a skip-counting collate.

Every reader yields the project's common sample format::

    {"image": FloatTensor (3, H, W) in [0, 1], "caption": str, "key": str[, "meta": str][, "captions": [str]]}

("meta" is the raw text of a ``name.json`` / ``key.json`` side file when there is one; "captions" all the
caption lines "caption" was drawn from.)

Bad samples and skip counting (one design for both readers): a sample that cannot be used (unreadable,
corrupt or truncated image, an image whose header says more than ``max_pixels`` pixels, no image,
missing or empty caption) is logged with one warning line on the
``dalle.data`` logger and then travels on as ``None`` instead of a dict. :func:`collate_skip_bad` drops
the ``None``\\ s and records how many it dropped in ``batch["skipped"]``. Because the count rides inside
the batch, the main process sees it even when loading runs in DataLoader worker processes. Use these
readers with ``DataLoader(..., collate_fn=collate_skip_bad)``; iterating them directly yields the
``None``\\ s too. Only failures of a whole shard (an unreadable tar) cannot be counted per sample; they
are logged and the rest of that shard is skipped. A caption with bytes that are not UTF-8 is still used
(they become U+FFFD) but is warned about and counted in ``batch["non_utf8_captions"]``.

Randomness is always drawn from ``random.Random(per-sample seed)``, never from global RNGs, so output is
bitwise reproducible. Seeds come from :func:`sample_seed` (blake2b, not Python's salted ``hash()``).
The augmentation follows the transform passed in (see ``transforms.py``: Listings 1 and 2 of the DALL-E
paper, arXiv 2102.12092).
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener
from webdataset.utils import pytorch_worker_info

from dalle.data.transforms import WHITE, to_rgb

logger = logging.getLogger("dalle.data")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_IMAGE_GLOB = "|".join(f"*.{e}" for e in IMAGE_EXTENSIONS)

Transform = Callable[[Image.Image, random.Random], torch.Tensor]
Sample = dict[str, Any]
NON_UTF8 = "non_utf8_caption"  # a sample's flag, summed by collate_skip_bad into batch["non_utf8_captions"]


def default_max_pixels(image_size: int) -> int:
    """The largest image (width x height, from its header) decoded for training at `image_size`.

    Decoding and converting to RGB costs 8 bytes a pixel of peak memory per DataLoader worker, whatever the
    file's size (measured: a black 12000x12000 PNG of 410 KiB raised peak RSS by 1.09 GiB). 2**25 (33.5 MP,
    e.g. 8192x4096: 0.25 GiB) admits every camera photo up to 24 MP (6000x4000) and stays well under PIL's
    own 89 MP warning; 64 * image_size**2 (8x the side) only raises it for models trained above 724 pixels.
    """
    return max(64 * image_size**2, 2**25)


class ImageTooLarge(ValueError):
    pass


def sample_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _one_line(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn}".replace("\n", " ")


def _caption_lines(text: str) -> list[str]:
    """Non-blank lines of a caption file, stripped; one of them is picked per sample draw."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _load_rgb(data: str | bytes, max_pixels: int, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open a path or encoded bytes and fully decode to RGB (load() so truncation fails here), transparent
    parts over `background`. Refuses, before decoding, an image whose header says more than `max_pixels`
    pixels (a decompression bomb)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:  # reads the header only
        if im.width * im.height > max_pixels:
            raise ImageTooLarge(f"{im.width}x{im.height} = {im.width * im.height:,} pixels, over "
                                f"data.max_pixels {max_pixels:,}")
        im.load()
        img = to_rgb(im, background)
        img.load()
    return img


def collate_skip_bad(samples: Sequence[Sample | None]) -> dict[str, Any]:
    """Collate reader samples, dropping ``None`` (bad) samples and counting them.

    Returns a dict with ``"skipped"`` (int: number of ``None``\\ s dropped) and, when at least one sample
    was good, one entry per sample key: tensors are stacked (``"image"`` becomes (B, 3, H, W)), anything
    else becomes a list. A key missing from some samples (e.g. ``"meta"``) gives ``None`` in their slots.
    When every sample was bad the result is just ``{"skipped": n}`` (no ``"image"`` key): callers should
    count it and move on. ``"non_utf8_captions"`` (int) is there when a caption had bytes that are not UTF-8.
    """
    good = [s for s in samples if s is not None]
    batch: dict[str, Any] = {"skipped": len(samples) - len(good)}
    replaced = sum(bool(s.get(NON_UTF8)) for s in good)
    if replaced:
        batch["non_utf8_captions"] = replaced
    if not good:
        return batch
    keys: dict[str, None] = {}
    for s in good:
        keys.update(dict.fromkeys(s))
    keys.pop(NON_UTF8, None)
    for k in keys:
        values = [s.get(k) for s in good]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[k] = torch.stack(values)
        else:
            batch[k] = values
    return batch


# --------------------------------------------------------------------------------------------- folder


@dataclass(frozen=True)
class FolderEntry:
    """One usable image found by :func:`scan_image_text_folder` (paths are absolute strings)."""

    key: str
    image: str
    caption: str | None
    meta: str | None


def scan_image_text_folder(
    root: str | os.PathLike[str], *, require_captions: bool = True, quiet: bool = False
) -> tuple[list[FolderEntry], list[tuple[str, str]]]:
    """Find ``name.{jpg,jpeg,png,webp}`` (any case) under ``root`` with ``name.txt`` / ``name.json``.

    The walk is sorted, so the order is deterministic. Returns ``(entries, skipped)`` where ``skipped``
    lists ``(image path, reason)`` for images dropped because their caption was missing or empty (only
    when ``require_captions``). Logs one warning per skipped image, one per caption file that is not
    UTF-8 (used, its bad bytes read as U+FFFD) and a summary; with ``quiet`` (a second scan of the same
    folder, e.g. validating on the training data) these go to the debug level. Keys are the image's
    path relative to ``root`` without extension (posix separators); when two images share a name
    (``a.jpg`` and ``a.png``) the later one's key gets ``_<ext>`` appended.
    Raises ``ValueError`` when ``root`` is missing or holds no usable image.
    """
    root = os.path.abspath(os.fspath(root))
    warn = logger.debug if quiet else logger.warning
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    entries: list[FolderEntry] = []
    skipped: list[tuple[str, str]] = []
    used_keys: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        by_name = {f: os.path.join(dirpath, f) for f in filenames}
        side = {}  # (stem, ".txt"/".json") -> file name, extension matched case-insensitively
        for f in filenames:
            stem, ext = os.path.splitext(f)
            if ext.lower() in (".txt", ".json"):
                side.setdefault((stem, ext.lower()), f)
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if ext[1:].lower() not in IMAGE_EXTENSIONS:
                continue
            image = by_name[f]
            txt = side.get((stem, ".txt"))
            caption = by_name[txt] if txt else None
            reason = f"no caption file {stem}.txt" if caption is None else ""
            if caption is not None:
                try:
                    lines, utf8 = _read_caption(caption)
                    reason = "" if lines else f"empty caption file {txt}"
                    if lines and not utf8:
                        warn("caption file %s is not UTF-8: its undecodable bytes are read as U+FFFD (save it "
                             "as UTF-8)", caption)
                except OSError as exn:
                    reason = f"unreadable caption file {txt}: {_one_line(exn)}"
            if reason and require_captions:
                warn("skipping image without caption: %s (%s)", image, reason)
                skipped.append((image, reason))
                continue
            js = side.get((stem, ".json"))
            rel = os.path.relpath(os.path.join(dirpath, stem), root).replace(os.sep, "/")
            key = rel if rel not in used_keys else f"{rel}_{ext[1:].lower()}"
            used_keys.add(key)
            entries.append(FolderEntry(key, image, caption, by_name[js] if js else None))
    n_all = len(entries) + len(skipped)
    log = warn if skipped else logger.info
    log(
        "%s: using %d images, skipped %d of %d without a usable caption",
        root,
        len(entries),
        len(skipped),
        n_all,
    )
    if not entries and require_captions:
        raise ValueError(
            f"no images ({_IMAGE_GLOB}) with captions found under {root}; each image needs a caption file "
            "name.txt beside it, or pass require_captions=False"
        )
    if not entries:
        raise ValueError(f"no images ({_IMAGE_GLOB}) found under {root}")
    return entries, skipped


def _read_text(path: str) -> str:
    # utf-8-sig drops a BOM; undecodable bytes are replaced rather than making the caption unusable.
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return f.read()


def _decode_caption(data: bytes) -> tuple[list[str], bool]:
    """A caption file's lines, and whether it was valid UTF-8 (if not, bad bytes become U+FFFD: a Latin-1
    "café" still teaches "caf", where skipping it would lose the image)."""
    try:
        return _caption_lines(data.decode("utf-8-sig")), True
    except UnicodeDecodeError:
        return _caption_lines(data.decode("utf-8-sig", errors="replace")), False


def _read_caption(path: str) -> tuple[list[str], bool]:
    with open(path, "rb") as f:
        return _decode_caption(f.read())


class ImageTextFolder(Dataset):
    """Map-style dataset over a folder of ``name.jpg`` + ``name.txt`` pairs (recursive, sorted).

    ``dataset[(i, sample_seed)]`` draws all randomness (caption line, transform) from
    ``random.Random(sample_seed)``, so that a sampler can make resumed runs bitwise identical;
    ``dataset[i]`` uses a seed derived from ``(seed, epoch, i)`` (see :meth:`set_epoch`). Returns ``None``
    (after one warning line) for an image PIL cannot open, decode or convert; use
    :func:`collate_skip_bad` as the DataLoader's ``collate_fn``.
    """

    accepts_seed = True  # the training engine passes (index, sample_seed) keys

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform,
        *,
        require_captions: bool = True,
        seed: int = 0,
        max_pixels: int = default_max_pixels(0),
        quiet: bool = False,
        background: tuple[int, int, int] = WHITE,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.background = background
        self.transform = transform
        self.require_captions = require_captions
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self.entries, self.skipped_at_scan = scan_image_text_folder(
            self.root, require_captions=require_captions, quiet=quiet
        )

    @property
    def num_skipped_at_scan(self) -> int:
        return len(self.skipped_at_scan)

    def __len__(self) -> int:
        return len(self.entries)

    def _resolve(self, item: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(item, tuple):
            index, seed = item
            return int(index), int(seed)
        index = int(item)
        if index < 0:
            index += len(self.entries)
        return index, sample_seed("folder", self.seed, self.epoch, index)

    def set_epoch(self, epoch: int) -> None:
        """Vary the seeds of int indices per epoch (not needed when a sampler passes (index, seed))."""
        self.epoch = int(epoch)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample | None:
        index, seed = self._resolve(item)
        entry = self.entries[index]
        rng = random.Random(seed)
        caption, utf8 = "", True
        if entry.caption is not None:
            try:
                lines, utf8 = _read_caption(entry.caption)  # the scan warned if not UTF-8
            except OSError as exn:
                lines = []
                logger.warning("unreadable caption file %s (%s)", entry.caption, _one_line(exn))
            if lines:
                caption = rng.choice(lines)
            elif self.require_captions:  # the file changed (or vanished) since the scan
                logger.warning(
                    "skipping %s: caption file %s is now empty or unreadable", entry.image, entry.caption
                )
                return None
        try:
            img = _load_rgb(entry.image, self.max_pixels, self.background)
        except Exception as exn:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...)
            logger.warning("skipping unreadable image %s (%s)", entry.image, _one_line(exn))
            return None
        sample: Sample = {"image": self.transform(img, rng), "caption": caption, "key": entry.key}
        if not utf8:
            sample[NON_UTF8] = True
        if caption:  # every line, for tools that keep them all (pretokenize)
            sample["captions"] = lines
        if entry.meta is not None:
            try:
                sample["meta"] = _read_text(entry.meta)
            except OSError as exn:
                logger.warning("ignoring unreadable metadata %s (%s)", entry.meta, _one_line(exn))
        return sample


# ----------------------------------------------------------------------------------------- webdataset


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shard_urls(urls: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """Expand brace patterns (``data/{000000..000009}.tar``), globs and directories (all ``*.tar`` in it).

    Local shards are checked to exist; remote URLs (``scheme://``, ``pipe:``) pass unchecked. Raises
    ``ValueError`` naming the pattern for an empty list, a pattern matching nothing, or missing shards.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not patterns:
        raise ValueError(
            "empty shard list: expected tar shard paths or a brace pattern like data/{000000..000009}.tar"
        )
    result: list[str] = []
    for pattern in map(os.fspath, patterns):
        found: list[str] = []
        missing: list[str] = []
        for url in expand_urls(pattern):
            if _is_remote(url):
                found.append(url)
                continue
            path = url.removeprefix("file:")
            if os.path.isdir(path):
                found.extend(sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))))
            elif glob.has_magic(path):
                found.extend(sorted(glob.glob(path)))
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(path)
        if missing:
            raise ValueError(
                f"shard pattern {pattern!r}: {len(missing)} shard(s) do not exist, e.g. {missing[0]!r}"
            )
        if not found:
            raise ValueError(f"shard pattern {pattern!r} matches no files")
        result.extend(found)
    return result


def count_shard_samples(urls: str | Iterable[str]) -> int:
    """Number of distinct sample keys in local tar shards (reads headers only; no decoding)."""
    total = 0
    for url in expand_shard_urls(urls):
        keys: set[str] = set()
        with tarfile.open(url, "r") as tar:
            for info in tar:
                if info.isreg():
                    key, _ = base_plus_ext(info.name)
                    if key is not None:
                        keys.add(key)
        total += len(keys)
    return total


def _log_shard_error(exn: Exception) -> bool:
    """webdataset handler for shard-level failures: log, skip the rest of that shard, go on."""
    logger.warning("webdataset: skipping rest of a shard after error (%s)", _one_line(exn))
    return True


class WebDatasetReader(wds.DataPipeline):
    """Iterable (image, caption) reader over webdataset shards in img2dataset's layout.

    A shard holds ``key.{jpg,jpeg,png,webp}``, ``key.txt`` and optionally ``key.json``. Pipeline:
    shard list (shuffled by a seed shared by all ranks when ``shard_shuffle``, which defaults to
    ``shuffle > 0``) -> ``wds.split_by_node`` -> ``wds.split_by_worker`` -> tar reading -> sample shuffle
    buffer of ``shuffle`` samples (raw bytes, before decoding) -> decode + transform. With ``resampled``,
    each rank/worker instead draws shards with replacement forever (no splitting); give ``epoch_length``
    (samples per worker per epoch, via ``with_epoch``) then.

    Every seed is derived from ``(seed, epoch, ...)``: the shard order from the epoch, the shuffle buffer
    also from rank and worker, and a sample's augmentation from its key. Call :meth:`set_epoch` before each
    epoch to vary them (workers copy the dataset at the start of each epoch unless persistent_workers).
    Bad samples come out as ``None`` (see the module docstring).
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        transform: Transform,
        *,
        shuffle: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
        require_captions: bool = True,
        shard_shuffle: bool | None = None,
        max_pixels: int = default_max_pixels(0),
        background: tuple[int, int, int] = WHITE,
    ) -> None:
        super().__init__()
        self.max_pixels = max_pixels
        self.background = background
        self._warned_non_utf8: set[str] = set()  # one warning per sample and process, not one per epoch
        self.urls = expand_shard_urls(urls)
        self.transform = transform
        self.shuffle_buffer = int(shuffle)
        self.seed = seed
        self.resampled = resampled
        self.require_captions = require_captions
        self.shard_shuffle = self.shuffle_buffer > 0 if shard_shuffle is None else shard_shuffle
        self.epoch = 0
        self._passes = 0  # iterator1() calls in this process: with_epoch() repeats the pipeline
        if resampled:
            self.append(self._resampled_shards)
        else:
            self.append(self._shard_list)
            self.append(wds.split_by_node)
            self.append(wds.split_by_worker)
        self.append(self._read_tars)
        if self.shuffle_buffer > 1:
            self.append(self._shuffle)
        self.append(self._decode)
        if epoch_length is not None:
            self.with_epoch(int(epoch_length))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds shard order, shuffle buffer and augmentation (call before iter)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        # Each __iter__ is one epoch; counting passes from 0 here makes the stream the same whether
        # iteration runs in this process (num_workers=0) or in fresh copies in worker processes.
        self._passes = 0
        return super().__iter__()

    def iterator1(self) -> Iterator[Any]:
        self._passes += 1
        return super().iterator1()

    def _shard_list(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shard_shuffle:
            # Same permutation on every rank and worker (no rank in the seed), so the split stays disjoint.
            random.Random(sample_seed("shards", self.seed, self.epoch, self._passes)).shuffle(urls)
        rank, world, worker, workers = pytorch_worker_info()
        if self._passes == 1 and not urls[rank::world][worker::workers]:
            msg = "rank %d worker %d gets no shards: %d shards for %d ranks x %d workers"
            logger.warning(msg, rank, worker, len(urls), world, workers)
        return iter([{"url": u} for u in urls])

    @staticmethod
    def _read_tars(src: Iterable[dict[str, str]]) -> Iterator[Sample]:
        # wds.tarfile_to_samples, except that each shard's file is closed once it has been read
        # (webdataset 1.0.2 leaves them open until garbage collection: ResourceWarnings, open fds).
        def opened(urls: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
            for source in url_opener(urls, handler=_log_shard_error):
                try:
                    yield source
                finally:  # runs when the next shard is requested or the stream is abandoned
                    source["stream"].close()

        files = tar_file_expander(opened(src), handler=_log_shard_error)
        return group_by_keys(files, handler=_log_shard_error)

    def _resampled_shards(self) -> Iterator[dict[str, str]]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(sample_seed("resample", self.seed, self.epoch, self._passes, rank, worker))
        while True:
            yield {"url": rng.choice(self.urls)}

    def _shuffle(self, src: Iterable[Sample]) -> Iterator[Sample]:
        rank, _, worker, _ = pytorch_worker_info()
        seed = sample_seed("buffer", self.seed, self.epoch, self._passes, rank, worker)
        return wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=seed)(src)

    def _decode(self, src: Iterable[Sample]) -> Iterator[Sample | None]:
        for raw in src:
            yield self.decode_sample(raw)

    def decode_sample(self, raw: Sample) -> Sample | None:
        """One raw webdataset sample (``{"__key__", "jpg", "txt", ...}``) to a reader sample or ``None``."""
        key = str(raw.get("__key__"))
        where = f"sample {key!r} in {raw.get('__url__')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            found = ",".join(sorted(k for k in raw if not k.startswith("__")))
            logger.warning("skipping webdataset %s: no image (found: %s)", where, found or "nothing")
            return None
        # _passes only differs from 1 when with_epoch() repeats the shards within one epoch.
        rng = random.Random(sample_seed("wds", self.seed, self.epoch, self._passes, key))
        lines, utf8 = _decode_caption(raw["txt"]) if "txt" in raw else ([], True)
        if lines and not utf8 and where not in self._warned_non_utf8:
            self._warned_non_utf8.add(where)
            logger.warning("webdataset %s: caption is not UTF-8: its undecodable bytes are read as U+FFFD", where)
        if not lines and self.require_captions:
            logger.warning("skipping webdataset %s: missing or empty caption", where)
            return None
        caption = rng.choice(lines) if lines else ""
        try:
            img = _load_rgb(raw[ext], self.max_pixels, self.background)
        except Exception as exn:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...)
            logger.warning("skipping webdataset %s: unreadable %s image (%s)", where, ext, _one_line(exn))
            return None
        sample: Sample = {"image": self.transform(img, rng), "caption": caption, "key": key}
        if not utf8:
            sample[NON_UTF8] = True
        if lines:  # every line, for tools that keep them all (pretokenize)
            sample["captions"] = lines
        if "json" in raw:
            sample["meta"] = raw["json"].decode("utf-8", errors="replace")
        return sample


# Function-style alias: webdataset_pairs(urls, transform, *, shuffle=1000, ...) builds a WebDatasetReader.
webdataset_pairs = WebDatasetReader
