"""Procedural textures with exact defect masks, deterministic from a seed, written in the MVTec AD layout (the
built-in ``synthetic`` dataset reads them; adkit.testing's tiny images are the same textures).

Five texture categories resembling MVTec's (carpet, grid, leather, tile, wood) built from procedural noise and
periodic patterns, with per-image variation (offset, rotation, colour, lighting). Six defect types resembling the
real ones (scratch, cut, hole, stain, crease, thread), each with an exact ground-truth mask: every pixel a defect
changes is in its mask, at several sizes and at contrasts from subtle to strong.

With ``object`` the texture is an object instead: shrunk to that fraction of the image side and placed near the
centre of a flat dark background (defects only on the object), the way many inspection images show one part.
Most patches of such images are the same background, a case approximate searches can miss.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from adkit.core import threads
from adkit.data.io import save_image
from adkit.data.perlin import fractal_noise, perlin_noise

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
DEFECTS = ("scratch", "cut", "hole", "stain", "crease", "thread")
TEXTURES_FORMAT = 2

Texture = Callable[[torch.Generator, int], torch.Tensor]


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _coords(g: torch.Generator, size: int, max_rotation_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated and offset coordinates (u, v), in image widths, for a texture's pattern."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    theta = math.radians(_uniform(g, -max_rotation_deg, max_rotation_deg))
    ox, oy = _uniform(g, 0, 10), _uniform(g, 0, 10)
    u = math.cos(theta) * x + math.sin(theta) * y + ox
    v = -math.sin(theta) * x + math.cos(theta) * y + oy
    return u, v


def _colourise(intensity: torch.Tensor, g: torch.Generator, base: tuple[float, float, float],
               jitter: float) -> torch.Tensor:
    colour = torch.tensor(base) + jitter * (2 * torch.rand(3, generator=g) - 1)
    return intensity[None] * (colour / max(base))[:, None, None]


def carpet(g: torch.Generator, size: int) -> torch.Tensor:
    u, v = _coords(g, size, 8)
    cells = _uniform(g, 16, 22)
    cu, cv = u * cells, v * cells
    checker = (torch.floor(cu) + torch.floor(cv)) % 2
    weave = torch.where(checker > 0, torch.sin(math.pi * cv * 3).abs(), torch.sin(math.pi * cu * 3).abs()).sqrt()
    fibre = fractal_noise(1, (size, size), 16, 3, generator=g)[0]
    coarse = perlin_noise(1, (size, size), (4, 4), generator=g)[0]
    intensity = 0.5 + 0.25 * weave + 0.12 * fibre + 0.06 * coarse
    return _colourise(intensity, g, (0.62, 0.52, 0.42), 0.03)


def grid(g: torch.Generator, size: int) -> torch.Tensor:
    u, v = _coords(g, size, 5)
    cells = _uniform(g, 9, 12)
    width = _uniform(g, 0.08, 0.12)
    du = (u * cells - torch.round(u * cells)).abs()
    dv = (v * cells - torch.round(v * cells)).abs()
    wires = torch.maximum(torch.exp(-((du / width) ** 2)), torch.exp(-((dv / width) ** 2)))
    sheen = 0.8 + 0.2 * perlin_noise(1, (size, size), (3, 3), generator=g)[0]
    grain = 0.04 * fractal_noise(1, (size, size), 32, 2, generator=g)[0]
    intensity = 0.18 + 0.55 * wires * sheen + grain
    return _colourise(intensity, g, (0.6, 0.6, 0.6), 0.02)


def leather(g: torch.Generator, size: int) -> torch.Tensor:
    ridges = 1 - perlin_noise(1, (size, size), (24, 24), generator=g)[0].abs()
    fine = 1 - perlin_noise(1, (size, size), (48, 48), generator=g)[0].abs()
    shade = fractal_noise(1, (size, size), 4, 3, generator=g)[0]
    intensity = 0.42 + 0.18 * ridges**4 + 0.08 * fine**3 + 0.07 * shade
    return _colourise(intensity, g, (0.6, 0.36, 0.22), 0.05)


def tile(g: torch.Generator, size: int) -> torch.Tensor:
    mottle = fractal_noise(1, (size, size), 4, 4, generator=g)[0]
    speck = perlin_noise(1, (size, size), (32, 32), generator=g)[0]
    spots = perlin_noise(1, (size, size), (12, 12), generator=g)[0]
    intensity = 0.6 + 0.1 * mottle - 0.25 * (speck > 0.45).float() * (0.5 + 0.5 * speck) + 0.1 * (spots < -0.55).float()
    return _colourise(intensity, g, (0.62, 0.62, 0.58), 0.03)


def wood(g: torch.Generator, size: int) -> torch.Tensor:
    u, v = _coords(g, size, 12)
    warp = 0.06 * perlin_noise(1, (size, size), (3, 3), generator=g)[0]
    rings = _uniform(g, 7, 12)
    phase = rings * (v + warp) + 0.15 * torch.sin(2 * math.pi * u * _uniform(g, 0.5, 1.5))
    grain = torch.sin(2 * math.pi * phase) ** 2
    fibres = perlin_noise(1, (size, size), (4, 64), generator=g)[0]
    intensity = 0.5 + 0.16 * grain + 0.05 * fibres + 0.04 * fractal_noise(1, (size, size), 8, 2, generator=g)[0]
    return _colourise(intensity, g, (0.78, 0.56, 0.36), 0.05)


TEXTURE_FUNCTIONS: dict[str, Texture] = {"carpet": carpet, "grid": grid, "leather": leather, "tile": tile, "wood": wood}


def _lighting(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    size = image.shape[-1]
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, size), torch.linspace(-0.5, 0.5, size), indexing="ij")
    ramp = 1 + _uniform(g, -0.15, 0.15) * x + _uniform(g, -0.15, 0.15) * y
    return (image * ramp * _uniform(g, 0.9, 1.1)).clamp(0, 1)


def _curve_distance(g: torch.Generator, size: int, length: float, curliness: float) -> torch.Tensor:
    """Distance (H, W) in pixels from each pixel to a random smooth curve of ``length`` pixels."""
    n = 64
    start = torch.rand(2, generator=g) * size * 0.6 + size * 0.2
    heading = _uniform(g, 0, 2 * math.pi)
    turns = torch.cumsum(torch.randn(n, generator=g) * curliness, 0) + heading
    steps = torch.stack((torch.cos(turns), torch.sin(turns)), 1) * (length / n)
    points = start + torch.cumsum(steps, 0)  # (n, 2) as (y, x)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    pix = torch.stack((y, x), -1).reshape(-1, 1, 2)
    return torch.cdist(pix.reshape(-1, 2), points).min(dim=1).values.reshape(size, size)


def _blob(g: torch.Generator, size: int, radius: float, roughness: float) -> torch.Tensor:
    """A boolean blob (H, W): an ellipse with a Perlin-distorted boundary."""
    cy, cx = (torch.rand(2, generator=g) * 0.6 + 0.2) * size
    aspect = _uniform(g, 0.5, 1.0)
    angle = _uniform(g, 0, math.pi)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    dy, dx = y - cy, x - cx
    a = math.cos(angle) * dx + math.sin(angle) * dy
    b = (-math.sin(angle) * dx + math.cos(angle) * dy) / aspect
    r = torch.sqrt(a**2 + b**2) / radius
    wobble = roughness * perlin_noise(1, (size, size), (8, 8), generator=g)[0]
    blob = r + wobble < 1
    if not blob.any():
        blob[int(cy.clamp(0, size - 1)), int(cx.clamp(0, size - 1))] = True
    return blob


def add_defect(image: torch.Tensor, defect: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one defect to a texture (3, H, W); returns the image and its exact mask (1, H, W) float."""
    size = image.shape[-1]
    contrast = _uniform(g, 0.06, 0.45)  # subtle to strong
    scale = _uniform(g, 0.5, 1.5) * size / 256  # defect size relative to a 256 px image
    out = image.clone()
    if defect in ("scratch", "cut", "thread"):
        width = {"scratch": _uniform(g, 1.0, 2.5), "cut": _uniform(g, 2.0, 5.0), "thread": _uniform(g, 1.5, 3.0)}[defect]
        width *= max(scale, 0.5)
        length = _uniform(g, 0.15, 0.45) * size
        curl = {"scratch": 0.03, "cut": 0.02, "thread": 0.25}[defect]
        dist = _curve_distance(g, size, length, curl)
        mask = dist < width / 2
        profile = (1 - dist / (width / 2)).clamp(0, 1).sqrt()
        if defect == "scratch":
            out = out + (contrast * profile * (1 if torch.rand((), generator=g) < 0.7 else -1))[None]
        elif defect == "cut":
            out = out * (1 - 0.5 * (1 + contrast) * profile)[None]
        else:
            colour = torch.rand(3, generator=g)[:, None, None]
            alpha = (0.4 + contrast) * profile
            out = out * (1 - alpha)[None] + colour * alpha[None]
    elif defect == "hole":
        mask = _blob(g, size, _uniform(g, 5, 18) * scale + 1.5, 0.15)
        depth = 0.35 + contrast
        out = torch.where(mask[None], out * (1 - depth) + 0.04 * depth, out)
    elif defect == "stain":
        mask = _blob(g, size, _uniform(g, 10, 35) * scale + 2, 0.35)
        shift = (2 * torch.rand(3, generator=g) - 1)
        shift = shift / shift.abs().max() * contrast * 0.6
        out = torch.where(mask[None], out + shift[:, None, None], out)
    elif defect == "crease":
        angle = _uniform(g, 0, math.pi)
        y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                              indexing="ij")
        cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * size
        across = math.cos(angle) * (x - cx) + math.sin(angle) * (y - cy)
        along = -math.sin(angle) * (x - cx) + math.cos(angle) * (y - cy)
        half = _uniform(g, 2.5, 7) * max(scale, 0.5)
        half_length = _uniform(g, 0.2, 0.45) * size
        mask = (across.abs() < half) & (along.abs() < half_length)
        shading = torch.sin(math.pi * across / half) * contrast * 0.8  # lit on one side, shadowed on the other
        out = torch.where(mask[None], out * (1 + shading)[None], out)
    else:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")
    return out.clamp(0, 1), mask[None].float()


