"""A deterministic detector for shapes images, and the comparison of what it finds with a prompt's scene.

Detection knows how the shapes data are drawn (dalle.data.shapes) and nothing learned:

1. Background: the median colour of the image's low-saturation pixels (the shapes background is grey;
   generated images may tint it).
2. Colour: every pixel is explained as a blend alpha * c + (1 - alpha) * background of one palette colour
   c; it takes the colour with the smallest residual, and counts as object when alpha >= 0.5. Blending is
   how anti-aliased edges arise, so edge pixels keep their colour.
3. Objects: 4-connected components of object pixels larger than `min_area_frac` of the image (objects in
   shapes scenes never touch), each coloured by an alpha-weighted vote of its pixels.
4. Shape: each of the six shapes is rendered into the component's bounding box with the generator's own
   drawing code; the one whose coverage overlaps the component's alpha map best (soft IoU) wins.
5. Size from the box side (threshold halfway between the two sizes), position from the centre, and a
   two-object relation from the axis along which the centres are farther apart: the rules the
   generator places objects by.

`compare(scene, mentions, objects)` then scores the attributes the caption mentions, the object count,
and the relation. Pure functions over arrays; no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dalle.data.shapes import COLOURS, SHAPES, SIZES, Mentions, Scene, ShapeObject, _draw

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
_NAMES = tuple(COLOURS)
_SUPERSAMPLE = 4
_YCC = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], dtype=np.float32)
_YCC_W = np.array([1.0, 0.25, 0.25], dtype=np.float32)  # luma over chroma


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str
    size: str
    position: str
    cx: float  # centre and bounding-box side in pixels
    cy: float
    extent: float
    area: int  # object pixels
    shape_iou: float  # soft IoU of the best shape template: how sure the shape is


def _background(img: np.ndarray) -> np.ndarray:
    sat = img.max(-1) - img.min(-1)
    grey = img[sat <= np.quantile(sat, 0.3) + 1e-6]
    return np.median(grey.reshape(-1, 3), axis=0)


def colour_map(img: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index of the palette colour that explains it best, and its blend weight alpha."""
    d = img[..., None, :] - background  # (H, W, 1, 3)
    c = _PALETTE - background  # (K, 3)
    alpha = np.clip((d * c).sum(-1) / np.maximum((c * c).sum(-1), 1e-6), 0, 1)  # (H, W, K)
    residual = ((d - alpha[..., None] * c) ** 2).sum(-1)
    # A pixel far from every blend line is no palette colour: penalise residuals, prefer strong alphas.
    idx = np.argmin(residual - 1e-3 * alpha, axis=-1)
    return idx, np.take_along_axis(alpha, idx[..., None], -1)[..., 0]


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (0 = background, 1.. = components)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    return labels


