"""The dVAE training objective for the shared engine (paper sec. 2.1, appendix A.2).

Loss at step k: reconstruction NLL of the decoder's output for gumbel-softmax samples at temperature
tau(k), plus beta(k) times the KL from the encoder's posterior to the uniform prior. Evaluation uses
argmax codes without noise, as generation will: PSNR, codebook perplexity, share of codes used, and a
grid of originals over reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dalle.data.sources import eval_batches
from dvae import schedules
from dvae.losses import (
    codebook_usage,
    gradient_difference_loss,
    kl_to_uniform,
    logit_laplace_nll,
    mse_loss,
    psnr,
    usage_kl_to_uniform,
)
from dvae.model import DiscreteVAE

if TYPE_CHECKING:
    from dalle.train.engine import EvalSink


@dataclass(frozen=True)
class DVAEObjective:
    temp_start: float = 1.0
    temp_end: float = 1 / 16
    temp_steps: int = 150_000  # the paper anneals over the first 150k of 1.2M updates
    kl_start: float = 0.0
    kl_end: float = 6.6
    kl_steps: int = 5_000
    usage_weight: float = 0.0  # weight of the codebook-usage term (0 in the paper; see losses.usage_kl_to_uniform)
    usage_hard: bool = False  # usage term over straight-through argmax codes instead of the mean softmax
    gumbel_noise: float = 1.0  # scale of the relaxation's gumbel noise (1: the paper; 0: none)
    straight_through: bool = False  # decoder sees one-hot codes, encoder gets the soft gradient (not the paper)
    edge_weight: float = 0.0  # weight of the gradient-difference term (0 in the paper; see losses)
    eval_images: int = 1024  # held-out images for PSNR and codebook statistics
    grid_images: int = 16  # originals over reconstructions in the saved grid

    def __post_init__(self) -> None:
        if self.temp_end <= 0 or self.temp_start <= 0:
            raise ValueError(f"temperatures must be positive, got {self.temp_start} -> {self.temp_end}")


def _channels_last(model: nn.Module) -> bool:
    # None under ZeRO-3, whose partitioned parameters are flat: DeepSpeed made them contiguous anyway
    w = next((p for p in model.parameters() if p.ndim == 4), None)
    return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


class DVAETask:
    best_metric = ("psnr", "max")  # held-out reconstruction PSNR: checkpoints/best and early stopping

    def __init__(self, model: DiscreteVAE, objective: DVAEObjective, train: Dataset, val: Dataset) -> None:
        self.model, self.objective, self.train, self.val = model, objective, train, val

    def train_dataset(self) -> Dataset:
        return self.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def schedules(self, step: int) -> tuple[float, float]:
        o = self.objective
        return (schedules.temperature(step, o.temp_start, o.temp_end, o.temp_steps),
                schedules.kl_weight(step, o.kl_start, o.kl_end, o.kl_steps))

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        images = batch["image"]
        if _channels_last(model):  # train.channels_last: the inputs take the weights' layout
            images = images.contiguous(memory_format=torch.channels_last)
        tau, beta = self.schedules(step)
        logits, stats = model(images, tau, noise=self.objective.gumbel_noise,
                              hard=self.objective.straight_through)
        cfg = model.config
        rec = logit_laplace_nll(images, stats) if cfg.loss == "logit_laplace" else mse_loss(images, stats)
        kl = kl_to_uniform(logits, images[0].numel())
        loss = rec + beta * kl
        metrics = {"rec": rec.item(), "kl": kl.item(), "temperature": tau, "kl_weight": beta}
        if self.objective.usage_weight:
            usage = usage_kl_to_uniform(logits, images[0].numel(), hard=self.objective.usage_hard)
            loss = loss + self.objective.usage_weight * usage
            metrics["usage_kl"] = usage.item()
        if self.objective.edge_weight:
            edge = gradient_difference_loss(images, model.stats_to_images(stats, clamp=False))
            loss = loss + self.objective.edge_weight * edge
            metrics["edge"] = edge.item()
        return loss, metrics

    def evaluate(self, model: nn.Module, step: int, sink: EvalSink) -> dict[str, float]:
        o = self.objective
        metrics, shown = reconstruction_metrics(model, self.val, o.eval_images, grid_images=o.grid_images)
        if shown is not None:
            from torchvision.utils import make_grid

            sink.image("reconstructions", step, make_grid(shown, nrow=len(shown) // 2, padding=1))
        return {k: v for k, v in metrics.items() if k != "images"}


@torch.no_grad()
def reconstruction_metrics(model: DiscreteVAE, dataset: Dataset, n: int, *, batch_size: int = 64,
                           grid_images: int = 16) -> tuple[dict[str, float], Tensor | None]:
    """PSNR of argmax-code reconstructions, codebook perplexity and share of codes used over the first
    `n` images; also the first `grid_images` originals followed by their reconstructions."""
    device = next(model.parameters()).device
    psnrs, codes, shown = [], [], None
    for batch in eval_batches(dataset, n, batch_size):
        images = batch["image"].to(device)
        z = model.encode(images)
        rec = model.decode(z)
        psnrs.append(psnr(images, rec).cpu())
        codes.append(z.cpu())
        if shown is None:
            k = min(grid_images, len(images))
            shown = torch.cat([images[:k], rec[:k]]).float().cpu()
    if not psnrs:
        raise ValueError("no readable images to evaluate")
    perplexity, used = codebook_usage(torch.cat(codes), model.config.vocab_size)
    all_psnr = torch.cat(psnrs)
    return {"psnr": float(all_psnr.mean()), "perplexity": perplexity, "codes_used": used,
            "images": len(all_psnr)}, shown
