"""Gaussians fitted to feature vectors with few samples per dimension: Ledoit-Wolf shrinkage, batched over many
independent sets (one per feature-map position), and the whitening that turns the Mahalanobis distance into a
Euclidean norm. No method is named here."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

# matrices a thread inverts as one unit: the unit spd_inverse shares out among threads (256 of
# 100 x 100 float64: 20 MB)
INVERSE_CHUNK = 256


def lapack_function(name: str) -> Callable[..., None]:
    """LAPACK routine ``name`` of the ``(char *uplo, int *n, T *a, int *lda, int *info)`` form (potrf, potri) as a
    ctypes function, taken from scipy's Cython LAPACK (the function pointer its ``__pyx_capi__`` exports, as numba
    takes them); ctypes releases the GIL for each call. Raises where scipy does not export it."""
    from scipy.linalg import cython_lapack

    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    integer = ctypes.POINTER(ctypes.c_int)
    signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, integer, ctypes.c_void_p, integer, integer)
    capsule = cython_lapack.__pyx_capi__[name]
    return signature(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))


@functools.cache
def _lapack_spd() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """LAPACK's dpotrf and dpotri (Cholesky factor, then the inverse from it) as ctypes functions
    (``lapack_function``), so threads factorise side by side, where scipy's Python wrappers hold the GIL. None
    where scipy does not export them: the callers fall back to numpy's LU inverse."""
    try:
        return lapack_function("dpotrf"), lapack_function("dpotri")
    except Exception:  # noqa: BLE001 - any missing piece means: use the LU path
        return None


def _cholesky_inverse(chunk: np.ndarray) -> bool:
    """Invert each symmetric positive definite matrix of the C-contiguous float64 ``chunk`` (k, d, d) in place by
    its Cholesky factor (half the work of LU with partial pivoting); False, with ``chunk`` unusable, where LAPACK
    is not at hand or a matrix is not positive definite."""
    lapack = _lapack_spd()
    if lapack is None:
        return False
    potrf, potri = lapack
    d = chunk.shape[-1]
    n, info = ctypes.c_int(d), ctypes.c_int(0)
    for matrix in chunk:
        # a C-order symmetric matrix is its own Fortran-order transpose: LAPACK's upper triangle is our lower one
        address = matrix.ctypes.data
        potrf(b"U", ctypes.byref(n), address, ctypes.byref(n), ctypes.byref(info))
        if info.value != 0:
            return False
        potri(b"U", ctypes.byref(n), address, ctypes.byref(n), ctypes.byref(info))
        if info.value != 0:
            return False
    rows, cols = np.tril_indices(d, -1)
    chunk[:, cols, rows] = chunk[:, rows, cols]  # the inverse's lower triangle mirrored into the upper
    return True


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

    On a CPU, LAPACK inverts the matrices a chunk at a time, the chunks shared out among torch's threads with one
    BLAS thread each, every chunk scaled in float64 and its inverse written straight into the result: each matrix
    by its Cholesky factor (potrf then potri, called without the GIL; ``_cholesky_inverse``), or, for a chunk that
    holds a matrix that is not positive definite or where scipy exports no LAPACK, by numpy's LU with partial
    pivoting. torch's batched inverse gives each small matrix to all the threads, and for PaDiM's 4,096 matrices
    of 100 x 100 spends most of its time synchronising them: 0.59 s on 2 cores, against 0.29-0.33 s by LU in
    chunks and 0.23 s by Cholesky (docs/benchmarks.md, "PaDiM's inverse covariances"). Elsewhere (a GPU, or with
    gradients) torch's batched inverse (LU)."""
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

    def shifted(start: int) -> np.ndarray:
        chunk = stacked[start:start + INVERSE_CHUNK].astype(np.float64) * scale
        chunk.reshape(-1, d * d)[:, ::d + 1] += ridge
        return chunk

    def invert(start: int) -> None:
        chunk = shifted(start)
        out[start:start + INVERSE_CHUNK] = chunk if _cholesky_inverse(chunk) else np.linalg.inv(shifted(start))

    starts = range(0, stacked.shape[0], INVERSE_CHUNK)
    workers = min(torch.get_num_threads(), len(starts))
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1:
            for start in starts:
                invert(start)
        else:  # numpy releases the GIL in its loops, ctypes in its calls
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(invert, starts))
    return result.reshape(shape)
