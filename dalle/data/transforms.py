"""Image-mode conversion and the DALL-E paper's image preprocessing.

This module owns:

* :func:`to_rgb` - turns any PIL image (after applying its EXIF orientation) into 8-bit RGB.
* :class:`DVAETransform` - the dVAE training augmentation of Listing 1 in Ramesh et al. 2021,
  "Zero-Shot Text-to-Image Generation" (arXiv 2102.12092, appendix).
* :class:`DALLETransform` - the transformer training augmentation of Listing 2 of the same paper.
* :class:`EvalTransform` - a deterministic centre crop + area resize for validation and encoding.
* :func:`transform_from_name` - picks one of the three by name.
* :func:`parse_background` - a ``data.background`` value (a colour name or ``#rrggbb``) to an RGB tuple.

Every transform takes a PIL RGB image and a ``random.Random`` and returns a float tensor (3, S, S) in
[0, 1]. All random choices are drawn from that ``random.Random`` in a fixed order, never from a global
RNG, so a sample's output is a pure function of (image, per-sample seed).

Differences from the TensorFlow listings (documented, deliberate):

* "AREA" resizing is PIL's ``Image.BOX`` filter (the same area average for down-sampling).
* Images whose shorter side is below the target size would make the listings' random ranges empty
  (Listing 2's ``uniform(target_res, t_max + 1)`` with ``t_max < target_res``). We first up-sample
  such images with BICUBIC so that their shorter side equals the target size, keeping the aspect ratio.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "TRANSFORM_NAMES",
    "DALLETransform",
    "DVAETransform",
    "EvalTransform",
    "PREPROCESS_MODES",
    "parse_background",
    "pil_to_float_tensor",
    "to_rgb",
    "transform_from_name",
]

WHITE = (255, 255, 255)
# data.preprocess: "paper" crops at random by Listings 1 and 2 when training (and centre-crops when
# evaluating or encoding); "center" always takes the centre square, resized, with no random crop or flip,
# so an image that fills its frame (an icon, a logo, a glyph) is never cut at the edges.
PREPROCESS_MODES = ("paper", "center")


def parse_background(value: str) -> tuple[int, int, int]:
    """A colour name PIL knows ("white", "black", "gray") or "#rrggbb" -> (r, g, b); ValueError otherwise."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(value.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"data.background {value!r} is not a colour: use a name such as white or black, "
                         "or #rrggbb") from None
    return rgb[0], rgb[1], rgb[2]


def _composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Flatten an image with alpha (or a transparency key) over a plain background colour."""
    rgba = img.convert("RGBA")
    under = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(under, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit integer or float image to 8 bits by its nominal range.

    PIL's own ``convert("L")`` clips these modes at 255 instead of scaling, which turns most 16-bit
    images white. Ranges used: ``I;16*`` is 0..65535; ``I`` (32-bit int) is treated as 16-bit when its
    values fit in 0..65535 (how 16-bit PNG/TIFF data often arrives) and min..max otherwise; ``F`` is
    0..1 when its values fit there and min..max otherwise.
    """
    arr = np.asarray(img).astype(np.float64)
    if arr.size == 0:
        return Image.new("RGB", img.size)
    lo, hi = float(arr.min()), float(arr.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    if hi <= lo:  # constant image outside the nominal range: map to black rather than divide by 0
        scaled = np.zeros_like(arr)
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image, after applying its EXIF orientation.

    * alpha (RGBA, LA, PA, ...) and palette/grey/RGB images with a transparency key are composited
      over ``background`` (white unless ``data.background`` says otherwise), so transparent regions do
      not turn black;
    * 16-bit and 32-bit modes (``I;16``, ``I``, ``F``) are scaled to 0..255 (see
      :func:`_high_bit_depth_to_rgb`) instead of being clipped;
    * everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) uses PIL's convert.

    Raises whatever PIL raises for unreadable or truncated data (callers catch and skip).
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite(img, background)
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        return _composite(img, background)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    if mode == "RGB":
        return img
    return img.convert("RGB")


def pil_to_float_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image to a float32 tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _ensure_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else to_rgb(img)


def _upsample_to_min_side(img: Image.Image, size: int) -> Image.Image:
    """Up-sample (BICUBIC) so that the shorter side is at least ``size``; keeps the aspect ratio."""
    w, h = img.size
    s_min = min(w, h)
    if s_min >= size:
        return img
    new_w = max(size, round(w * size / s_min))
    new_h = max(size, round(h * size / s_min))
    return img.resize((new_w, new_h), Image.BICUBIC)


