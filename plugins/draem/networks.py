"""DRAEM's reconstructive and discriminative sub-networks (Zavrtanik et al., ICCV 2021), widths as parameters.

At default widths (128 and 64) the parameter counts are 69,048,579 and 28,374,146, as in the reference code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def block(in_channels: int, out_channels: int, mid_channels: int | None = None) -> nn.Sequential:
    """Two conv3x3-BN-ReLU; the first maps to ``mid_channels`` (default: ``out_channels``)."""
    mid = out_channels if mid_channels is None else mid_channels
    return nn.Sequential(*conv_bn_relu(in_channels, mid), *conv_bn_relu(mid, out_channels))


def up(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear x2 upsampling (align_corners=True) then one conv-BN-ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_bn_relu(in_channels, out_channels))


class ReconstructiveSubNetwork(nn.Module):
    """Encoder b, 2b, 4b, 8b, 8b with four 2x2 max-pools; decoder of four upsampling stages; no skips."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128):
        super().__init__()
        b = base_width
        widths = [b, 2 * b, 4 * b, 8 * b, 8 * b]
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(block(previous, width))
            previous = width
        self.encoder = nn.Sequential(*layers)
        stages: list[nn.Module] = []
        for w_in, w_out in ((8 * b, 4 * b), (4 * b, 2 * b), (2 * b, b), (b, b)):
            stages += [up(w_in, w_in), block(w_in, w_out, mid_channels=w_in)]
        self.decoder = nn.Sequential(*stages, nn.Conv2d(b, out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class DiscriminativeSubNetwork(nn.Module):
    """U-Net: encoder b, 2b, 4b, 8b, 8b, 8b with five pools; decoder upsample -> conv -> concat skip -> block."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64):
        super().__init__()
        b = base_width
        widths = [b, 2 * b, 4 * b, 8 * b, 8 * b, 8 * b]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoder.append(block(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2)
        # (upsampled width, skip width, output width), deepest first
        plan = [(8 * b, 8 * b, 8 * b), (4 * b, 8 * b, 4 * b), (2 * b, 4 * b, 2 * b), (b, 2 * b, b), (b, b, b)]
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        previous = 8 * b
        for up_width, skip_width, out_width in plan:
            self.ups.append(up(previous, up_width))
            self.blocks.append(block(up_width + skip_width, out_width))
            previous = out_width
        self.head = nn.Conv2d(b, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        features = []
        for i, layer in enumerate(self.encoder):
            x = layer(self.pool(x) if i else x)
            features.append(x)
        x = features.pop()
        for up_layer, block_layer in zip(self.ups, self.blocks):
            x = block_layer(torch.cat((up_layer(x), features.pop()), dim=1))
        return self.head(x)


def reference_init(module: nn.Module) -> None:
    """DRAEM's init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
