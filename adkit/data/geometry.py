"""Input geometry: how an image of any size and shape becomes the network's input, and how a map goes back.

A ``Geometry`` is the input size (height x width), how images of another shape get there (``resize``), and an
optional tiling (``tile``, ``overlap``: adkit.core.tiling) when the input is larger than what the detector sees:

- ``squash``: resize to height x width, aspect ratio lost (every image fills the input);
- ``pad``: scale to fit inside height x width keeping the aspect ratio, centred, the rest filled by repeating the
  image's border pixels (so the padding looks like the part's edge, not like a black frame); masks pad with 0;
- ``crop``: scale to cover height x width keeping the aspect ratio, and cut the centre out.

``Placement`` records where one image went, so that its anomaly map can be returned at the image's own size:
``to_original`` undoes the resize (for ``crop``, the cut-off border gets the map's lowest value: it was not seen).
Without tiling the detector sees the whole input, which must then be square; with tiling it sees square tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adkit.core import console
from adkit.core.tiling import Tiling

RESIZE_MODES = ("squash", "pad", "crop")


class GeometryError(ValueError):
    """A geometry that cannot work; the message names the option and the fix."""


def parse_size(text: str | int) -> tuple[int, int]:
    """``256`` or ``"256"`` -> (256, 256); ``"512x256"`` (width x height) -> (height 256, width 512)."""
    raw = str(text).strip().lower()
    width, sep, height = raw.partition("x")
    try:
        w, h = (int(width), int(height)) if sep else (int(raw), int(raw))
    except ValueError:
        raise GeometryError(f"--image-size {text}: write a side in pixels (256) or WIDTHxHEIGHT (512x256)") from None
    if w < 1 or h < 1:
        raise GeometryError(f"--image-size must be >= 1, got {text}")
    return h, w


@dataclass(frozen=True)
class Placement:
    """Where an image of ``original`` (h, w) went in the input: scaled to ``scaled`` (h, w) and put at ``offset``
    (top, left), which is negative for ``crop`` (the part cut away)."""

    original: tuple[int, int]
    scaled: tuple[int, int]
    offset: tuple[int, int]


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    resize: str = "squash"
    tile: int = 0  # 0: no tiling
    overlap: float = 0.0

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise GeometryError(f"--resize {self.resize}: choose {', '.join(RESIZE_MODES)}")
        if self.tile:
            if self.tile > min(self.height, self.width):
                raise GeometryError(f"--tile {self.tile} is larger than the image ({self.width}x{self.height}): "
                                    "choose a smaller tile or a larger --image-size")
            if not 0 <= self.overlap < 1:
                raise GeometryError(f"--overlap {self.overlap} must be in [0, 1): the fraction tiles share")
        elif self.height != self.width:
            raise GeometryError(f"--image-size {self.width}x{self.height} is not square: detectors see square "
                                f"inputs; add --tile SIZE (e.g. --tile {min(self.height, self.width)}), or give one "
                                "side and --resize pad to keep the aspect ratio")
        elif self.overlap:
            raise GeometryError("--overlap needs --tile SIZE")

    @property
    def size(self) -> tuple[int, int]:
        """The input's (height, width)."""
        return self.height, self.width

    @property
    def detector_size(self) -> int:
        """The side of the square the detector sees: the tile, or the whole input."""
        return self.tile or self.height

    def tiling(self) -> Tiling | None:
        """The tiling of a geometry with tiles; None without."""
        return Tiling(self.size, self.tile, self.overlap) if self.tile else None

    def tiles(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs (N, C, height, width) as the detector sees them: (N * tiles, C, tile, tile) with tiles, else
        unchanged."""
        tiling = self.tiling()
        return images if tiling is None else tiling.split(images)

    def __str__(self) -> str:
        text = f"{self.width}x{self.height},resize={self.resize}"
        return text + (f",tile={self.tile},overlap={self.overlap:g}" if self.tile else "")

    def as_dict(self) -> dict[str, object]:
        return {"height": self.height, "width": self.width, "resize": self.resize, "tile": self.tile,
                "overlap": self.overlap}

    @classmethod
    def from_dict(cls, record: dict[str, object] | None, side: int) -> Geometry:
        """A recorded geometry; a checkpoint from before geometries had a square ``side`` and squashed."""
        if not record:
            return cls(side, side)
        return cls(int(record["height"]), int(record["width"]), str(record["resize"]), int(record["tile"]),
                   float(record["overlap"]))

    def place(self, original: tuple[int, int]) -> Placement:
        h0, w0 = original
        if self.resize == "squash":
            return Placement(original, (self.height, self.width), (0, 0))
        scale = (min if self.resize == "pad" else max)(self.height / h0, self.width / w0)
        scaled = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
        if self.resize == "crop":  # cover: never smaller than the input
            scaled = (max(scaled[0], self.height), max(scaled[1], self.width))
        else:  # fit: never larger
            scaled = (min(scaled[0], self.height), min(scaled[1], self.width))
        return Placement(original, scaled, ((self.height - scaled[0]) // 2, (self.width - scaled[1]) // 2))

    def to_input(self, image: torch.Tensor, mask: bool = False) -> tuple[torch.Tensor, Placement]:
        """(C, h, w) -> (C, height, width) and its placement. Images resize bilinearly with antialiasing; masks
        too, then binarise at 0.5 (padding 0)."""
        placement = self.place(tuple(image.shape[-2:]))
        scaled = _resize(image, placement.scaled)
        top, left = placement.offset
        if top >= 0 and left >= 0:  # squash or pad: put the scaled image in the middle, repeat its border
            bottom, right = self.height - scaled.shape[-2] - top, self.width - scaled.shape[-1] - left
            if (top, left, bottom, right) != (0, 0, 0, 0):
                mode = "constant" if mask else "replicate"
                scaled = F.pad(scaled[None], (left, right, top, bottom), mode=mode)[0]
        else:  # crop: cut the middle out
            scaled = scaled[..., -top:-top + self.height, -left:-left + self.width]
        return ((scaled > 0.5).float() if mask else scaled.clamp(0, 1)), placement

    def to_original(self, maps: torch.Tensor, placement: Placement) -> torch.Tensor:
        """A map (C, height, width) over the input -> (C, h, w) over the original image."""
        top, left = placement.offset
        sh, sw = placement.scaled
        if top >= 0 and left >= 0:
            content = maps[..., top:top + sh, left:left + sw]
            return _resize(content, placement.original, antialias=False)
        canvas = torch.full((maps.shape[0], sh, sw), float(maps.min()), dtype=maps.dtype)
        canvas[..., -top:-top + self.height, -left:-left + self.width] = maps
        return _resize(canvas, placement.original, antialias=False)


def _resize(tensor: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=antialias)[0]


# the default geometry: images whose long side is at least LONG_ASPECT times the short one are tiled at their own
# aspect instead of squashed (KolektorSDD's 1:2.5 parts: docs/benchmarks.md, "The real-data suite")
LONG_ASPECT = 1.5
TILE_OVERLAP = 0.25


def native_geometry(side: int, shape: tuple[int, int] | None) -> Geometry:
    """The default geometry for images of typical ``shape`` (height, width): a ``side`` square, squashed, for
    images near square (or of unknown shape); for long ones, square tiles of ``side`` along the long side, which
    becomes the whole number of tile strides (TILE_OVERLAP overlap) nearest to ``side`` times the aspect."""
    if shape is None or min(shape) < 1 or max(shape) / min(shape) < LONG_ASPECT:
        return Geometry(side, side)
    stride = max(1, round(side * (1 - TILE_OVERLAP)))
    long = side + max(1, round((side * max(shape) / min(shape) - side) / stride)) * stride
    height, width = (long, side) if shape[0] > shape[1] else (side, long)
    return Geometry(height, width, "squash", side, TILE_OVERLAP)


def choose_geometry(side: int, image_size: str | int | None = None, resize: str | None = None, tile: int | None = None,
                    overlap: float | None = None, shapes: list[tuple[int, int] | None] | None = None) -> Geometry:
    """The input geometry the options ask for (--image-size, --resize, --tile, --overlap), else a ``side`` square.
    With none of those options it follows the images of typical ``shapes`` (``native_geometry``): squashed to a
    square, or, when they are all far from square the same way, tiled at their own aspect."""
    if tile is not None and tile < 1:
        raise GeometryError(f"--tile must be >= 1, got {tile}")
    if all(option is None for option in (image_size, resize, tile, overlap)) and shapes:
        geometries = {native_geometry(side, shape) for shape in shapes}
        if len(geometries) == 1 and (geometry := geometries.pop()).tile:
            h, w = shapes[0]
            console.say(f"images of about {w}x{h} px are far from square: tiles of {geometry.tile} px over "
                        f"{geometry.width}x{geometry.height}, at their own aspect (--image-size {side} squashes "
                        "them to a square)")
            return geometry
    height, width = parse_size(image_size or side)
    return Geometry(height, width, resize or "squash", tile or 0, overlap or 0.0)