def _area_resize_square(img: Image.Image, t: int) -> Image.Image:
    """Area (BOX) resize of a square image to t x t; a no-op when it already has that size."""
    if img.size == (t, t):
        return img
    return img.resize((t, t), Image.BOX)


def _random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Uniform random size x size crop, like ``tf.image.random_crop`` (offsets inclusive)."""
    w, h = img.size
    top = rng.randint(0, h - size)
    left = rng.randint(0, w - size)
    return img.crop((left, top, left + size, top + size))


class DVAETransform:
    """Listing 1 (dVAE training), returns (3, size, size) in [0, 1].

    1. random square crop of side ``s_min = min(h, w)``;
    2. ``t`` uniform in ``[min(s_min, round(9/8 size)), min(s_min, round(12/8 size))]`` (inclusive);
    3. area resize to t x t;  4. random size x size crop;  5. random horizontal flip.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        size = self.size
        img = _upsample_to_min_side(_ensure_rgb(img), size)
        w, h = img.size
        s_min = min(w, h)
        img = _random_crop(img, s_min, rng)
        t_min = min(s_min, round(9 / 8 * size))
        t_max = min(s_min, round(12 / 8 * size))
        t = rng.randint(t_min, t_max)
        img = _area_resize_square(img, t)
        img = _random_crop(img, size, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_float_tensor(img)

    def __repr__(self) -> str:
        return f"DVAETransform(size={self.size})"


class DALLETransform:
    """Listing 2 (transformer training), returns (3, size, size) in [0, 1].

    1. square crop of side ``s_min`` with offsets drawn from ``[3 d // 8, max(3 d // 8 + 1, 5 d // 8))``
       where ``d`` is ``h - s_min`` (resp. ``w - s_min``): a near-centre crop;
    2. ``t`` uniform in ``[size, min(s_min, round(9/8 size))]`` (inclusive);
    3. area resize to t x t;  4. random size x size crop.

    No horizontal flip: captions may mention left/right and images may contain text.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        size = self.size
        img = _upsample_to_min_side(_ensure_rgb(img), size)
        w, h = img.size
        s_min = min(w, h)
        dh, dw = h - s_min, w - s_min
        # randrange's stop is exclusive, matching tf.random.uniform's maxval for integers.
        off_h = rng.randrange(3 * dh // 8, max(3 * dh // 8 + 1, 5 * dh // 8))
        off_w = rng.randrange(3 * dw // 8, max(3 * dw // 8 + 1, 5 * dw // 8))
        img = img.crop((off_w, off_h, off_w + s_min, off_h + s_min))
        t_max = min(s_min, round(9 / 8 * size))
        t = rng.randint(size, t_max)
        img = _area_resize_square(img, t)
        img = _random_crop(img, size, rng)
        return pil_to_float_tensor(img)

    def __repr__(self) -> str:
        return f"DALLETransform(size={self.size})"


class EvalTransform:
    """Deterministic centre square crop + resize to size x size (area for down-, BICUBIC for up-sampling).

    Accepts an ``rng`` for interface compatibility and ignores it.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = _ensure_rgb(img)
        w, h = img.size
        s_min = min(w, h)
        top, left = (h - s_min) // 2, (w - s_min) // 2
        img = img.crop((left, top, left + s_min, top + s_min))
        if s_min < self.size:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        else:
            img = _area_resize_square(img, self.size)
        return pil_to_float_tensor(img)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


Transform = Callable[[Image.Image, random.Random], torch.Tensor]

_TRANSFORMS: dict[str, type] = {"dvae": DVAETransform, "dalle": DALLETransform, "eval": EvalTransform}
TRANSFORM_NAMES: tuple[str, ...] = tuple(_TRANSFORMS)


def transform_from_name(name: str, size: int, preprocess: str = "paper"
                        ) -> DVAETransform | DALLETransform | EvalTransform:
    """``"dvae"`` -> :class:`DVAETransform`, ``"dalle"`` -> :class:`DALLETransform`,
    ``"eval"`` -> :class:`EvalTransform`; any other name raises ``ValueError``. With ``preprocess``
    ``"center"`` every name gives the :class:`EvalTransform` (see :data:`PREPROCESS_MODES`)."""
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"data.preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if preprocess == "center" and name in _TRANSFORMS:
        name = "eval"
    try:
        cls = _TRANSFORMS[name]
    except KeyError:
        valid = ", ".join(repr(n) for n in TRANSFORM_NAMES)
        raise ValueError(f"unknown transform {name!r}; valid names: {valid}") from None
    return cls(size)
