"""Scorers: reduce an anomaly map (B, 1, H, W) to image scores (B,)."""

from __future__ import annotations

from torch import Tensor

from adkit.plugin import Scorer, check_map


def max_score(anomaly_map: Tensor) -> Tensor:
    """Maximum of each map: (B, 1, H, W) -> (B,)."""
    check_map(anomaly_map, "max")
    return anomaly_map.flatten(1).amax(dim=1)


def maxmin_score(anomaly_map: Tensor, eps: float = 1e-6) -> Tensor:
    """max / (min + eps) of each map, a scale-free score (DRAEM-improvement paper): (B, 1, H, W) -> (B,)."""
    check_map(anomaly_map, "maxmin")
    flat = anomaly_map.flatten(1)
    return flat.amax(dim=1) / (flat.amin(dim=1) + eps)


def topk_mean_score(anomaly_map: Tensor, fraction: float = 0.01) -> Tensor:
    """Mean of the largest ``fraction`` of each map's values (at least one): (B, 1, H, W) -> (B,)."""
    check_map(anomaly_map, "topk-mean")
    flat = anomaly_map.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


class MaxScorer(Scorer):
    """Image score = maximum of the anomaly map."""

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return max_score(anomaly_map)


class MaxMinScorer(Scorer):
    """Image score = max(map) / (min(map) + eps)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        if eps <= 0:
            raise ValueError("maxmin eps must be > 0")
        self.eps = eps

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return maxmin_score(anomaly_map, self.eps)


class TopKMeanScorer(Scorer):
    """Image score = mean of the top fraction of map values."""

    def __init__(self, fraction: float = 0.01):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError("topk-mean fraction must be in (0, 1]")
        self.fraction = fraction

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return topk_mean_score(anomaly_map, self.fraction)


class MeanScorer(Scorer):
    """Image score = mean of the anomaly map."""

    def forward(self, anomaly_map: Tensor) -> Tensor:
        check_map(anomaly_map, "mean")
        return anomaly_map.flatten(1).mean(dim=1)
