"""Frechet distance and Inception Score over image features (the paper's zero-shot FID, sec. 3.2).

Feature extractors turn uint8 images (N, 3, H, W) into (features (N, D), class probabilities (N, C)):

- `InceptionExtractor`: pytorch-fid's port of the TF Inception-v3 that published FIDs use, with its
  weights read from torch's hub cache or a given file; this module never downloads them. Images are
  resized to 299x299 with PIL's bicubic filter from uint8, as clean-fid does, then scaled to [-1, 1].
  Features: the 2048-d pool; probabilities: softmax of its 1008-way classifier (for the IS).
- `RerankerExtractor`: the project's reranker. Features: its image embeddings; probabilities: a zero-shot
  classifier over a set of captions (the unique captions of the evaluation set). Quick and needs no
  download, but its numbers are not comparable with published FIDs or ISs.

`floor_and_ceiling` puts a model's FID on a scale: the same distance for real training images against the
held-out ones (the floor: what a perfect model of the data would score at this N) and for the dVAE's
reconstructions of those training images (the ceiling stage 1 allows: the transformer can only pick
codes, so at best it draws such reconstructions).

`frechet_distance` works in float64 torch through one symmetric eigendecomposition, instead of scipy's
sqrtm (10-40 s for 2048-d on 2 cores); the tests check it against pytorch-fid's
`calculate_frechet_distance`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # the file pytorch-fid downloads elsewhere
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS


def statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    x = features.double()
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(x)}")
    return x.mean(0), torch.cov(x.T)


def _sqrt_psd(m: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). The eigenvalues of S1 S2 are those of the
    symmetric PSD matrix S1^1/2 S2 S1^1/2, so the trace needs one eigh, not a general sqrtm."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    r = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r @ s2 @ r).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts (Salimans et al. 2016)."""
    p = probs.double()
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def blur(images: Tensor, radius: float) -> Tensor:
    """Gaussian blur with sigma = radius (kernel 2 ceil(3r) + 1) of uint8 images, back to uint8: the
    paper's Fig. 9a compares FIDs after blurring both sets, which weighs coarse structure over detail."""
    if radius <= 0:
        return images
    k = 2 * math.ceil(3 * radius) + 1
    return gaussian_blur(images.float(), [k, k], [radius, radius]).round().clamp(0, 255).to(torch.uint8)


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """The local Inception weights file, or an error saying exactly where to put it."""
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"the FID Inception weights are not at {path}. This project never downloads at run time: fetch "
            f"{INCEPTION_URL} on a machine with internet and copy it to {path}, or pass its path with "
            "--inception-weights. For a quick comparison without it, use --features reranker.")
    return path


def fid_inception(weights: str | Path | None = None) -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3, built here rather than by `fid_inception_v3()`, whose weights go
    through torch.hub's unpickling loader (and a download). The weights file is a plain state dict of
    tensors, read with weights_only=True and checked key by key."""
    from pytorch_fid import inception as fid

    from dalle.checkpoint import load_tensor_file

    path = inception_weights_path(weights)
    state = load_tensor_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict of the FID Inception-v3 (got a {type(state).__name__})")
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in (("Mixed_5b", fid.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", fid.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", fid.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", fid.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", fid.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", fid.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", fid.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", fid.FIDInceptionE_1(1280)), ("Mixed_7c", fid.FIDInceptionE_2(2048))):
        setattr(net, name, block)  # the blocks in which the FID network differs from torchvision's
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise ValueError(f"{path} does not match the FID Inception-v3 ({detail}); pass "
                         f"pytorch-fid's {INCEPTION_WEIGHTS}") from None
    return net


class InceptionExtractor:
    name = "inception"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.net = fid_inception(weights).eval().to(device)
        self.device = device
        self._pool: Tensor | None = None
        self.net.avgpool.register_forward_hook(lambda _m, _i, out: setattr(self, "_pool", out.flatten(1)))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        resized = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((299, 299), Image.BICUBIC))
                   for im in images.cpu()]
        x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        logits = self.net(2 * x - 1)
        return self._pool.float().cpu(), F.softmax(logits.float(), dim=1).cpu()


class RerankerExtractor:
    """The project's reranker as a feature extractor; `labels` are the captions of its zero-shot classifier."""

    name = "reranker"

    def __init__(self, reranker, tokenizer, labels: list[str]) -> None:
        self.reranker, self.labels = reranker.eval(), sorted(set(labels))
        param = next(reranker.parameters())
        with torch.no_grad():
            texts = []
            for i in range(0, len(self.labels), 256):
                ids, _ = tokenizer.encode_batch(self.labels[i : i + 256], reranker.config.text_seq_len,
                                                truncate_warn=False)
                texts.append(reranker.encode_text(ids.to(param.device)).float())
        self.text = torch.cat(texts)  # (C, E), unit vectors

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        param = next(self.reranker.parameters())
        x = images.to(param.device).float() / 255
        size = self.reranker.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        emb = self.reranker.encode_image(x.to(param.dtype)).float()
        probs = F.softmax(self.reranker.scale().float() * emb @ self.text.T, dim=1)
        return emb.cpu(), probs.cpu()


def features_by_radius(images, extractor, radii: list[float], batch_size: int, desc: str = "features",
                       quiet: bool = True) -> tuple[dict[float, Tensor], Tensor | None]:
    """{radius: features (N, D)} and the unblurred class probabilities (N, C), in one pass over uint8 images."""
    feats: dict[float, list[Tensor]] = {r: [] for r in radii}
    probs = []
    batch: list[Tensor] = []

    def flush() -> None:
        x = torch.stack(batch)
        for r in radii:
            f, p = extractor(blur(x, r))
            feats[r].append(f)
            if r == 0:
                probs.append(p)
        batch.clear()

    for image in tqdm(images, desc=desc, disable=quiet):
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return {r: torch.cat(v) for r, v in feats.items()}, (torch.cat(probs) if probs else None)


@torch.no_grad()
def reconstruct(dvae, images: Tensor, batch_size: int = 64) -> Tensor:
    """uint8 images (N, 3, S, S) through the dVAE's codes and back: decode(encode(x)), as uint8."""
    param = next(dvae.parameters())
    out = []
    for part in images.split(batch_size):
        x = part.to(param.device, torch.float32) / 255
        out.append(dvae.decode(dvae.encode(x)).float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def floor_and_ceiling(extractor, held_out: dict[float, tuple[Tensor, Tensor]], train_images: Tensor, dvae, *,
                      batch_size: int = 64) -> dict[str, dict[float, float]]:
    """FID against the held-out statistics `held_out` ({blur radius: (mu, sigma)}) of real training images
    (the floor) and of the dVAE's reconstructions of those same images (the ceiling). Both are images the
    held-out set has not seen, as a model's samples are; the reconstructions are what a transformer that
    drew codes exactly like the data's would show. Pass as many training images as held-out ones: FID is
    biased by N, so only equal Ns compare."""
    radii = list(held_out)
    out = {}
    for name, images in (("floor", train_images), ("ceiling", reconstruct(dvae, train_images, batch_size))):
        feats, _ = features_by_radius(images, extractor, radii, batch_size)
        out[name] = {r: frechet_distance(*statistics(feats[r]), *held_out[r]) for r in radii}
    return out
