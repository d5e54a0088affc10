"""The DRAEM detector: reconstruct, then segment the difference (spec §1)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from adkit.plugin import AdkitError, Detector, DetectorContext
from adkit_plugins.draem.networks import DiscriminativeSubNetwork, ReconstructiveSubNetwork, reference_init
from adkit_plugins.draem.synthesis import AnomalySource, SynthesisSettings, TextureBank, noise_texture_pool, synthesize

DEFAULT_LOSSES = ("l2", "ssim")


class Draem(Detector):
    """DRAEM (Zavrtanik et al., ICCV 2021): reconstructive + discriminative sub-networks."""

    default_postprocessors = ("avgpool:kernel=21",)
    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"loss", "anomaly_source"})
    # engine settings and detector parameters per preset; flags and specs override them
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # measured on 2 CPU cores (docs/benchmarks.md): more steps at narrow widths beat wider networks, and
        # augmented colour-noise textures beat the grey Perlin fallback as the anomaly source without DTD;
        # crop=64 at 128 px gains 0.03 on the synthetic textures but loses 0.08 on real magnetic tiles: not used
        "quick": {"image_size": 64, "batch_size": 8, "steps": 1600,
                  "params": {"recon_width": 8, "disc_width": 8, "lr": 1e-3, "schedule": "reference",
                             "fallback": "noise-texture"}},
        "paper": {"image_size": 256, "batch_size": 8, "epochs": 700,
                  "params": {"recon_width": 128, "disc_width": 64, "lr": 1e-4, "schedule": "paper"}},
    }

    def __init__(self, recon_width: int = 128, disc_width: int = 64, lr: float = 1e-4,
                 schedule: Literal["paper", "reference", "constant"] = "paper", segmentation_loss: str = "focal",
                 fallback: Literal["perlin", "noise-texture", "self"] = "perlin", crop: int = 0, pool: int = 0):
        super().__init__()
        if recon_width < 1 or disc_width < 1:
            raise ValueError("draem widths must be >= 1")
        if crop < 0 or crop % 32:
            raise ValueError(f"draem crop={crop}: use 0 (whole images) or a multiple of 32 (the networks halve the "
                             "side five times)")
        if lr <= 0:
            raise ValueError("draem lr must be > 0")
        if pool < 0 or (pool and fallback != "noise-texture"):
            raise ValueError(f"draem pool={pool}: a number of noise textures made once per run, >= 0, and only "
                             "with fallback=noise-texture")
        self.reconstructive = ReconstructiveSubNetwork(3, 3, recon_width)
        self.discriminative = DiscriminativeSubNetwork(6, 2, disc_width)
        self.apply(reference_init)
        self.lr, self.schedule = lr, schedule
        self.segmentation_loss_spec = segmentation_loss
        self.reconstruction_losses: list[tuple[str, float, nn.Module]] = []
        self.segmentation_loss: nn.Module | None = None
        self.source: TextureBank | None = None
        self.synthesis = SynthesisSettings(fallback=fallback)
        # the noise-texture fallback drawn from this many textures made once per run (0: fresh ones every step)
        self.pool = pool
        # train on random crops of this side of the (larger) training images: the cost of small images with the
        # detail of large ones; both networks are fully convolutional, so the map is computed on whole images
        self.crop = crop

    def setup(self, context: DetectorContext) -> None:
        specs = list(context.losses) if context.replace_losses else [*DEFAULT_LOSSES, *context.losses]
        if not specs:
            raise AdkitError("draem needs at least one reconstruction loss: drop --loss-only or add --loss")
        self.reconstruction_losses = []
        for text in specs:
            spec = context.build.parse("loss", text)
            self.reconstruction_losses.append((str(spec), spec.extras["weight"], context.build("loss", spec)))
        self.segmentation_loss = context.build("loss", self.segmentation_loss_spec)
        if context.anomaly_source is not None:
            self.source = AnomalySource(context.anomaly_source, context.image_size, context.device, seed=context.seed)

    def on_train_start(self, images: Tensor, generator: torch.Generator) -> None:
        if self.pool and self.source is None:  # made from the start generator: a resumed run makes the same pool
            side = self.crop if self.crop and self.crop < min(images.shape[-2:]) else None
            size = (side, side) if side else (images.shape[-2], images.shape[-1])
            self.source = noise_texture_pool(self.pool, size, generator, self.synthesis)

    def training_step(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        if self.segmentation_loss is None:
            raise RuntimeError("Draem.setup() must run before training")
        if self.crop and self.crop < min(images.shape[-2:]):
            images = random_crops(images, self.crop, generator)
        with torch.autocast(images.device.type, enabled=False):  # data preparation stays in float32
            batch = synthesize(images, generator, self.source, self.synthesis)
        reconstruction = self.reconstructive(batch.augmented)
        logits = self.discriminative(torch.cat((reconstruction, batch.augmented), dim=1))
        out: dict[str, Tensor] = {}
        total = torch.zeros((), device=images.device)
        for name, weight, loss in self.reconstruction_losses:
            value = loss(reconstruction, batch.normal)  # registered losses compute in float32
            out[name.split(":")[0]] = value.detach()
            total = total + weight * value
        segmentation = self.segmentation_loss(logits, batch.mask)
        out["focal"] = segmentation.detach()
        out["loss"] = total + segmentation
        return out

    def configure_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, object]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.schedule == "constant":
            return optimizer, None
        # paper: x0.1 at epochs 400 and 600 of 700; reference code: x0.2 at 80 % and 90 %
        fractions, gamma = ((400 / 700, 600 / 700), 0.1) if self.schedule == "paper" else ((0.8, 0.9), 0.2)
        milestones = [max(1, int(total_steps * f)) for f in fractions]
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=gamma)

    def anomaly_map(self, images: Tensor) -> Tensor:
        reconstruction = self.reconstructive(images)
        logits = self.discriminative(torch.cat((reconstruction, images), dim=1))
        return logits.float().softmax(dim=1)[:, 1:2]


def random_crops(images: Tensor, side: int, generator: torch.Generator) -> Tensor:
    """One random ``side`` x ``side`` crop of each image (B, C, H, W), drawn with ``generator``, without host
    synchronisation (the offsets stay on the device and index the batch)."""
    b, _, h, w = images.shape
    device = images.device
    top = (torch.rand(b, generator=generator, device=device) * (h - side + 1)).long().clamp_max(h - side)
    left = (torch.rand(b, generator=generator, device=device) * (w - side + 1)).long().clamp_max(w - side)
    steps = torch.arange(side, device=device)
    rows, cols = (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None, :]
    batch = torch.arange(b, device=device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
