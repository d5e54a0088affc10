"""Energy-based detectors (spec §3): ``ebm-image`` on whole images, ``ebm-patch`` on crops around the centre.

Inputs in [0, 1] are scaled to [-1, 1]; the network's f(x) is high on normal data; the anomaly score is the
energy E(x) = -f(x). Training: contrastive divergence L = mean f(x_sample) - mean f(x_data + noise), samples
from a sampler (PYLD-M-N by default) started from a replay buffer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import Detector, DetectorContext, build_backbone
from adkit_plugins.ebm.networks import PretrainedEnergy, energy_network
from adkit_plugins.ebm.samplers import ReplayBuffer


class EBMImage(Detector):
    """Image-level EBM: whole images, score = energy."""

    image_level = True
    default_postprocessors = ()
    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"sampler", "backbone"})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"image_size": 32, "batch_size": 16, "steps": 300,
                  "params": {"depth": 10, "widen": 2, "buffer_size": 500, "lr": 1e-4, "sampler": "pyld:M=5,N=3"}},
        "paper": {"image_size": 128, "batch_size": 32, "steps": 20000,
                  "params": {"depth": 28, "widen": 10, "buffer_size": 10000, "sampler": "pyld:M=20,N=10"}},
    }

    def __init__(self, backbone: str = "wrn", depth: int = 28, widen: int = 10, lr: float = 1e-4,
                 weight_decay: float = 4e-4, data_noise: float = 0.1, buffer_size: int = 10000,
                 reinit: float = 0.05, buffer_init: Literal["gaussian", "uniform"] = "gaussian",
                 sampler: str = "pyld", buffer_rank: int = 0, energy_penalty: float = 0.0,
                 trunk: Literal["frozen", "finetune"] = "frozen", trunk_layer: int = 3, trunk_lr: float = 1e-5,
                 head_width: int = 256):
        super().__init__()
        if lr <= 0 or weight_decay < 0 or data_noise < 0 or energy_penalty < 0 or trunk_lr <= 0 or head_width < 1:
            raise ValueError("ebm needs lr > 0, weight_decay >= 0, data_noise >= 0, energy_penalty >= 0, "
                             "trunk_lr > 0, head_width >= 1")
        # alpha * (f(x_data)^2 + f(x_sample)^2), as in Du & Mordatch (2019): keeps the energies from running away
        # when the contrastive-divergence loss drifts; not in the spec's reading of the paper, so 0 by default
        self.energy_penalty = energy_penalty
        # "wrn" or a timm model name: a network trained from scratch; any other name is a registered pretrained
        # backbone (efficientnet-lite0, timm:...), built in setup() with an energy head on stage ``trunk_layer``
        self.backbone_spec = backbone
        self.pretrained = not _from_scratch(backbone)
        self.network = None if self.pretrained else energy_network(backbone, depth, widen)
        self.trunk_mode, self.trunk_layer, self.trunk_lr, self.head_width = trunk, trunk_layer, trunk_lr, head_width
        self.lr, self.weight_decay, self.data_noise = lr, weight_decay, data_noise
        self.buffer_size, self.reinit, self.buffer_init = buffer_size, reinit, buffer_init
        self.buffer_rank = buffer_rank
        self.sampler_spec = sampler
        self.sampler = None
        self.buffer: ReplayBuffer | None = None

    def input_size(self, context: DetectorContext) -> int:
        return context.image_size

    def setup(self, context: DetectorContext) -> None:
        if self.pretrained or context.backbone:
            trunk = build_backbone(context, self.backbone_spec)
            self.network = PretrainedEnergy(trunk, self.trunk_layer, self.head_width, self.trunk_mode == "finetune")
            self.pretrained = True
        self.sampler = context.build("sampler", context.sampler or self.sampler_spec)
        size = self.input_size(context)
        self.buffer = ReplayBuffer(self.buffer_size, (3, size, size), self.reinit, self.buffer_init, self.buffer_rank)

    def on_train_start(self, images: Tensor, generator: torch.Generator) -> None:
        """Fit the buffer's Gaussian to the training inputs (once; a resumed run keeps its chains)."""
        if not bool(self.buffer.filled):
            self.buffer.fit(self.training_inputs(images.to(self.buffer.mean.device), generator), generator)

    def training_inputs(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return images * 2 - 1

    def training_step(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        x = self.training_inputs(images, generator)
        x_data = x + self.data_noise * torch.randn(x.shape, generator=generator, device=x.device)
        start, index = self.buffer.draw(x.shape[0], generator)
        x_sample = self.sampler.sample(self.network, start, generator)
        self.buffer.store(index, x_sample)
        f_data = self.network(x_data)
        f_sample = self.network(x_sample)
        loss = f_sample.mean() - f_data.mean()
        if self.energy_penalty:
            loss = loss + self.energy_penalty * (f_data.pow(2).mean() + f_sample.pow(2).mean())
        # how far the sampler moved the chains (mean |dx| on the [-1, 1] scale): near 0, the samples stay at
        # their initialisation and the model learns little beyond telling data from that
        chain_move = (x_sample - start).abs().mean()
        return {"loss": loss, "f_data": f_data.mean().detach(), "f_sample": f_sample.mean().detach(),
                "chain_move": chain_move}

    def configure_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, None]:
        if not self.pretrained:
            return torch.optim.Adam(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay), None
        groups = [{"params": self.network.head.parameters(), "lr": self.lr}]
        if self.trunk_mode == "finetune":  # a pretrained trunk moves slowly, or its ImageNet features are lost
            groups.append({"params": self.network.trunk.parameters(), "lr": self.trunk_lr})
        return torch.optim.Adam(groups, weight_decay=self.weight_decay), None

    def energy(self, x: Tensor) -> Tensor:
        return -self.network(x)

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self.energy(images * 2 - 1).float().view(-1, 1, 1, 1)


def _from_scratch(backbone: str) -> bool:
    """Whether ``backbone`` names an energy network trained from scratch: "wrn" or a timm architecture."""
    if backbone == "wrn":
        return True
    import timm

    return timm.is_model(backbone)


class EBMPatch(EBMImage):
    """Patch-level EBM: training crops whose corner is drawn around the image centre; test on a grid of patches;
    the grid of energies is the anomaly map, and its max the image score."""

    image_level = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"image_size": 128, "batch_size": 16, "steps": 300,
                  "params": {"depth": 10, "widen": 2, "buffer_size": 100, "patch_size": 32, "crop": 0.25,
                             "grid": 4, "sampler": "pyld:M=5,N=3"}},
        "paper": {"image_size": 896, "batch_size": 32, "steps": 20000,
                  "params": {"depth": 28, "widen": 10, "buffer_size": 100, "patch_size": 128, "crop": 0.25,
                             "grid": 7, "center_std": 0.3, "sampler": "pyld:M=20,N=10"}},
    }

    def __init__(self, backbone: str = "wrn", depth: int = 28, widen: int = 10, lr: float = 1e-4,
                 weight_decay: float = 4e-4, data_noise: float = 0.1, buffer_size: int = 100,
                 reinit: float = 0.05, buffer_init: Literal["gaussian", "uniform"] = "gaussian",
                 sampler: str = "pyld", buffer_rank: int = 0, patch_size: int = 128, crop: float = 0.25,
                 center_std: float = 0.3, grid: int = 7, energy_penalty: float = 0.0,
                 trunk: Literal["frozen", "finetune"] = "frozen", trunk_layer: int = 3, trunk_lr: float = 1e-5,
                 head_width: int = 256):
        super().__init__(backbone, depth, widen, lr, weight_decay, data_noise, buffer_size, reinit, buffer_init,
                         sampler, buffer_rank, energy_penalty, trunk, trunk_layer, trunk_lr, head_width)
        if patch_size < 8 or not 0 < crop <= 1 or center_std < 0 or grid < 1:
            raise ValueError("ebm-patch needs patch_size >= 8, crop in (0, 1], center_std >= 0, grid >= 1")
        self.patch_size, self.crop, self.center_std, self.grid = patch_size, crop, center_std, grid

    def input_size(self, context: DetectorContext) -> int:
        return self.patch_size

    def training_inputs(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Crops of side ``crop`` x image side; corners ~ N(centre - crop / 2, center_std x side) per axis,
        clamped into the image; resized to ``patch_size``; scaled to [-1, 1]."""
        b, _, h, w = images.shape
        side_h, side_w = max(1, round(self.crop * h)), max(1, round(self.crop * w))
        noise = torch.randn(b, 2, generator=generator, device=images.device)
        top = ((h - side_h) / 2 + noise[:, 0] * self.center_std * h).clamp(0, h - side_h)
        left = ((w - side_w) / 2 + noise[:, 1] * self.center_std * w).clamp(0, w - side_w)
        boxes = torch.stack([torch.stack([left, top], 1), torch.stack([left + side_w - 1, top], 1),
                             torch.stack([left + side_w - 1, top + side_h - 1], 1),
                             torch.stack([left, top + side_h - 1], 1)], 1)
        patches = kornia.geometry.transform.crop_and_resize(images, boxes, (self.patch_size, self.patch_size))
        return patches * 2 - 1

    def patches(self, images: Tensor) -> Tensor:
        """The n x n grid of patches (B * n * n, 3, patch, patch), row-major."""
        n, p = self.grid, self.patch_size
        resized = F.interpolate(images, size=(n * p, n * p), mode="bilinear", align_corners=False, antialias=True)
        tiles = resized.unfold(2, p, p).unfold(3, p, p)  # (B, 3, n, n, p, p)
        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)

    def anomaly_map(self, images: Tensor) -> Tensor:
        energies = self.energy(self.patches(images) * 2 - 1).float()
        return energies.view(images.shape[0], 1, self.grid, self.grid)
