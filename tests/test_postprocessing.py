from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adkit_plugins.filters.components import AvgPool, Gaussian, Unsharp
from adkit_plugins.freqmask.components import FreqMask, emphasis_kernel
from adkit_plugins.scorers.components import MaxMinScorer, MaxScorer, TopKMeanScorer


def test_scorers_hand_values():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert MaxScorer()(m).item() == 4.0
    assert MaxMinScorer(eps=1e-6)(m).item() == pytest.approx(4.0 / (1.0 + 1e-6))
    assert TopKMeanScorer(fraction=0.5)(m).item() == pytest.approx(3.5)


def test_avgpool_is_drams_image_score_smoothing():
    m = torch.rand(2, 1, 30, 30, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(AvgPool(21)(m), F.avg_pool2d(m, 21, stride=1, padding=10))


def test_unsharp_and_gaussian_keep_constants():
    c = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(Gaussian(2.0)(c), c) and torch.allclose(Unsharp()(c), c)


def test_freqmask_hand_computed_8x8():
    f = torch.zeros(1, 1, 8, 8)
    f[0, 0, 4, 4] = 1.0
    out = FreqMask(weight=0.5, stride=4, noise=0.0, kernels=(3,))(f)
    assert out.shape == (1, 1, 2, 2)
    # stride-4 samples at (0,0),(0,4),(4,0),(4,4); kernel3 at (4,4): 1 - 0.5*8 = -3; avgpool block (4:8,4:8) = 1/16
    expected = torch.tensor([[0.0, 0.0], [0.0, (-3.0 + 1 / 16) / 2]])
    assert torch.allclose(out[0, 0], expected)
    k = emphasis_kernel(3, 0.5)
    assert k[1, 1] == pytest.approx(-3.0) and k[0, 0] == pytest.approx(0.5) and k.sum() == pytest.approx(1.0)


def test_freqmask_constant_stays_constant():
    c = torch.full((1, 1, 16, 20), 0.7)
    assert torch.allclose(FreqMask(noise=0.0)(c), torch.full((1, 1, 4, 5), 0.7))


def test_low_frequency_emphasis_suppresses_spikes_relative_to_blobs():
    spike = torch.zeros(1, 1, 32, 32)
    spike[0, 0, 16, 16] = 1.0
    blob = torch.zeros(1, 1, 32, 32)
    blob[0, 0, 13:19, 13:19] = 1.0
    fm = FreqMask(noise=0.0, stride=1)
    # peak response relative to the input peak: the spike loses far more than the blob
    assert fm(spike).max() / spike.max() < 0.5 * fm(blob).max() / blob.max()


def test_freqmask_device_dtype_noise_and_gradients():
    m = torch.rand(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    out = FreqMask(seed=1)(m)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert m.grad.abs().sum() > 0
    assert torch.equal(FreqMask(seed=3).kernel0, FreqMask(seed=3).kernel0)
    assert not torch.equal(FreqMask(seed=3).kernel0, FreqMask(seed=4).kernel0)


def test_crop_drops_the_border():
    from adkit_plugins.filters.components import Crop

    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0, :] = 5.0  # a hot border row
    m[0, 0, 4, 4] = 1.0
    out = Crop(2)(m)
    assert out.shape == (1, 1, 4, 4) and out.max() == 1.0
    with pytest.raises(ValueError):
        Crop(4)(m)
