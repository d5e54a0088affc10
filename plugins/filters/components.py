"""Classic post-processors for anomaly maps: ``avgpool`` (DRAEM's image-score smoothing), ``gaussian``, ``unsharp``,
``crop`` (ignore the border).

Each is a pure function on (B, 1, H, W) maps plus a thin module holding its parameters; device and dtype follow
the input.
"""

from __future__ import annotations

import kornia
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import PostProcessor, check_map


def average_pool(anomaly_map: Tensor, kernel: int = 21) -> Tensor:
    """Mean over a ``kernel`` x ``kernel`` window, stride 1, zero padding kernel // 2 (count_include_pad, as
    DRAEM's ``avg_pool2d(M, 21, stride=1, padding=10)``): (B, 1, H, W) -> (B, 1, H, W)."""
    check_map(anomaly_map, "avgpool")
    return F.avg_pool2d(anomaly_map, kernel, stride=1, padding=kernel // 2)


def gaussian_smooth(anomaly_map: Tensor, sigma: float = 4.0) -> Tensor:
    """Gaussian blur with std ``sigma`` pixels (kernel 2*ceil(3 sigma)+1, reflect border)."""
    check_map(anomaly_map, "gaussian")
    k = 2 * int(3 * sigma + 0.999) + 1
    return kornia.filters.gaussian_blur2d(anomaly_map, (k, k), (sigma, sigma), border_type="reflect")


def unsharp_mask(anomaly_map: Tensor, amount: float = 1.0, sigma: float = 2.0) -> Tensor:
    """Classic unsharp masking g = f + amount * (f - gaussian(f)): emphasises high frequencies."""
    check_map(anomaly_map, "unsharp")
    return anomaly_map + amount * (anomaly_map - gaussian_smooth(anomaly_map, sigma))


def crop_border(anomaly_map: Tensor, pixels: int = 2) -> Tensor:
    """Drop ``pixels`` rows and columns on every side: (B, 1, H, W) -> (B, 1, H - 2p, W - 2p). Zero-padded
    convolutions make border responses unreliable; scoring the interior ignores them."""
    check_map(anomaly_map, "crop")
    h, w = anomaly_map.shape[-2:]
    if 2 * pixels >= min(h, w):
        raise ValueError(f"crop of {pixels} px leaves nothing of a {h}x{w} map")
    return anomaly_map[..., pixels:h - pixels, pixels:w - pixels] if pixels else anomaly_map


class Crop(PostProcessor):
    """Drop a border of ``pixels`` on every side of the map."""

    def __init__(self, pixels: int = 2):
        super().__init__()
        if pixels < 0:
            raise ValueError("crop pixels must be >= 0")
        self.pixels = pixels

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return crop_border(anomaly_map, self.pixels)


class AvgPool(PostProcessor):
    """Average pooling, stride 1, same size (DRAEM's score smoothing)."""

    def __init__(self, kernel: int = 21):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError("avgpool kernel must be an odd integer >= 1")
        self.kernel = kernel

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return average_pool(anomaly_map, self.kernel)


class Gaussian(PostProcessor):
    """Gaussian smoothing of the anomaly map."""

    def __init__(self, sigma: float = 4.0):
        super().__init__()
        if sigma <= 0:
            raise ValueError("gaussian sigma must be > 0")
        self.sigma = sigma

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return gaussian_smooth(anomaly_map, self.sigma)


class Unsharp(PostProcessor):
    """Unsharp masking g = f + amount * (f - blur f)."""

    def __init__(self, amount: float = 1.0, sigma: float = 2.0):
        super().__init__()
        if sigma <= 0:
            raise ValueError("unsharp sigma must be > 0")
        self.amount, self.sigma = amount, sigma

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return unsharp_mask(anomaly_map, self.amount, self.sigma)
