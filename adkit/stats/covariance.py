"""Gaussians fitted to feature vectors with few samples per dimension: Ledoit-Wolf shrinkage, batched over many
independent sets (one per feature-map position), and the whitening that turns the Mahalanobis distance into a
Euclidean norm. No method is named here."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

# matrices inverted by one call of numpy's LAPACK loop: the unit spd_inverse shares out among threads (256 of
# 100 x 100 float64: 20 MB)
INVERSE_CHUNK = 256


def ledoit_wolf(samples: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (..., d), covariance (..., d, d)) of samples (..., n, d), computed in float64: the empirical
    covariance (divided by n) shrunk towards mu * I (mu its mean variance) by the Ledoit-Wolf (2004) estimate of
    the optimal weight, as scikit-learn's ``LedoitWolf`` computes it, independently for every leading index."""
    x = samples.double()
    n, d = x.shape[-2:]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mean = x.mean(-2)
    x = x - mean.unsqueeze(-2)
    empirical = x.transpose(-1, -2) @ x / n
    mu = torch.diagonal(empirical, dim1=-2, dim2=-1).sum(-1) / d
    squared = x * x
    delta_ = empirical.pow(2).sum((-1, -2))  # |X^T X|_F^2 / n^2
    beta_ = (squared.transpose(-1, -2) @ squared).sum((-1, -2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - d * mu * mu) / d  # |S - mu I|_F^2 / d
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    covariance = (1 - shrinkage)[..., None, None] * empirical + (shrinkage * mu)[..., None, None] * eye
    return mean, covariance


def whitening(covariance: Tensor, floor: float = 1e-6) -> Tensor:
    """W (..., d, d) with W^T W = covariance^-1: the inverse of the Cholesky factor, so |W (x - mean)|^2 is the
    squared Mahalanobis distance. Eigenvalues below ``floor`` times the largest are raised to it first, so a
    (nearly) singular covariance still whitens."""
    c = covariance.double()
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c)
    if bool((info != 0).any()):
        values, vectors = torch.linalg.eigh(c)
        values = torch.maximum(values, floor * values.amax(-1, keepdim=True).clamp_min(1e-30))
        factor = torch.linalg.cholesky((vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2))
    return torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)


def spd_inverse(matrices: Tensor, scale: float = 1.0, ridge: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
    """The inverses of ``scale`` x M + ``ridge`` x I for a batch M (..., d, d) of symmetric matrices that make them
    positive definite, computed in float64, returned row-major in ``dtype`` (M's when None).

    On a CPU, LAPACK (numpy's) inverts the matrices a chunk at a time, the chunks shared out among torch's threads
    with one BLAS thread each, every chunk scaled in float64 and its inverse written straight into the result.
    torch's batched inverse gives each small matrix to all the threads, and for PaDiM's 4,096 matrices of 100 x 100
    spends most of its time synchronising them: 0.59 s against 0.29 s on 2 cores (docs/benchmarks.md, "PaDiM's
    inverse covariances"). Elsewhere (a GPU, or with gradients) torch's batched inverse. Both factorise by LU with
    partial pivoting."""
    dtype = dtype or matrices.dtype
    d = matrices.shape[-1]
    if matrices.device.type != "cpu" or matrices.requires_grad:
        shifted = matrices.double() * scale
        shifted.diagonal(dim1=-2, dim2=-1).add_(ridge)
        return torch.linalg.inv(shifted).to(dtype)
    shape = matrices.shape
    stacked = matrices.detach().reshape(-1, d, d).numpy()
    result = torch.empty(stacked.shape, dtype=dtype)
    out = result.numpy()

    def invert(start: int) -> None:
        chunk = stacked[start:start + INVERSE_CHUNK].astype(np.float64) * scale
        chunk.reshape(-1, d * d)[:, ::d + 1] += ridge
        out[start:start + INVERSE_CHUNK] = np.linalg.inv(chunk)

    starts = range(0, stacked.shape[0], INVERSE_CHUNK)
    workers = min(torch.get_num_threads(), len(starts))
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1:
            for start in starts:
                invert(start)
        else:  # numpy releases the GIL in its loops
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(invert, starts))
    return result.reshape(shape)
