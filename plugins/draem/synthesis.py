"""DRAEM's anomaly synthesis, batched on the model's device (spec §1).

Per sample: with p = 0.3 the normal image is rotated by U(-90, 90) degrees; a Perlin mask at resolution
(2^a, 2^b), a, b ~ U{0..5}, rotated by U(-90, 90) degrees and thresholded at 0.5; an anomaly source (a texture
with 3 of 10 augmentations or, when no texture folder is given, one of FALLBACKS below); blend with
beta ~ U[0, 0.8): x_aug = x (1 - M) + (1 - beta) src M + beta x M; with p = 0.5 no anomaly.

Everything is tensor code over the batch, with no host-device synchronisation: Perlin noise at per-sample
resolutions in one batched computation, and the 10 augmenters each applied to the whole batch and kept where drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import AdkitError, ImageReadError, is_image_file, load_image, perlin_noise_batch

# Anomaly sources without a texture folder. "perlin": the common fallback of spec §1 (the mask's own noise, grey);
# "noise-texture": colour Perlin textures at random resolutions through DRAEM's 3-of-10 augmenters (its source
# pipeline fed with procedural textures); "self": another normal image of the batch through the same augmenters.
FALLBACKS = ("perlin", "noise-texture", "self")
AUGMENTERS = ("gamma", "brightness", "sharpness", "hue_saturation", "solarize", "posterize", "invert",
              "autocontrast", "equalize", "rotate")


@dataclass
class SynthesisSettings:
    rotate_p: float = 0.3
    no_anomaly_p: float = 0.5
    beta_max: float = 0.8
    perlin_max_exponent: int = 5
    threshold: float = 0.5
    fallback: str = "perlin"  # the anomaly source when no texture folder is given: one of FALLBACKS


@dataclass
class SynthesisBatch:
    """normal: the (possibly rotated) normal images, the reconstruction target (B, 3, H, W); augmented: with
    anomalies (B, 3, H, W); mask (B, 1, H, W) in {0, 1}; beta (B,); has_anomaly (B,) bool."""

    normal: Tensor
    augmented: Tensor
    mask: Tensor
    beta: Tensor
    has_anomaly: Tensor


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image (B, C, H, W) about its centre by ``degrees`` (B,), zero fill, bilinear."""
    return kornia.geometry.transform.rotate(images, degrees.to(images.dtype), mode="bilinear", padding_mode="zeros")


