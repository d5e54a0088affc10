"""PatchCore with the labelled defects a line has: a second, small memory bank of defective patch features.

Which patches join it: of an image given with its mask, the cells of the feature grid the mask covers by at least
half (DEFECT_COVER), and the most covered cell where no cell reaches that (a defect smaller than a cell); of an
image given with its label only (weak supervision), or whose mask is empty, its one patch farthest from the normal
bank over all its tiles: the part of a defective image least like any normal one.

How they score: a patch's distance to its nearest normal feature d_N, weighted by its share of the two distances,
``d_N * d_N / (d_N + d_D)`` with d_D the distance to the nearest defective feature. A patch much nearer the normal
bank than the defective one (normal texture) is pushed down by d_N / d_D; one as near to both (a defect of a kind
not labelled) keeps about half its distance; one nearer a labelled defect keeps nearly all of it. Without defects
the score is d_N unchanged. docs/methods/patchcore.md gives the measurements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import LabelledDefects

# a grid cell counts as defective when the mask covers at least this share of it
DEFECT_COVER = 0.5
EMBED_BATCH = 8  # defect images embedded at a time


def defect_patches(defects: LabelledDefects, embed: Callable[[Tensor], Tensor],
                   normal_distance: Callable[[Tensor], Tensor]) -> Tensor:
    """The defective patch features (K, dim) of ``defects`` by the rule above. ``embed`` maps images (B, 3, H, W)
    to patch features (B, dim, h, w); ``normal_distance`` maps features (M, dim) to their distance (M,) to the
    nearest normal bank feature."""
    if defects is None or len(defects.images) == 0:
        return torch.zeros(0, 0)
    embedded = torch.cat([embed(defects.images[i:i + EMBED_BATCH])
                          for i in range(0, len(defects.images), EMBED_BATCH)])
    n, dim, h, w = embedded.shape
    patches = embedded.permute(0, 2, 3, 1).reshape(n, h * w, dim)
    cover = F.adaptive_avg_pool2d(defects.masks.float().to(embedded.device), (h, w)).reshape(n, h * w)
    masked = defects.masked.to(embedded.device).bool()
    chosen: list[Tensor] = []
    tiles = max(1, defects.tiles)
    for first in range(0, n, tiles):
        rows = slice(first, first + tiles)
        image_cover, image_patches = cover[rows].reshape(-1), patches[rows].reshape(-1, dim)
        if bool(masked[rows].any()) and bool((image_cover > 0).any()):
            keep = image_cover >= DEFECT_COVER
            if not keep.any():
                keep = image_cover == image_cover.max()
            chosen.append(image_patches[keep])
        else:  # the label alone: the patch farthest from every normal one
            chosen.append(image_patches[normal_distance(image_patches).argmax()][None])
    return torch.cat(chosen)


def weighted_by_defects(normal: Tensor, defective: Tensor) -> Tensor:
    """d_N * d_N / (d_N + d_D), elementwise; 0 where both are 0."""
    return normal * (normal / (normal + defective).clamp_min(torch.finfo(normal.dtype).tiny))
