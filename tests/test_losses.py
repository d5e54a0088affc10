from __future__ import annotations

import math

import pytest
import torch

from adkit_plugins.losses.components import (
    ColourHistogramLoss,
    FocalLoss,
    InversePSNRLoss,
    L2Loss,
    SSIMLoss,
    colour_histogram_loss,
    focal_loss,
    inverse_psnr_loss,
    l2_loss,
    ssim_loss,
)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 24, 24, generator=g), torch.rand(2, 3, 24, 24, generator=g)


@pytest.mark.parametrize("loss", [L2Loss(), SSIMLoss(), ColourHistogramLoss()])
def test_zero_for_identical_and_gradient_flows(loss, pair):
    x, y = pair
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    p = x.clone().requires_grad_(True)
    loss(p, y).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_l2_and_psnr_hand_values():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.full((1, 1, 2, 2), 0.1)
    assert L2Loss()(x, y).item() == pytest.approx(0.01)
    assert InversePSNRLoss()(x, y).item() == pytest.approx(1 / (10 * math.log10(1 / (0.01 + 1e-8))), rel=1e-5)
    # early training: a PSNR below the floor is clamped, so the loss stays bounded
    assert InversePSNRLoss(floor_db=1.0)(x, torch.ones_like(x) * 1.5).item() == pytest.approx(1.0)
    p = x.clone().requires_grad_(True)
    InversePSNRLoss()(p, y).backward()
    assert p.grad.abs().sum() > 0


def test_ssim_matches_direct_zero_padded_reference(pair):
    x, y = pair
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    w = w.expand(3, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, w, padding=5, groups=3)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    assert SSIMLoss()(x, y).item() == pytest.approx(1 - ssim.mean().item(), abs=1e-5)


def test_colour_histogram_disjoint_images_give_two():
    x = torch.full((1, 3, 8, 8), 0.1)
    y = torch.full((1, 3, 8, 8), 0.9)
    assert ColourHistogramLoss()(x, y).item() == pytest.approx(2.0, abs=1e-4)


def test_focal_hand_value():
    logits = torch.zeros(1, 2, 1, 1)  # p = 0.5 for both classes
    mask = torch.ones(1, 1, 1, 1)
    pt = 0.5 * (1 - 1e-5) + 0.5 * 1e-5 + 1e-5
    assert focal_loss(logits, mask).item() == pytest.approx(-((1 - pt) ** 2) * math.log(pt), rel=1e-5)
    confident = torch.tensor([[[[-10.0]], [[10.0]]]])
    assert FocalLoss()(confident, mask).item() < 1e-6
    p = logits.clone().requires_grad_(True)
    FocalLoss()(p, mask).backward()
    assert p.grad[0, 1] < 0  # pushes the anomaly logit up


@pytest.mark.parametrize("loss", [L2Loss(), SSIMLoss(), ColourHistogramLoss(), InversePSNRLoss(),
                                  l2_loss, ssim_loss, colour_histogram_loss, inverse_psnr_loss])
def test_losses_compute_in_float32_under_bf16_autocast(loss):
    # the modules and the public functions alike (a plugin may call ssim_loss inside its own autocast region)
    # smooth images, as textures are: var = E[x^2] - E[x]^2 is tiny against E[x^2], which bf16 cannot resolve
    g = torch.Generator().manual_seed(0)
    x = 0.7 + 0.01 * torch.rand(2, 3, 32, 32, generator=g)
    y = 0.7 + 0.01 * torch.rand(2, 3, 32, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(x.bfloat16(), y)  # a network's bf16 output against a float32 target
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss(x.bfloat16().float(), y).item(), rel=1e-6)


@pytest.mark.parametrize("loss", [FocalLoss(), focal_loss])
def test_focal_loss_under_bf16_autocast(loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(logits.bfloat16(), mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss(logits.bfloat16().float(), mask).item(), rel=1e-6)


def test_in_float32_decorates_a_forward_method_too():
    from adkit.run.precision import in_float32

    class Difference(torch.nn.Module):
        @in_float32
        def forward(self, prediction, target, scale=1.0):
            return scale * (prediction - target).pow(2).mean(), prediction.dtype

    a, b = torch.rand(2, 3, 4, 4).bfloat16(), torch.rand(2, 3, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, dtype = Difference()(a, b, scale=2.0)
    assert dtype == torch.float32 and value.dtype == torch.float32
    assert value.item() == pytest.approx(2 * (a.float() - b.float()).pow(2).mean().item())


def test_built_in_losses_are_loss_components(catalog):
    from adkit.core.components import Loss

    for name in ("l2", "ssim", "focal", "color", "psnr"):
        assert isinstance(catalog["loss"].create(name), Loss)
