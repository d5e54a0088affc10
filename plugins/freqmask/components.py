"""freqmask: the DRAEM-improvement paper's frequency filtering of anomaly maps (docs/methods/draem-improvements.md).

For each kernel size k, a Laplacian-sharpened map S_k = f + L_k * f gives the low-frequency emphasis
g_k = f + w (f - S_k) = f - w L_k * f, where L_k is the k x k all-direction Laplacian (centre k^2 - 1, all other
taps -1; kornia's Laplacian kernel negated). Each g_k and an average-pooled copy of f are computed at ``stride``
(a 256 map becomes 64 x 64 at stride 4) and combined (mean by default). Seeded Gaussian noise of std ``noise``
perturbs the filter taps (our reading of "Gaussian noise is added to all filters").
"""

from __future__ import annotations

from typing import Literal

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import PostProcessor, check_map


def emphasis_kernel(size: int, weight: float) -> Tensor:
    """The k x k kernel of g_k = f - w L_k * f: identity minus ``weight`` times the all-direction Laplacian."""
    laplacian = -kornia.filters.get_laplacian_kernel2d(size)  # centre size^2 - 1, others -1 (zero sum)
    identity = torch.zeros(size, size)
    identity[size // 2, size // 2] = 1.0
    return identity - weight * laplacian


def frequency_mask(anomaly_map: Tensor, kernels: list[Tensor], stride: int = 4,
                   combine: Literal["mean", "max"] = "mean") -> Tensor:
    """Apply each (k, k) kernel at ``stride`` with replicate borders, add an average-pooled copy of the map,
    and combine: (B, 1, H, W) -> (B, 1, ceil(H / stride), ceil(W / stride))."""
    check_map(anomaly_map, "freqmask")
    outputs = []
    out_hw = (-(-anomaly_map.shape[-2] // stride), -(-anomaly_map.shape[-1] // stride))
    for kernel in kernels:
        k = kernel.shape[-1]
        padded = F.pad(anomaly_map, (k // 2,) * 4, mode="replicate")
        filtered = F.conv2d(padded, kernel.to(anomaly_map)[None, None], stride=stride)
        outputs.append(filtered[..., : out_hw[0], : out_hw[1]])
    outputs.append(F.avg_pool2d(anomaly_map, stride, stride=stride, ceil_mode=True))
    stacked = torch.stack(outputs, dim=0)
    return stacked.mean(dim=0) if combine == "mean" else stacked.amax(dim=0)


class FreqMask(PostProcessor):
    """Low-frequency emphasis (k = 3, 5) + average pooling at stride 4, combined: the paper's freqmask."""

    def __init__(self, weight: float = 0.5, stride: int = 4, noise: float = 0.001, kernels: tuple[int, ...] = (3, 5),
                 combine: Literal["mean", "max"] = "mean", seed: int = 0):
        super().__init__()
        if stride < 1:
            raise ValueError("freqmask stride must be >= 1")
        if not kernels or any(k < 3 or k % 2 == 0 for k in kernels):
            raise ValueError("freqmask kernels must be odd sizes >= 3, e.g. kernels=3+5")
        if noise < 0:
            raise ValueError("freqmask noise must be >= 0")
        self.stride, self.combine = stride, combine
        generator = torch.Generator().manual_seed(seed)
        for i, k in enumerate(kernels):
            kernel = emphasis_kernel(k, weight) + noise * torch.randn(k, k, generator=generator)
            self.register_buffer(f"kernel{i}", kernel)
        self.count = len(kernels)

    def kernels(self) -> list[Tensor]:
        return [getattr(self, f"kernel{i}") for i in range(self.count)]

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return frequency_mask(anomaly_map, self.kernels(), self.stride, self.combine)
