"""Running moments merged exactly: two batches merged equal the moments of their union, and the Ledoit-Wolf
Gaussian from merged moments equals the one fitted on all samples at once (and scikit-learn's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from adkit.stats.covariance import ledoit_wolf
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
