from __future__ import annotations

import numpy as np
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


def gaussian_reference(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """A direct 2-D convolution with the normalised kernel exp(-(y^2 + x^2) / 2 sigma^2) on 2 ceil(3 sigma) + 1
    taps, reflect border (float64)."""
    radius = int(3 * sigma + 0.999)
    steps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(steps[:, None] ** 2 + steps[None, :] ** 2) / (2 * sigma ** 2))
    padded = F.pad(m.double(), (radius,) * 4, mode="reflect")
    return F.conv2d(padded, (kernel / kernel.sum())[None, None])


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_gaussian_is_the_normalised_kernel_with_reflected_borders(sigma):
    m = torch.rand(2, 1, 40, 36, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(Gaussian(sigma)(m).double(), gaussian_reference(m, sigma), atol=1e-5, rtol=1e-5)
    spike = torch.zeros(1, 1, 41, 41)
    spike[0, 0, 20, 20] = 1.0
    out = Gaussian(sigma)(spike)[0, 0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass kept away from the border
    assert out[20, 20 + round(sigma)] / out[20, 20] == pytest.approx(np.exp(-round(sigma) ** 2 / (2 * sigma ** 2)),
                                                                     rel=1e-3)


def test_unsharp_adds_amount_times_the_detail():
    m = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    detail = m.double() - gaussian_reference(m, 2.0)
    torch.testing.assert_close(Unsharp(amount=1.5, sigma=2.0)(m).double(), m.double() + 1.5 * detail, atol=1e-5,
                               rtol=1e-5)
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1.0
    out = Unsharp(amount=1.0, sigma=1.0)(step)[0, 0, 8]
    assert out[7] < 0 and out[8] > 1  # overshoot on both sides of an edge: sharpened, not blurred
    assert out[0] == pytest.approx(0.0, abs=1e-6) and out[15] == pytest.approx(1.0, abs=1e-6)


def test_max_scorer_takes_each_maps_maximum():
    maps = torch.rand(3, 1, 12, 10, generator=torch.Generator().manual_seed(3))
    maps[1, 0, 4, 7] = 5.0
    torch.testing.assert_close(MaxScorer()(maps), maps.flatten(1).max(dim=1).values)
    assert MaxScorer()(maps)[1].item() == 5.0


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
