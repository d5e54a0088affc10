"""The arithmetic of PaDiM's update, piece by piece, on synthetic matrices of its real shape (4,096 positions,
100 features, 51 added images): the inverse covariances by ``spd_inverse`` against torch's batched Cholesky (float64
and float32), LAPACK's Cholesky inverse in float64 against float32 on one thread, and the moments' merge as it is
against one fused batched product of the added images' deviations from the old mean.

    python benchmarks/padim_update.py [--repeats 3]

Prints one line per repeat and measurement (seconds), and how far the alternatives' results are from adkit's.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from adkit.stats.covariance import lapack_function, spd_inverse
from adkit.stats.moments import Moments, merge_into

POSITIONS, FEATURES, ADDED, FITTED = 4096, 100, 51, 103


def cholesky_inverse_one_thread(matrices: np.ndarray, prefix: str) -> float:
    potrf, potri = lapack_function(f"{prefix}potrf"), lapack_function(f"{prefix}potri")
    a = matrices.copy()
    n, info = ctypes.c_int(a.shape[-1]), ctypes.c_int(0)
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        for matrix in a:
            potrf(b"U", ctypes.byref(n), matrix.ctypes.data, ctypes.byref(n), ctypes.byref(info))
            potri(b"U", ctypes.byref(n), matrix.ctypes.data, ctypes.byref(n), ctypes.byref(info))
    return time.perf_counter() - started


def merge_now(scatter: torch.Tensor, mean: torch.Tensor, x: torch.Tensor) -> float:
    started = time.perf_counter()
    part_mean = x.mean(1)
    centred = x - part_mean[:, None, :]
    merge_into(Moments(FITTED, mean, scatter), Moments(x.shape[1], part_mean, torch.bmm(centred.transpose(1, 2), centred)))
    return time.perf_counter() - started


def merge_fused(scatter: torch.Tensor, mean: torch.Tensor, x: torch.Tensor) -> float:
    """S += Y^T Y - (k^2 / n) e e^T with Y = x - m_old, e = mean(Y): one batched product with a rank-one column."""
    started = time.perf_counter()
    k, n = x.shape[1], FITTED + x.shape[1]
    y = x - mean[:, None, :]
    e = y.mean(1)
    c = k / n ** 0.5
    scatter.baddbmm_(torch.cat([y, (c * e)[:, None, :]], 1).transpose(1, 2), torch.cat([y, (-c * e)[:, None, :]], 1))
    mean.add_(e, alpha=k / n)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(POSITIONS, 160, FEATURES, generator=generator) * torch.linspace(0.2, 3, FEATURES)
    scatter = (samples.transpose(1, 2) @ samples).float()
    shifted = scatter.double() / 159
    shifted.diagonal(dim1=-2, dim2=-1).add_(0.01)
    added = torch.randn(POSITIONS, ADDED, FEATURES, generator=generator) + 0.1
    mean = torch.randn(POSITIONS, FEATURES, generator=generator)
    spd_inverse(scatter, 1 / 159, 0.01, torch.float32)  # the first call pays LAPACK's lookup
    for repeat in range(args.repeats):
        started = time.perf_counter()
        ours = spd_inverse(scatter, 1 / 159, 0.01, torch.float32)
        ours_s = time.perf_counter() - started
        timings = {"spd_inverse (2 threads)": ours_s}
        for name, dtype in (("torch cholesky float64", torch.float64), ("torch cholesky float32", torch.float32)):
            started = time.perf_counter()
            factor, _ = torch.linalg.cholesky_ex(shifted.to(dtype))
            theirs = torch.cholesky_inverse(factor)
            timings[name] = time.perf_counter() - started
            timings[name + " max |diff|"] = float((theirs.float() - ours).abs().max())
        timings["lapack dpotrf+dpotri, 1 thread"] = cholesky_inverse_one_thread(shifted.numpy(), "d")
        timings["lapack spotrf+spotri, 1 thread"] = cholesky_inverse_one_thread(shifted.float().numpy(), "s")
        now_scatter, now_mean = scatter.clone(), mean.clone()
        timings["merge as now"] = merge_now(now_scatter, now_mean, added)
        fused_scatter, fused_mean = scatter.clone(), mean.clone()
        timings["merge fused"] = merge_fused(fused_scatter, fused_mean, added)
        timings["fused max |diff| / max |S|"] = float((fused_scatter - now_scatter).abs().max() / now_scatter.abs().max())
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v:.3g}" for k, v in timings.items()), flush=True)


if __name__ == "__main__":
    main()
