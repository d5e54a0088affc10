"""Tiling: a large input cut into square tiles the detector sees, and the tiles' maps stitched back.

Tiles of side ``tile`` start every ``stride = max(1, round(tile * (1 - overlap)))`` pixels along each axis; the
last tile of a row or column is moved back to end at the border, so every pixel is covered and no tile pads. Maps
are blended where tiles overlap with a separable weight that is highest in a tile's middle and lowest (but above
zero) at its edges, normalised by the summed weights: a pixel's value is a weighted mean of the tiles covering it,
so tiles that agree stitch to exactly their value (no seams), and where they disagree the tile that sees the
pixel farther from its own border counts more. All positions are fixed by the input size, so the stitching traces
into an exported graph as static slices and pads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EDGE_WEIGHT = 0.1  # a tile's weight at its border, relative to 1 in its middle


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis of ``length`` pixels."""
    if tile >= length:
        return [0]
    stride = max(1, round(tile * (1 - overlap)))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(tile: int) -> Tensor:
    """(tile, tile) weights: a tent from EDGE_WEIGHT at the border to 1 in the middle (separable)."""
    position = (torch.arange(tile, dtype=torch.float32) + 0.5) / tile
    tent = EDGE_WEIGHT + (1 - EDGE_WEIGHT) * (1 - (2 * position - 1).abs())
    return tent[:, None] * tent[None, :]


class Tiling(nn.Module):
    """Images (B, C, H, W) <-> tiles (B * T, C, tile, tile), T tiles per image in row-major order."""

    def __init__(self, size: tuple[int, int], tile: int, overlap: float):
        super().__init__()
        self.size, self.tile, self.overlap = (int(size[0]), int(size[1])), int(tile), float(overlap)
        self.positions = [(y, x) for y in tile_starts(self.size[0], self.tile, self.overlap)
                          for x in tile_starts(self.size[1], self.tile, self.overlap)]
        window = blend_window(self.tile)
        total = torch.zeros(self.size)
        for y, x in self.positions:
            total[y:y + self.tile, x:x + self.tile] += window
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("total", total, persistent=False)

    @property
    def count(self) -> int:
        return len(self.positions)

    def split(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B * T, C, tile, tile): each image's tiles together."""
        if tuple(images.shape[-2:]) != self.size:
            raise ValueError(f"tiling expects {self.size[1]}x{self.size[0]} inputs, got "
                             f"{images.shape[-1]}x{images.shape[-2]}")
        tiles = [images[..., y:y + self.tile, x:x + self.tile] for y, x in self.positions]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def stitch(self, maps: Tensor) -> Tensor:
        """Tile maps (B * T, C, tile, tile) -> blended maps (B, C, H, W)."""
        b = maps.shape[0] // self.count
        per_image = maps.unflatten(0, (b, self.count)) * self.window.to(maps.dtype)
        height, width = self.size
        out = torch.zeros(b, maps.shape[1], height, width, dtype=maps.dtype, device=maps.device)
        for i, (y, x) in enumerate(self.positions):
            out = out + F.pad(per_image[:, i], (x, width - x - self.tile, y, height - y - self.tile))
        return out / self.total.to(maps.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, tile={self.tile}, overlap={self.overlap}, tiles={self.count}"
