"""The hello plugin's components: a per-pixel Gaussian detector, a clipping post-processor, a percentile scorer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from adkit.plugin import Detector, PostProcessor, Scorer, check_map


class PixelGaussian(Detector):
    """Per-pixel Gaussian of normal images; map = max over channels of |z-score|."""

    trainable = False
    default_postprocessors = ()
    default_scorer = "max"
    # their shape is the image shape, unknown before fit(): checkpoints restore them as saved
    fitted_buffers = ("mean", "std")

    def __init__(self, min_std: float = 0.01):
        super().__init__()
        if min_std <= 0:
            raise ValueError("pixel-gauss min_std must be > 0")
        self.min_std = min_std
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))

    def fit(self, batches: Iterable[Tensor]) -> None:
        total, total_sq, count = None, None, 0
        for images in batches:
            x = images.double()
            total = x.sum(0) if total is None else total + x.sum(0)
            total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
            count += x.shape[0]
        if not count:
            raise ValueError("pixel-gauss needs at least one training image")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        self.mean = mean.float()
        self.std = var.sqrt().clamp_min(self.min_std).float()

    def anomaly_map(self, images: Tensor) -> Tensor:
        z = (images - self.mean) / self.std
        return z.abs().amax(dim=1, keepdim=True)


class Clip(PostProcessor):
    """Clamp map values to [low, high]."""

    def __init__(self, low: float = 0.0, high: float = 10.0):
        super().__init__()
        if high <= low:
            raise ValueError("clip needs high > low")
        self.low, self.high = low, high

    def forward(self, anomaly_map: Tensor) -> Tensor:
        check_map(anomaly_map, "clip")
        return anomaly_map.clamp(self.low, self.high)


class Percentile99(Scorer):
    """Image score = 99th percentile of the map."""

    def forward(self, anomaly_map: Tensor) -> Tensor:
        check_map(anomaly_map, "p99")
        return anomaly_map.flatten(1).float().quantile(0.99, dim=1)