def perlin_masks(batch: int, size: tuple[int, int], g: torch.Generator, settings: SynthesisSettings,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """(noise, mask), each (B, 1, H, W): rotated Perlin noise at random resolutions and its 0.5 threshold."""
    noise = _perlin_at_random_resolutions(batch, 1, size, g, settings, device)
    noise = rotate(noise, _uniform(batch, -90, 90, g, device))
    mask = (noise > settings.threshold).to(noise.dtype)
    return noise, mask


def _perlin_at_random_resolutions(batch: int, channels: int, size: tuple[int, int], g: torch.Generator,
                                  settings: SynthesisSettings, device: torch.device) -> Tensor:
    """(B, C, H, W) Perlin noise, each sample at resolution (2^a, 2^b), a, b ~ U{0..max}, shared by its channels."""
    exponents = torch.randint(0, settings.perlin_max_exponent + 1, (batch, 2), generator=g, device=device)
    resolutions = (2 ** exponents).repeat_interleave(channels, dim=0)
    noise = perlin_noise_batch(resolutions, size, 2 ** settings.perlin_max_exponent, generator=g)
    return noise.view(batch, channels, *size)


def noise_textures(batch: int, size: tuple[int, int], g: torch.Generator, settings: SynthesisSettings,
                   device: torch.device) -> Tensor:
    """(B, 3, H, W) "noise-texture" sources in [0, 1]: colour Perlin noise, each sample at its own resolution."""
    return (_perlin_at_random_resolutions(batch, 3, size, g, settings, device) * 0.5 + 0.5).clamp(0, 1)


def fallback_textures(images: Tensor, g: torch.Generator, settings: SynthesisSettings) -> Tensor:
    """Raw anomaly sources (B, 3, H, W) in [0, 1] for the "noise-texture" and "self" fallbacks."""
    if settings.fallback == "self":
        # a different image of the batch where there is one; rotation and colour come from the augmenters
        return images.roll(1, dims=0)
    return noise_textures(images.shape[0], (images.shape[-2], images.shape[-1]), g, settings, images.device)


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _draw(name: str, b: int, g: torch.Generator, device: torch.device) -> tuple[Tensor, ...]:
    """The random magnitudes of augmenter ``name`` for a batch of ``b``, each with the batch as first dimension,
    drawn in a fixed order (every augmenter draws for the whole batch, used or not, so the generator advances
    alike whichever samples use it)."""
    if name == "gamma":
        return (_uniform(b * 3, 0.5, 2.0, g, device).view(b, 3, 1, 1),)
    if name == "brightness":
        return _uniform(b, 0.8, 1.2, g, device), _uniform(b, -30, 30, g, device) / 255
    if name == "sharpness":
        return (_uniform(b, 0.0, 2.0, g, device),)
    if name == "hue_saturation":
        return _uniform(b, -50, 50, g, device) / 255 * 2 * math.pi, _uniform(b, -50, 50, g, device) / 255
    if name == "solarize":
        return _uniform(b, 32, 128, g, device) / 255, torch.rand(b, generator=g, device=device) < 0.5
    if name == "posterize":
        return (torch.randint(1, 8, (b,), generator=g, device=device),)
    if name == "rotate":
        return (_uniform(b, -45, 45, g, device),)
    return ()  # invert, autocontrast, equalize


def _apply(name: str, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """Augmenter ``name`` on every sample of ``x`` (B, 3, H, W) with its magnitudes ``params`` (from ``_draw``).
    Magnitudes follow DRAEM's imgaug ranges (0-255 values mapped to [0, 1])."""
    if name == "gamma":
        return x.clamp_min(1e-6) ** params[0]
    if name == "brightness":
        return x * _per_sample(params[0]) + _per_sample(params[1])
    if name == "sharpness":
        return kornia.enhance.sharpness(x.clamp(0, 1), params[0])
    if name == "hue_saturation":
        hsv = kornia.color.rgb_to_hsv(x.clamp(0, 1))
        h = torch.remainder(hsv[:, :1] + _per_sample(params[0]), 2 * math.pi)
        s = (hsv[:, 1:2] + _per_sample(params[1])).clamp(0, 1)
        return kornia.color.hsv_to_rgb(torch.cat((h, s, hsv[:, 2:]), 1))
    if name == "solarize":
        return torch.where((x >= _per_sample(params[0])) & _per_sample(params[1]), 1 - x, x)
    if name == "posterize":
        levels = _per_sample((2.0 ** params[0]).to(x.dtype))
        return torch.floor(x.clamp(0, 1) * 255 / (256 / levels)) * (256 / levels) / 255
    if name == "invert":
        return 1 - x
    if name == "autocontrast":
        low = x.amin(dim=(2, 3), keepdim=True)
        high = x.amax(dim=(2, 3), keepdim=True)
        return (x - low) / (high - low).clamp_min(1e-6)
    if name == "equalize":
        return kornia.enhance.equalize(x.clamp(0, 1))
    return rotate(x, params[0])


def augment(images: Tensor, chosen: Tensor, g: torch.Generator, subset: bool | None = None) -> Tensor:
    """Apply, per sample, the augmenters marked in ``chosen`` (B, 10) bool, in the order of AUGMENTERS.

    Every augmenter works per sample, so it may run on the samples that use it only (``subset``, the default on
    the CPU: 3 of 10 augmenters a sample, about a third of the work) or on the whole batch, keeping the ones
    drawn (the default on a GPU, where picking the samples out would wait on the device). Both give the same
    images."""
    b, device = images.shape[0], images.device
    subset = device.type == "cpu" if subset is None else subset
    x = images
    for k, name in enumerate(AUGMENTERS):
        use = chosen[:, k]
        params = _draw(name, b, g, device)
        if subset:
            rows = use.nonzero()[:, 0]
            if rows.numel():
                x = x.index_put((rows,), _apply(name, x[rows], tuple(p[rows] for p in params)))
        else:
            x = torch.where(_per_sample(use), _apply(name, x, params), x)
    return x.clamp(0, 1)


def choose_augmenters(batch: int, count: int, g: torch.Generator, device: torch.device) -> Tensor:
    """(B, 10) bool: ``count`` distinct augmenters per sample, drawn without replacement."""
    order = torch.rand(batch, len(AUGMENTERS), generator=g, device=device).argsort(dim=1)
    chosen = torch.zeros(batch, len(AUGMENTERS), dtype=torch.bool, device=device)
    chosen.scatter_(1, order[:, :count], True)
    return chosen


class TextureBank:
    """Anomaly-source textures held on the device as uint8 (N, 3, H, W); ``draw`` picks a batch at random."""

    def __init__(self, textures: Tensor):
        self.textures = textures

    def draw(self, batch: int, g: torch.Generator) -> Tensor:
        index = torch.randint(0, len(self.textures), (batch,), generator=g, device=g.device).to(self.textures.device)
        return self.textures[index].float() / 255


class AnomalySource(TextureBank):
    """Texture images (DTD layout: ``<dir>/<class>/*.jpg``, any depth)."""

    def __init__(self, folder: Path, size: int, device: torch.device, max_images: int = 1000, seed: int = 0):
        folder = Path(folder)
        if not folder.is_dir():
            raise AdkitError(f"--anomaly-source {folder} is not a folder (expected DTD's images/<class>/*.jpg)")
        paths = sorted(p for p in folder.rglob("*") if is_image_file(p))
        if not paths:
            raise AdkitError(f"--anomaly-source {folder} holds no images (png, jpg, bmp, tif)")
        if len(paths) > max_images:
            pick = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:max_images]
            paths = [paths[i] for i in sorted(pick.tolist())]
        textures = []
        for path in paths:
            try:
                textures.append((load_image(path, size) * 255 + 0.5).to(torch.uint8))
            except ImageReadError:
                continue  # a broken texture is not worth stopping training for
        if not textures:
            raise AdkitError(f"--anomaly-source {folder}: no readable images")
        super().__init__(torch.stack(textures).to(device))
        self.paths = paths


POOL_CHUNK = 64


def noise_texture_pool(count: int, size: tuple[int, int], g: torch.Generator,
                       settings: SynthesisSettings | None = None) -> TextureBank:
    """``count`` "noise-texture" sources (colour Perlin noise at random resolutions) made once, on the generator's
    device: drawing from them costs an index where making fresh ones costs a Perlin computation every step.
    DRAEM's augmenters still run on every draw, so each texture comes back in new colours and geometry."""
    settings = settings or SynthesisSettings()
    parts = []
    for start in range(0, count, POOL_CHUNK):
        n = min(POOL_CHUNK, count - start)
        parts.append((noise_textures(n, size, g, settings, g.device) * 255 + 0.5).to(torch.uint8))
    return TextureBank(torch.cat(parts))


def synthesize(images: Tensor, g: torch.Generator, source: TextureBank | None = None,
               settings: SynthesisSettings | None = None) -> SynthesisBatch:
    """DRAEM anomalies for a batch of normal images (B, 3, H, W) in [0, 1], on their device."""
    settings = settings or SynthesisSettings()
    if settings.fallback not in FALLBACKS:
        raise ValueError(f"fallback {settings.fallback!r}: use one of {', '.join(FALLBACKS)}")
    b, device = images.shape[0], images.device
    size = (images.shape[-2], images.shape[-1])
    rotate_me = torch.rand(b, generator=g, device=device) < settings.rotate_p
    angles = _uniform(b, -90, 90, g, device)
    normal = torch.where(_per_sample(rotate_me), rotate(images, angles), images)
    noise, mask = perlin_masks(b, size, g, settings, device)
    if source is None and settings.fallback == "perlin":
        texture = (noise * 0.5 + 0.25).expand(-1, 3, -1, -1)
    else:
        if source is not None:
            raw = source.draw(b, g)
            if raw.shape[-2:] != images.shape[-2:]:
                raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        else:
            raw = fallback_textures(images, g, settings)
        texture = augment(raw, choose_augmenters(b, 3, g, device), g)
    beta = _uniform(b, 0.0, settings.beta_max, g, device)
    has_anomaly = torch.rand(b, generator=g, device=device) >= settings.no_anomaly_p
    mask = mask * _per_sample(has_anomaly.to(mask.dtype))
    beta4 = _per_sample(beta)
    augmented = normal * (1 - mask) + (1 - beta4) * texture * mask + beta4 * normal * mask
    has_anomaly = has_anomaly & (mask.flatten(1).amax(dim=1) > 0)
    return SynthesisBatch(normal=normal, augmented=augmented.to(images.dtype), mask=mask, beta=beta,
                          has_anomaly=has_anomaly)
