"""How close a result is to a reference: PSNR, SSIM and the latent comparison a report gives."""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["LatentComparison", "compare_latents", "finite_or_none", "psnr", "ssim"]


def psnr(test: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> float:
    """PSNR in dB of ``test`` against ``reference`` (``inf`` when identical), computed in float64.
    ``data_range`` defaults to the reference's max - min; give 1.0 for images in [0, 1]."""
    test = test.double()
    reference = reference.double()
    mse = torch.mean((test - reference) ** 2).item()
    if mse == 0:
        return math.inf
    if data_range is None:
        data_range = (reference.max() - reference.min()).item()
    return 10.0 * math.log10(data_range**2 / mse)


def finite_or_none(value: float) -> float | None:
    """``None`` for an infinite PSNR (identical inputs), so it can go into JSON."""
    return None if math.isinf(value) else value


@dataclasses.dataclass(frozen=True)
class LatentComparison:
    """A final latent against a reference latent of the same shape."""

    psnr_db: float | None  # range of the reference; None when identical
    max_abs_diff: float
    identical: bool


def compare_latents(test: torch.Tensor, reference: torch.Tensor) -> LatentComparison:
    return LatentComparison(
        psnr_db=finite_or_none(psnr(test, reference)),
        max_abs_diff=float((test - reference).abs().max()),
        identical=bool(torch.equal(test, reference)),
    )


def ssim(test: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two images ``(C, H, W)`` in [0, 1] (Wang et al. 2004):
    Gaussian-weighted local means, variances and covariance per channel over valid windows,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``; 1.0 for identical images."""
    if test.shape != reference.shape or test.dim() != 3:
        raise ValueError(f"ssim needs two (C, H, W) images of one shape, got {tuple(test.shape)} and {tuple(reference.shape)}")
    x = test.double().unsqueeze(0)
    y = reference.double().unsqueeze(0)
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())
