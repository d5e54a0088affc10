"""Losses: ``l2``, ``ssim`` and ``focal`` (DRAEM), ``color`` and ``psnr`` (DRAEM-improvement paper).

Reconstruction losses take (reconstruction, target), both (B, C, H, W) in [0, 1]; ``focal`` takes segmentation
logits (B, K, H, W) and an integer or {0, 1} mask (B, 1, H, W). Every loss returns a scalar.
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import Loss, in_float32


def _check_pair(prediction: Tensor, target: Tensor, who: str) -> None:
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise ValueError(f"{who} expects two (B, C, H, W) tensors of one shape, got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")


@in_float32
def l2_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error."""
    _check_pair(prediction, target, "l2")
    return F.mse_loss(prediction, target)


class L2Loss(Loss):
    """Mean squared error."""

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        return l2_loss(prediction, target)


@in_float32
def ssim_loss(prediction: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """1 - mean SSIM (Gaussian window ``window``, std ``sigma``, zero padding), as DRAEM's reference computes it
    (kornia's ``ssim`` pads differently at the borders)."""
    _check_pair(prediction, target, "ssim")
    return 1.0 - _ssim_map(prediction, target, window, sigma).mean()


def _ssim_map(x: Tensor, y: Tensor, window: int, sigma: float) -> Tensor:
    c1, c2 = 0.01**2, 0.03**2
    channels = x.shape[1]
    # the five local means in one separable Gaussian blur: a row pass then a column pass of ``window`` taps equal
    # the 2-D window (an outer product) with zero padding, at 2 * window multiplications a pixel where the 2-D
    # window takes window^2 (tests/test_losses.py compares it with a direct 2-D window)
    stacked = torch.cat((x, y, x * x, y * y, x * y), dim=1)
    taps = kornia.filters.get_gaussian_kernel1d(window, sigma).to(x).reshape(1, 1, 1, window)
    taps = taps.expand(stacked.shape[1], 1, 1, window)
    pad = window // 2
    blurred = F.conv2d(F.conv2d(stacked, taps, padding=(0, pad), groups=stacked.shape[1]), taps.transpose(2, 3),
                       padding=(pad, 0), groups=stacked.shape[1])
    mx, my, exx, eyy, exy = blurred.split(channels, dim=1)
    sxx, syy, sxy = exx - mx**2, eyy - my**2, exy - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


class SSIMLoss(Loss):
    """1 - mean SSIM with a Gaussian window."""

    def __init__(self, window: int = 11, sigma: float = 1.5):
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise ValueError("ssim window must be an odd integer >= 3")
        self.window, self.sigma = window, sigma

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        return ssim_loss(prediction, target, self.window, self.sigma)


@in_float32
def focal_loss(logits: Tensor, mask: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Focal loss on softmax probabilities (DRAEM's reference: label smoothing ``smooth``, no alpha).

    logits (B, K, H, W); mask (B, 1, H, W) holding class indices (0/1 for DRAEM)."""
    if logits.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"focal expects logits (B, K, H, W) and mask (B, 1, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(mask.shape)}")
    probs = logits.softmax(dim=1)
    classes = logits.shape[1]
    one_hot = F.one_hot(mask[:, 0].long(), classes).permute(0, 3, 1, 2).to(probs)
    one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


class FocalLoss(Loss):
    """Focal loss (gamma) on the softmax of segmentation logits."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ValueError("focal gamma must be >= 0")
        self.gamma = gamma

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        return focal_loss(logits, mask, self.gamma)


@in_float32
def colour_histogram_loss(prediction: Tensor, target: Tensor, bins: int = 64, bandwidth: float = 0.01,
                          max_pixels: int = 16384) -> Tensor:
    """Mean over images and channels of the L1 distance between kernel-density colour histograms on [0, 1].

    Each histogram sums to 1, so the value lies in [0, 2]; images with more than ``max_pixels`` pixels are
    subsampled on a fixed stride (deterministic)."""
    _check_pair(prediction, target, "color")
    b, c = prediction.shape[:2]
    x = prediction.reshape(b * c, -1)
    y = target.reshape(b * c, -1)
    stride = max(1, -(-x.shape[1] // max_pixels))
    x, y = x[:, ::stride], y[:, ::stride]
    centres = torch.linspace(0, 1, bins, device=x.device)
    width = torch.tensor(bandwidth, device=x.device)
    hx = kornia.enhance.histogram(x, centres, width)
    hy = kornia.enhance.histogram(y, centres, width)
    hx = hx / hx.sum(dim=1, keepdim=True).clamp_min(1e-12)
    hy = hy / hy.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (hx - hy).abs().sum(dim=1).mean()


class ColourHistogramLoss(Loss):
    """L1 distance between per-channel differentiable colour histograms."""

    def __init__(self, bins: int = 64, bandwidth: float = 0.01, max_pixels: int = 16384):
        super().__init__()
        if bins < 2 or bandwidth <= 0 or max_pixels < 1:
            raise ValueError("color needs bins >= 2, bandwidth > 0 and max_pixels >= 1")
        self.bins, self.bandwidth, self.max_pixels = bins, bandwidth, max_pixels

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        return colour_histogram_loss(prediction, target, self.bins, self.bandwidth, self.max_pixels)


@in_float32
def inverse_psnr_loss(prediction: Tensor, target: Tensor, floor_db: float = 1.0) -> Tensor:
    """1 / max(PSNR, floor_db) with PSNR = 10 log10(1 / (MSE + 1e-8)), images in [0, 1]."""
    _check_pair(prediction, target, "psnr")
    mse = F.mse_loss(prediction, target)
    psnr = 10.0 * torch.log10(1.0 / (mse + 1e-8))
    return 1.0 / psnr.clamp_min(floor_db)


class InversePSNRLoss(Loss):
    """Inverse PSNR: weighs less once the reconstruction reaches a good PSNR."""

    def __init__(self, floor_db: float = 1.0):
        super().__init__()
        if floor_db <= 0:
            raise ValueError("psnr floor_db must be > 0")
        self.floor_db = floor_db

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        return inverse_psnr_loss(prediction, target, self.floor_db)
