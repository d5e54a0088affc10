"""Running moments merged exactly: two batches merged equal the moments of their union, and the Ledoit-Wolf
Gaussian from merged moments equals the one fitted on all samples at once (and scikit-learn's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from adkit.stats.covariance import ledoit_wolf, spd_inverse
from adkit.stats.moments import Moments, ledoit_wolf_from, merge, merge_into, moments


def samples(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, n, 5, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 5) + shift  # 3 sets


@pytest.mark.parametrize("sizes", [(7, 13), (1, 20), (40, 2)])
def test_merged_moments_equal_the_moments_of_the_union(sizes):
    a, b = samples(sizes[0], 0), samples(sizes[1], 1, shift=2.0)  # different means: the shift terms matter
    merged = merge(moments(a, fourth=True), moments(b, fourth=True))
    whole = moments(torch.cat([a, b], dim=1), fourth=True)
    assert merged.count == whole.count
    for name in ("mean", "scatter", "cube", "quartic"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("sizes", [(7, 13), (1, 20), (40, 2)])
def test_moments_merged_in_place_in_float32_equal_the_float64_union(sizes):
    a, b = samples(sizes[0], 0), samples(sizes[1], 1, shift=2.0)
    whole = moments(torch.cat([a, b], dim=1))
    first, second = moments(a), moments(b)
    running = Moments(first.count, first.mean.float(), first.scatter.float())
    scatter = running.scatter
    merged = merge_into(running, Moments(second.count, second.mean.float(), second.scatter.float()))
    assert merged.count == whole.count and merged.scatter is scatter  # in place, no float64 copy
    assert merged.scatter.dtype == torch.float32
    torch.testing.assert_close(merged.mean.double(), whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.scatter.double(), whole.scatter, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="without the fourth-order terms"):
        merge_into(moments(a, fourth=True), moments(b, fourth=True))


def test_ledoit_wolf_from_merged_moments_is_the_fit_on_all_samples():
    parts = [samples(n, seed, shift=seed) for seed, n in enumerate((9, 4, 15))]
    stats = moments(parts[0], fourth=True)
    for part in parts[1:]:
        stats = merge(stats, moments(part, fourth=True))
    mean, covariance = ledoit_wolf_from(stats)
    whole = torch.cat(parts, dim=1)
    expected_mean, expected = ledoit_wolf(whole)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(covariance, expected, rtol=1e-10, atol=1e-10)
    reference = LedoitWolf().fit(whole[1].numpy()).covariance_  # and the library's, for one set
    np.testing.assert_allclose(covariance[1].numpy(), reference, rtol=1e-8)


def test_covariance_and_refused_mixtures():
    x = samples(10, 3)
    stats = moments(x)
    torch.testing.assert_close(stats.covariance(), torch.stack([torch.from_numpy(np.cov(s.numpy().T)) for s in x]))
    with pytest.raises(ValueError, match="fourth-order"):
        merge(stats, moments(x, fourth=True))
    with pytest.raises(ValueError, match="fourth-order"):
        ledoit_wolf_from(stats)


@pytest.mark.parametrize("count", [1, 3, 257, 600])  # one chunk, several, and chunks shared out among threads
def test_spd_inverse_is_the_inverse_of_the_scaled_and_ridged_matrices(count):
    g = torch.Generator().manual_seed(count)
    x = torch.randn(count, 30, 12, generator=g, dtype=torch.float64)
    scatter = (x.mT @ x).float()  # float32 as PaDiM stores it; rank 12 of 12: the ridge is what makes it invertible
    scatter = scatter.reshape(count, 1, 12, 12) if count == 3 else scatter  # leading dimensions kept
    reference = scatter.double() / 29
    reference.diagonal(dim1=-2, dim2=-1).add_(0.01)
    reference = torch.linalg.inv(reference)
    inverse = spd_inverse(scatter, 1 / 29, 0.01, torch.float64)
    assert inverse.shape == scatter.shape and inverse.dtype == torch.float64 and inverse.is_contiguous()
    torch.testing.assert_close(inverse, reference, rtol=1e-9, atol=1e-9)
    single = spd_inverse(scatter, 1 / 29, 0.01, torch.float32)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, reference.float(), rtol=1e-6, atol=1e-6)


def test_spd_inverse_on_one_thread_equals_the_shared_out_one():
    x = torch.randn(600, 20, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scatter = x.mT @ x + torch.eye(8, dtype=torch.float64)
    shared = spd_inverse(scatter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = spd_inverse(scatter)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(shared, alone)  # each matrix by the same LAPACK call either way


def test_spd_inverse_of_matrices_that_are_not_positive_definite_falls_back_to_lu():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    symmetric = x + x.mT  # indefinite, invertible: the Cholesky factor fails, LU does not
    symmetric[2] = torch.eye(6, dtype=torch.float64) * 2  # one of them positive definite, in the same chunk
    torch.testing.assert_close(spd_inverse(symmetric), torch.linalg.inv(symmetric), rtol=1e-9, atol=1e-9)


def test_spd_inverse_by_cholesky_equals_lu_on_positive_definite_matrices():
    from adkit.stats import covariance

    x = torch.randn(40, 50, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scatter = (x.mT @ x).numpy()
    chunk = scatter.copy()
    assert covariance._cholesky_inverse(chunk)  # scipy exports LAPACK on every supported install
    np.testing.assert_allclose(chunk, np.linalg.inv(scatter), rtol=1e-9, atol=1e-12)
    assert np.array_equal(chunk, chunk.transpose(0, 2, 1))  # mirrored: exactly symmetric
