"""Batched 2-D Perlin noise in torch, on any device.

Follows the gradient-noise construction used by DRAEM's reference (random unit gradients on a (ry+1, rx+1)
lattice, quintic fade, bilinear blend, scaled by sqrt(2)), vectorised over a batch that shares one lattice
resolution. Values lie roughly in [-1, 1].
"""

from __future__ import annotations

import math

import torch


def _fade(t: torch.Tensor) -> torch.Tensor:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(batch: int, size: tuple[int, int], res: tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Perlin noise (batch, H, W) with ``res`` = (cells along H, cells along W)."""
    height, width = size
    ry, rx = res
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    # work on a lattice-aligned canvas, then crop
    cell_h, cell_w = math.ceil(height / ry), math.ceil(width / rx)
    canvas_h, canvas_w = cell_h * ry, cell_w * rx
    angles = 2 * math.pi * torch.rand(batch, ry + 1, rx + 1, generator=generator, device=device)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # (B, ry+1, rx+1, 2)

    ys = (torch.arange(canvas_h, device=device) + 0.5) / cell_h  # lattice coordinates
    xs = (torch.arange(canvas_w, device=device) + 0.5) / cell_w
    iy, ix = ys.floor().long(), xs.floor().long()
    fy, fx = ys - iy, xs - ix  # position inside the cell, (H,), (W,)

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[:, iy + dy][:, :, ix + dx]  # (B, H, W, 2)
        return g[..., 0] * (fy - dy)[None, :, None] + g[..., 1] * (fx - dx)[None, None, :]

    ty, tx = _fade(fy)[None, :, None], _fade(fx)[None, None, :]
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    noise = math.sqrt(2) * torch.lerp(top, bottom, ty)
    return noise[:, :height, :width]


def perlin_noise_batch(resolutions: torch.Tensor, size: tuple[int, int], max_resolution: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Perlin noise (B, H, W), sample b at resolution ``resolutions[b]`` = (cells along H, cells along W), each at
    most ``max_resolution``, in one batched computation on the resolutions' device: no Python loop over
    resolutions and no host-device synchronisation (the lattice is drawn at the largest size for every sample).
    Each sample is ``perlin_noise`` at its resolution given the same lattice gradients, up to float rounding
    (``perlin_noise`` itself stays as it is: the synthetic dataset depends on its exact values)."""
    batch = resolutions.shape[0]
    angles = 2 * math.pi * torch.rand(batch, max_resolution + 1, max_resolution + 1, generator=generator,
                                      device=resolutions.device)
    return noise_from_angles(angles, resolutions, size)


def noise_from_angles(angles: torch.Tensor, resolutions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Perlin noise (B, H, W) from lattice gradient angles (B, >= ry+1, >= rx+1) at per-sample resolutions
    (B, 2) = (ry, rx)."""
    height, width = size
    device = angles.device
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # (B, Ly, Lx, 2)
    # a lattice-aligned canvas of ceil(H / ry) pixels per cell, cropped to the image
    cell = torch.stack((-(-height // resolutions[:, 0]), -(-width // resolutions[:, 1])), dim=1)  # (B, 2)
    ys = (torch.arange(height, device=device) + 0.5) / cell[:, :1]  # lattice coordinates, (B, H)
    xs = (torch.arange(width, device=device) + 0.5) / cell[:, 1:]  # (B, W)
    iy, ix = ys.floor().long(), xs.floor().long()
    fy, fx = ys - iy, xs - ix  # position inside the cell
    sample = torch.arange(angles.shape[0], device=device)[:, None, None]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[sample, (iy + dy)[:, :, None], (ix + dx)[:, None, :]]  # (B, H, W, 2)
        return g[..., 0] * (fy - dy)[:, :, None] + g[..., 1] * (fx - dx)[:, None, :]

    ty, tx = _fade(fy)[:, :, None], _fade(fx)[:, None, :]
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)


def fractal_noise(batch: int, size: tuple[int, int], base_res: int, octaves: int, persistence: float = 0.5,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Sum of ``octaves`` Perlin layers, resolution doubling and amplitude times ``persistence`` each layer."""
    total = torch.zeros(batch, *size, device=device if device is not None else (generator.device if generator else None))
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        r = base_res * 2**octave
        total += amplitude * perlin_noise(batch, size, (r, r), generator, device)
        norm += amplitude
        amplitude *= persistence
    return total / norm
