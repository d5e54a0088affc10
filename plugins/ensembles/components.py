"""Ensemble scorers: combine several detectors' image scores, each normalised on held-out normal images."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from adkit.plugin import Ensemble


def check_weights(weights: tuple[float, ...], count: int) -> None:
    if weights and len(weights) != count:
        raise ValueError(f"{len(weights)} ensemble weights for {count} detectors: give one per --detector")


class Normalised(Ensemble):
    """Base: per-detector normalisation fitted on validation normal scores (min-max or z-score)."""

    def __init__(self, normalise: Literal["minmax", "zscore"] = "zscore", weights: tuple[float, ...] = ()):
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ValueError("ensemble weights must be >= 0 with a positive sum, e.g. weights=0.5+0.5")
        self.normalise, self.weights = normalise, tuple(weights)
        self.stats: list[tuple[float, float]] = []

    def check(self, count: int) -> None:
        check_weights(self.weights, count)

    def fit(self, normal_scores: list[Tensor]) -> None:
        self.check(len(normal_scores))
        self.stats = []
        for scores in normal_scores:
            s = scores.double()
            if self.normalise == "minmax":
                low, spread = s.min().item(), (s.max() - s.min()).item()
            else:
                low, spread = s.mean().item(), (s.std().item() if s.numel() > 1 else 0.0)
            self.stats.append((low, spread if spread > 1e-12 else 1.0))

    def normalised(self, scores: list[Tensor]) -> Tensor:
        """(detectors, N) scores after the fitted normalisation."""
        if len(scores) != len(self.stats):
            raise ValueError("combine() needs one score tensor per fitted detector")
        return torch.stack([(s.double() - low) / spread for s, (low, spread) in zip(scores, self.stats)])

    def weight_vector(self, count: int) -> Tensor:
        w = torch.tensor(self.weights or [1.0] * count, dtype=torch.float64)
        return w / w.sum()


class WeightedMean(Normalised):
    """Weighted mean of normalised scores (equal weights by default)."""

    def combine(self, scores: list[Tensor]) -> Tensor:
        z = self.normalised(scores)
        return (self.weight_vector(len(scores))[:, None] * z).sum(0)


class Maximum(Normalised):
    """Maximum of normalised scores."""

    def combine(self, scores: list[Tensor]) -> Tensor:
        return self.normalised(scores).amax(0)


class RankMean(Ensemble):
    """Weighted mean of each score's rank among the validation normal scores (its empirical CDF value)."""

    def __init__(self, weights: tuple[float, ...] = ()):
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ValueError("ensemble weights must be >= 0 with a positive sum")
        self.weights = tuple(weights)
        self.references: list[Tensor] = []

    def check(self, count: int) -> None:
        check_weights(self.weights, count)

    def fit(self, normal_scores: list[Tensor]) -> None:
        self.check(len(normal_scores))
        self.references = [s.double().sort().values for s in normal_scores]

    def combine(self, scores: list[Tensor]) -> Tensor:
        ranks = []
        for s, ref in zip(scores, self.references):
            below = torch.searchsorted(ref, s.double(), right=False)
            at_or_below = torch.searchsorted(ref, s.double(), right=True)
            ranks.append((below + at_or_below).double() / (2 * max(len(ref), 1)))
        w = torch.tensor(self.weights or [1.0] * len(scores), dtype=torch.float64)
        return ((w / w.sum())[:, None] * torch.stack(ranks)).sum(0)
