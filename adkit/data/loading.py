"""Splits decoded into tensors: a dataset's samples (adkit.core.datasets) read, checked and brought to the run's
geometry once, for training, validation and test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adkit.core.components import LabelledDefects
from adkit.core.datasets import Sample
from adkit.data.geometry import Geometry, Placement
from adkit.data.io import ImageReadError, load_image, load_mask


@dataclass
class LoadedSplit:
    """A split decoded once into tensors: images (N, 3, H, W), masks (N, 1, H, W), labels (N,)."""

    samples: list[Sample]
    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)  # where each image went (its maps go back)


def load_split(samples: list[Sample], geometry: Geometry | int, skip_bad: bool = False) -> LoadedSplit:
    """Decode a split once and bring it to ``geometry`` (a square side squashes, as before geometries). Unreadable
    files raise, or with ``skip_bad`` are skipped and counted."""
    geometry = Geometry(geometry, geometry) if isinstance(geometry, int) else geometry
    h, w = geometry.size
    kept: list[Sample] = []
    images, masks, placements = [], [], []
    skipped: list[tuple[Path, str]] = []
    for sample in samples:
        try:
            image, placement = geometry.to_input(load_image(sample.path))
            mask = geometry.to_input(load_mask(sample.mask), mask=True)[0] if sample.mask is not None else \
                torch.zeros(1, h, w)
        except ImageReadError as exc:
            if not skip_bad:
                raise
            skipped.append((sample.path, exc.message))
            continue
        kept.append(sample)
        images.append(image)
        masks.append(mask)
        placements.append(placement)
    if not kept:
        return LoadedSplit([], torch.zeros(0, 3, h, w), torch.zeros(0, 1, h, w), torch.zeros(0, dtype=torch.long),
                           skipped)
    labels = torch.tensor([s.label for s in kept], dtype=torch.long)
    return LoadedSplit(kept, torch.stack(images), torch.stack(masks), labels, skipped, placements)


def load_defects(samples: list[Sample], geometry: Geometry, skip_bad: bool = False) -> LabelledDefects | None:
    """The labelled defective training images (a dataset's train_defects) at ``geometry``, as the detector sees
    them (tiles where it tiles); None without any. A tile of an image given with its label only keeps the label
    (its mask unknown)."""
    if not samples:
        return None
    loaded = load_split(samples, geometry, skip_bad)
    masked = torch.tensor([s.mask is not None for s in loaded.samples])
    images, masks = geometry.tiles(loaded.images), geometry.tiles(loaded.masks)
    per_image = images.shape[0] // max(1, len(loaded.samples))
    return LabelledDefects(images, masks, masked.repeat_interleave(per_image), tiles=per_image)