def _generator(*key: object) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def normal_image(category: str, size: int, seed: int, split: str, index: int) -> torch.Tensor:
    """A defect-free texture image (3, H, W), determined by its arguments alone."""
    g = _generator(seed, category, split, index)
    return _lighting(TEXTURE_FUNCTIONS[category](g, size).clamp(0, 1), g)


def defective_image(category: str, defect: str, size: int, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A texture with one defect (3, H, W) and its mask (1, H, W)."""
    g = _generator(seed, category, "test", defect, index)
    texture = TEXTURE_FUNCTIONS[category](g, size).clamp(0, 1)
    image, mask = add_defect(texture, defect, g)
    return _lighting(image, g), mask


BACKGROUND = 0.08  # the flat background of object images: dark grey, as a part photographed on a dark table
BACKGROUND_NOISE = 0.01  # its per-pixel noise (standard deviation)


def as_object(image: torch.Tensor, mask: torch.Tensor | None, fraction: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The texture (3, S, S) shrunk to ``fraction`` of the side and placed on a flat background, its centre
    within S / 16 of the image's; the mask (1, S, S) goes with it: every pixel the shrunk defect touches."""
    size = image.shape[-1]
    side = max(1, round(fraction * size))
    jitter = size // 16
    y0, x0 = ((size - side) // 2 + int(torch.randint(-jitter, jitter + 1, (), generator=g)) for _ in range(2))
    y0, x0 = min(max(y0, 0), size - side), min(max(x0, 0), size - side)
    # a photographed background: the same dark grey, a little brighter or darker per image, with sensor noise
    level = BACKGROUND * _uniform(g, 0.85, 1.15)
    out = level + BACKGROUND_NOISE * torch.randn(image.shape, generator=g)
    out[:, y0:y0 + side, x0:x0 + side] = F.interpolate(image[None], size=(side, side), mode="bilinear",
                                                       antialias=True, align_corners=False)[0]
    if mask is None:
        return out.clamp(0, 1), None
    placed = torch.zeros_like(mask)
    small = F.interpolate(mask[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    placed[:, y0:y0 + side, x0:x0 + side] = (small > 0).float()
    return out.clamp(0, 1), placed


def write_category(root: Path, category: str, size: int, seed: int, n_train: int, n_test: int,
                   object_fraction: float = 0.0) -> None:
    """Write one category in the MVTec layout under ``root/category``: half the test images are defective,
    spread evenly over the defect types. With ``object_fraction`` each texture is an object on a flat background
    (``as_object``)."""
    base = root / category
    (base / "train" / "good").mkdir(parents=True, exist_ok=True)
    (base / "test" / "good").mkdir(parents=True, exist_ok=True)

    def placed(image: torch.Tensor, mask: torch.Tensor | None, *key: object):
        return (image, mask) if not object_fraction else \
            as_object(image, mask, object_fraction, _generator(seed, category, "object", *key))

    for i in range(n_train):
        threads.rebalance()
        image, _ = placed(normal_image(category, size, seed, "train", i), None, "train", i)
        save_image(image, base / "train" / "good" / f"{i:03d}.png")
    n_defective = n_test // 2
    for i in range(n_test - n_defective):
        image, _ = placed(normal_image(category, size, seed, "test", i), None, "test", i)
        save_image(image, base / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defective):
        threads.rebalance()
        defect = DEFECTS[i % len(DEFECTS)]
        image, mask = placed(*defective_image(category, defect, size, seed, i), "defect", i)
        (base / "test" / defect).mkdir(parents=True, exist_ok=True)
        (base / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        save_image(image, base / "test" / defect / f"{i:03d}.png")
        save_image(mask, base / "ground_truth" / defect / f"{i:03d}_mask.png")


def write_textures(out: Path, categories: list[str], size: int, seed: int, n_train: int, n_test: int,
                  object_fraction: float = 0.0) -> None:
    """Write categories atomically: each is built in a temporary folder beside ``out`` and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    for category in categories:
        final = out / category
        if final.exists():
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{category}-", dir=out))
        try:
            write_category(tmp, category, size, seed, n_train, n_test, object_fraction)
            try:
                os.replace(tmp / category, final)
            except OSError:
                if not final.is_dir():  # another process (e.g. another rank) finished the same category first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
