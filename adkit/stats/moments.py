"""Running moments of feature vectors, batched over many independent sets (one per feature-map position): what a
Gaussian fitted to them needs, kept so that more samples can be added later without the first ones, and merged
exactly (Chan, Golub and LeVeque 1979 for the mean and scatter; the fourth-order term by the same shift).

For a set of n vectors x_k (d,) with mean m: ``scatter`` = sum_k (x_k - m)(x_k - m)^T (d, d); with
``fourth=True`` also ``cube`` = sum_k |x_k - m|^2 (x_k - m) (d,) and ``quartic`` = sum_k |x_k - m|^4 (), which the
Ledoit-Wolf shrinkage needs (adkit.stats.covariance). All in float64. No method is named here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Moments:
    """Moments of ``count`` samples, for every leading index: mean (..., d), scatter (..., d, d), and optionally
    cube (..., d) and quartic (...)."""

    count: int
    mean: Tensor
    scatter: Tensor
    cube: Tensor | None = None
    quartic: Tensor | None = None

    @property
    def fourth(self) -> bool:
        return self.quartic is not None

    def covariance(self, unbiased: bool = True) -> Tensor:
        """The sample covariance (..., d, d): scatter / (n - 1), or / n."""
        return self.scatter / (self.count - 1 if unbiased else self.count)

    def shifted(self, centre: Tensor) -> Moments:
        """The same sums about ``centre`` (..., d) instead of the mean (the mean itself is kept): with y = x - m
        and e = m - centre, sum (y + e)(y + e)^T = S + n e e^T, sum |y + e|^2 (y + e) = T + (tr S) e + 2 S e +
        n |e|^2 e, sum |y + e|^4 = Q + 4 T.e + 4 e^T S e + 2 |e|^2 tr S + n |e|^4 (the sums of y vanish)."""
        e = self.mean - centre
        n = self.count
        d = e.shape[-1]
        scatter = torch.baddbmm(self.scatter.to(e.dtype).reshape(-1, d, d), e.reshape(-1, d, 1), e.reshape(-1, 1, d),
                                alpha=n).view(self.scatter.shape)
        if not self.fourth:
            return Moments(n, self.mean, scatter)
        ee = (e * e).sum(-1)
        se = (self.scatter @ e.unsqueeze(-1)).squeeze(-1)
        trace = torch.diagonal(self.scatter, dim1=-2, dim2=-1).sum(-1)
        cube = self.cube + trace.unsqueeze(-1) * e + 2 * se + n * ee.unsqueeze(-1) * e
        quartic = self.quartic + 4 * (self.cube * e).sum(-1) + 4 * (e * se).sum(-1) + 2 * ee * trace + n * ee * ee
        return Moments(n, self.mean, scatter, cube, quartic)


def moments(samples: Tensor, fourth: bool = False) -> Moments:
    """The moments of samples (..., n, d), computed in float64."""
    x = samples.double()
    n = x.shape[-2]
    if n < 1:
        raise ValueError("moments of no samples")
    mean = x.mean(-2)
    y = x - mean.unsqueeze(-2)
    scatter = y.transpose(-1, -2) @ y
    if not fourth:
        return Moments(n, mean, scatter)
    squared = (y * y).sum(-1)  # (..., n)
    cube = (squared.unsqueeze(-1) * y).sum(-2)
    return Moments(n, mean, scatter, cube, (squared * squared).sum(-1))


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of both sets together, exactly as ``moments`` of their union would give them (up to rounding):
    each is shifted to the joint mean and the sums added."""
    if a.fourth != b.fourth:
        raise ValueError("merging moments with and without the fourth-order terms")
    count = a.count + b.count
    mean = (a.count * a.mean.double() + b.count * b.mean.double()) / count
    sa, sb = a.shifted(mean), b.shifted(mean)
    if not a.fourth:
        return Moments(count, mean, sa.scatter.add_(sb.scatter))
    return Moments(count, mean, sa.scatter + sb.scatter, sa.cube + sb.cube, sa.quartic + sb.quartic)


def merge_into(a: Moments, b: Moments) -> Moments:
    """``merge`` without the fourth-order terms, into ``a``'s own tensors and dtype (its mean and scatter are
    updated in place; a float32 (P, d, d) scatter is never copied to float64): S = S_a + S_b + (n_a n_b / n) e e^T
    with e = m_b - m_a, and m = m_a + (n_b / n) e. Returns ``a``'s new moments."""
    if a.fourth or b.fourth:
        raise ValueError("merge_into takes moments without the fourth-order terms")
    count = a.count + b.count
    e = b.mean.to(a.mean.dtype) - a.mean
    d = e.shape[-1]
    a.scatter.add_(b.scatter.to(a.scatter.dtype))
    a.scatter.view(-1, d, d).baddbmm_(e.reshape(-1, d, 1), e.reshape(-1, 1, d), alpha=a.count * b.count / count)
    a.mean.add_(e, alpha=b.count / count)
    return Moments(count, a.mean, a.scatter)


def ledoit_wolf_from(stats: Moments) -> tuple[Tensor, Tensor]:
    """(mean, covariance) as ``adkit.stats.covariance.ledoit_wolf`` gives them for the samples these moments were
    taken of: the empirical covariance shrunk towards mu I by the Ledoit-Wolf weight, whose estimate needs the sum
    of |x - m|^4 (``quartic``) besides the scatter."""
    if not stats.fourth:
        raise ValueError("the Ledoit-Wolf weight needs the fourth-order moments (moments(..., fourth=True))")
    n, d = stats.count, stats.mean.shape[-1]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    empirical = stats.scatter / n
    mu = torch.diagonal(empirical, dim1=-2, dim2=-1).sum(-1) / d
    delta_ = empirical.pow(2).sum((-1, -2))
    beta = (stats.quartic / n - delta_) / (d * n)
    delta = (delta_ - d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta))
    eye = torch.eye(d, dtype=empirical.dtype, device=empirical.device)
    covariance = (1 - shrinkage)[..., None, None] * empirical + (shrinkage * mu)[..., None, None] * eye
    return stats.mean, covariance