def _template(shape: str, cx: float, cy: float, extent: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of `shape` drawn as the generator draws it, at the image's resolution."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    _draw(ImageDraw.Draw(canvas), ShapeObject(shape, "red", "small", None, cx, cy, extent), _SUPERSAMPLE)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., 0] / COLOURS["red"][0]


def _smooth(x: np.ndarray) -> np.ndarray:
    """A 3x3 box blur: compares shapes, not pixel noise (JPEG ringing, a decoder's speckle)."""
    p = np.pad(x, 1, mode="edge")
    return sum(p[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3)) / 9


def classify_shape(alpha: np.ndarray, cx: float, cy: float, extent: float) -> tuple[str, float, float]:
    """(shape, soft IoU, fitted extent) of the template that overlaps `alpha` best. Thin parts (star
    points, cross arms) can fade below the box threshold (JPEG, a blurry decoder), so the box can be
    too small and off-centre: templates up to 4 px larger, shifted by up to a pixel, are tried too."""
    best = (SHAPES[0], -1.0, extent)
    alpha = _smooth(alpha)
    for shape in SHAPES:
        for e in (extent, extent + 1, extent + 2, extent + 3, extent + 4):
            t = _smooth(np.clip(_template(shape, cx, cy, e, alpha.shape[0]), 0, 1))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    a = np.roll(alpha, (-dy, -dx), axis=(0, 1))
                    iou = float(np.minimum(t, a).sum() / max(np.maximum(t, a).sum(), 1e-6))
                    if iou > best[1]:
                        best = (shape, iou, e)
    return best


def position_of(cx: float, cy: float, n: int) -> str:
    dx, dy = cx - n / 2, cy - n / 2
    if max(abs(dx), abs(dy)) < 0.1 * n:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation_of(a: Detected, b: Detected) -> str:
    """Relation of object a to object b along the axis on which they are farther apart."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def detect(image: np.ndarray, min_area_frac: float = 0.004) -> list[Detected]:
    """Objects in an RGB image (H, W, 3), uint8 or float in [0, 1], largest first."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square RGB image (N, N, 3), got shape {img.shape}")
    if img.max() <= 1.0 and image.dtype != np.uint8:
        img = img * 255
    n = img.shape[0]
    bg = _background(img)
    idx, alpha = colour_map(img, bg)
    size_cut = (SIZES["small"] + SIZES["large"]) / 2 * n
    labels = components(alpha >= 0.5)  # objects never touch, so colour can wait until each is found
    found = []
    for lab in range(1, labels.max() + 1):
        comp = labels == lab
        area = int(comp.sum())
        if area < min_area_frac * n * n:
            continue
        # Colour by an alpha-weighted vote: JPEG's halved chroma resolution smears edge colours.
        k = int(np.bincount(idx[comp], weights=alpha[comp], minlength=len(_NAMES)).argmax())
        c = _PALETTE[k] - bg
        ys, xs = np.nonzero(comp)
        m = 2
        window = (slice(max(ys.min() - m, 0), ys.max() + 1 + m), slice(max(xs.min() - m, 0), xs.max() + 1 + m))
        # The blend weight of that one colour over the component's neighbourhood, fringe included. Measured
        # mostly on luma: JPEG keeps chroma at half resolution, which eats the points of small stars.
        local = np.zeros_like(alpha)
        dy, cy = (img[window] - bg) @ _YCC.T, c @ _YCC.T
        local[window] = np.clip((dy * cy * _YCC_W).sum(-1) / max(float((cy * cy * _YCC_W).sum()), 1e-6), 0, 1)
        local[window] *= (labels[window] == lab) | (labels[window] == 0)  # not a neighbour's pixels
        ys, xs = np.nonzero(local >= 0.5)
        if not len(xs):  # a blend of palette colours that no one colour explains: keep the component
            local[window] = np.maximum(local[window], comp[window])
            ys, xs = np.nonzero(comp)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        shape, iou, extent = classify_shape(local, cx, cy, float(max(x1 - x0, y1 - y0)))
        found.append(Detected(_NAMES[k], shape, "large" if extent >= size_cut else "small", position_of(cx, cy, n),
                              cx, cy, extent, area, iou))
    return sorted(found, key=lambda d: -d.area)


@dataclass(frozen=True)
class Verdict:
    """How a detection matches a prompt's scene: per mentioned attribute, the count and the relation."""

    attributes: dict[str, list[bool]]  # attribute -> one bool per object that mentions it
    count: bool
    relation: bool | None  # None for one-object scenes
    read_as: tuple[str | None, ...] = ()  # the shape read for each scene object (None: no detection)

    @property
    def all_correct(self) -> bool:
        return self.count and self.relation is not False and all(all(v) for v in self.attributes.values())


def _matches(obj: ShapeObject, det: Detected | None, mentioned: tuple[str, ...]) -> dict[str, bool]:
    return {a: det is not None and getattr(det, a) == getattr(obj, a) for a in mentioned}


def compare(scene: Scene, mentions: Mentions, found: list[Detected]) -> Verdict:
    objects = scene.objects
    dets: list[Detected | None] = list(found[: len(objects)]) + [None] * max(0, len(objects) - len(found))
    if len(objects) == 2:  # the assignment of detections to prompt objects that agrees best
        swapped = [dets[1], dets[0]]
        score = lambda ds: sum(sum(_matches(o, d, m).values()) for o, d, m in zip(objects, ds, mentions))  # noqa: E731
        if score(swapped) > score(dets):
            dets = swapped
    attributes: dict[str, list[bool]] = {}
    for o, d, m in zip(objects, dets, mentions):
        for a, ok in _matches(o, d, m).items():
            attributes.setdefault(a, []).append(ok)
    relation = None
    if len(objects) == 2:
        relation = dets[0] is not None and dets[1] is not None and relation_of(dets[0], dets[1]) == scene.relation
    return Verdict(attributes, len(found) == len(objects), relation, tuple(d.shape if d else None for d in dets))
