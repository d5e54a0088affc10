"""SuperSimpleNet (Rolih, Fučka and Skočaj, "SuperSimpleNet: Unifying Unsupervised and Supervised Learning for Fast
and Reliable Surface Defect Detection", ICPR 2024); docs/methods/supersimplenet.md gives our reading.

Training works on features cached once (the backbone is frozen): each step draws cached training images, adapts
their features, adds Gaussian noise inside Perlin masks to a copy of the batch (the synthetic anomalies, made in
feature space), and trains the segmentation head on the masks (truncated L1 + focal) and the classification head
on the labels (focal). Labelled defects, where the dataset gives some (``train_defects``), join the batches with
their masks (their map is trained too) or with their image labels only (the score alone learns from them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import (
    AdkitError,
    Backbone,
    Detection,
    Detector,
    DetectorContext,
    build_backbone,
    check_layers,
)
from adkit_plugins.supersimplenet.model import Heads, binary_focal, grid_features, synthetic_anomalies, truncated_l1

# features of this many images are extracted at once for the cache
CACHE_BATCH = 16


class SuperSimpleNet(Detector):
    """Feature-space synthetic anomalies; a segmentation head (the map) and a classification head (the score) on
    adapted pretrained features."""

    own_scores = True  # the classification head's score
    default_postprocessors = ("gaussian:sigma=4",)
    default_pixel_map = "post"
    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"backbone"})
    uses_defects = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # the paper's: features at twice the stride-8 grid, wide heads, 300 epochs of batch 32 (a GPU's budget)
        "paper": {"image_size": 256, "batch_size": 32, "epochs": 300,
                  "params": {"upscale": 2, "hidden": 1024, "dec": 128, "noise": 0.015, "lr": 2e-4, "adapt_lr": 1e-4,
                             "score": "head"}},
    }

    # noise 0.3 of the features' spread and lr 1e-3 for a CPU's 1,000 steps: at the paper's 0.015 (of WRN-50's
    # 1,536-channel features, there ~2 % of their spread) the map learns nothing in 1,500 steps on EfficientNet-Lite0's
    # 152 channels (docs/methods/supersimplenet.md); the paper's values are its preset
    def __init__(self, backbone: str = "efficientnet-lite0", layers: tuple[int, ...] = (2, 3), upscale: int = 1,
                 hidden: int = 256, dec: int = 32, noise: float = 0.3, perlin: float = 0.2, lr: float = 1e-3,
                 adapt_lr: float = 5e-4, weight_decay: float = 1e-5, stop_grad: bool = True,
                 defect_share: float = 0.25, gamma: float = 0.4, score: Literal["auto", "head", "map"] = "auto"):
        super().__init__()
        self.layers = check_layers(layers, "supersimplenet")
        if upscale < 1 or hidden < 1 or dec < 1 or noise <= 0 or lr <= 0 or adapt_lr <= 0 or weight_decay < 0:
            raise ValueError("supersimplenet needs upscale, hidden, dec >= 1, noise, lr, adapt_lr > 0, "
                             "weight_decay >= 0")
        if not 0 <= defect_share < 1 or not 0 < gamma <= 1 or not -1 < perlin < 1:
            raise ValueError("supersimplenet needs defect_share in [0, 1), gamma in (0, 1] and perlin in (-1, 1)")
        self.backbone_spec, self.upscale, self.hidden, self.dec = backbone, upscale, hidden, dec
        self.noise, self.perlin, self.lr, self.adapt_lr = noise, perlin, lr, adapt_lr
        self.weight_decay, self.stop_grad, self.defect_share, self.gamma = weight_decay, stop_grad, defect_share, gamma
        # the classification head's score, or the map's largest value (the paper's both); auto: the head where
        # labelled defects trained it, else the map (docs/methods/supersimplenet.md, "The image score")
        self.score_mode = score
        self.register_buffer("head_score", torch.tensor(score == "head"))  # the choice, kept in the checkpoint
        self.scored_by_head = score == "head"  # the same as a Python bool: an export traces one branch
        self.backbone: Backbone | None = None
        self.heads: Heads | None = None
        # the features' per-channel mean and standard deviation over the training images: the heads see features
        # standardised by them, so ``noise`` is in units of the features' own spread whatever the backbone
        self.register_buffer("feature_mean", torch.zeros(0))
        self.register_buffer("feature_std", torch.zeros(0))
        self.cache: Tensor | None = None  # (N, C, h, w) bfloat16: the training images' features
        self.defects: tuple[Tensor, Tensor, Tensor] | None = None  # cached features, grid masks, mask known

    def setup(self, context: DetectorContext) -> None:
        self.backbone = build_backbone(context, self.backbone_spec)
        try:
            self.backbone.check_stages(self.layers, "supersimplenet")
        except (ValueError, AdkitError) as exc:
            raise AdkitError(str(exc)) from None
        channels = sum(self.backbone.channels[i] for i in self.layers)
        self.heads = Heads(channels, self.hidden, self.dec, self.stop_grad).to(context.device)
        self.feature_mean = torch.zeros(channels, device=context.device)
        self.feature_std = torch.ones(channels, device=context.device)

    def features(self, images: Tensor) -> Tensor:
        """Standardised grid features (B, C, h, w) of images (B, 3, H, W)."""
        raw = grid_features(self.backbone, images, self.layers, self.upscale)
        return (raw - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    def _extract(self, images: Tensor) -> Tensor:
        device = self.feature_mean.device
        with torch.inference_mode():
            return torch.cat([grid_features(self.backbone, images[i:i + CACHE_BATCH].to(device), self.layers,
                                            self.upscale).to(torch.bfloat16).cpu()
                              for i in range(0, len(images), CACHE_BATCH)])

    def on_train_start(self, images: Tensor, generator: torch.Generator, defects: Any = None) -> None:
        """Extract and cache the training images' features (and the labelled defects'), and the standardisation."""
        if images.shape[0] < 2:
            raise AdkitError(f"supersimplenet: {images.shape[0]} training image(s); give at least 2")
        self.cache = self._extract(images)
        flat = self.cache.float().transpose(0, 1).flatten(1)  # (C, N * h * w)
        mean = flat.mean(1)
        spread = (flat - mean[:, None]).pow(2).mean().sqrt().clamp_min(1e-6)  # one scale for every channel
        self.feature_mean = mean.to(self.feature_mean.device)
        self.feature_std = spread.expand_as(mean).clone().to(self.feature_mean.device)
        self.defects = None
        if defects is not None and len(defects.images):
            features = self._extract(defects.images)
            grid = features.shape[-2:]
            masks = (F.interpolate(defects.masks.float(), size=grid, mode="bilinear", align_corners=False) >= 0.5)
            self.defects = (features, masks.float(), defects.masked.bool())
        learned = self.score_mode == "head" or (self.score_mode == "auto" and self.defects is not None)
        self.head_score = torch.tensor(learned, device=self.feature_mean.device)
        self.scored_by_head = learned

    def _draw(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A training batch from the caches: features (B, C, h, w) standardised, masks (B, 1, h, w), labels (B,),
        mask known (B,); a ``defect_share`` of it labelled defects when there are any."""
        device = self.feature_mean.device
        defective = 0 if self.defects is None else max(1, round(self.defect_share * count))
        pick = torch.randint(0, self.cache.shape[0], (count - defective,), generator=generator,
                             device=generator.device).cpu()
        features = self.cache[pick].to(device).float()
        h, w = features.shape[-2:]
        masks = torch.zeros(len(pick), 1, h, w, device=device)
        labels = torch.zeros(len(pick), device=device)
        known = torch.ones(len(pick), dtype=torch.bool, device=device)
        if defective:
            cached, defect_masks, masked = self.defects
            chosen = torch.randint(0, cached.shape[0], (defective,), generator=generator, device=generator.device).cpu()
            features = torch.cat([features, cached[chosen].to(device).float()])
            masks = torch.cat([masks, defect_masks[chosen].to(device)])
            labels = torch.cat([labels, torch.ones(defective, device=device)])
            known = torch.cat([known, masked[chosen].to(device)])
        standardised = (features - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]
        return standardised, masks, labels, known

    def training_step(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """One step on cached features (the image batch the engine passes sets the batch size only)."""
        if self.cache is None:
            raise RuntimeError("supersimplenet: on_train_start() must run before training_step()")
        features, masks, labels, known = self._draw(images.shape[0], generator)
        adapted = self.heads.adapt(features)
        noisy, masks, labels, known = synthetic_anomalies(adapted, masks, labels, known, self.noise, self.perlin,
                                                          generator)
        anomaly_map, score = self.heads(noisy)
        # the map learns where its target is known (a defect given by its image label alone has none)
        seen = known[:, None, None, None].expand_as(masks)
        map_terms = truncated_l1(anomaly_map[seen], masks[seen]) + binary_focal(anomaly_map[seen], masks[seen]) \
            if bool(seen.any()) else anomaly_map.sum() * 0
        score_term = binary_focal(score, labels)
        return {"loss": map_terms + score_term, "map": map_terms.detach(), "score": score_term.detach(),
                "anomalous": labels.mean().detach()}

    def configure_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        heads = self.heads
        optimizer = torch.optim.AdamW([
            {"params": heads.adaptor.parameters(), "lr": self.adapt_lr},
            {"params": heads.segmentation.parameters(), "lr": self.lr, "weight_decay": self.weight_decay},
            {"params": [*heads.classification.parameters(), *heads.score.parameters()], "lr": self.lr,
             "weight_decay": self.weight_decay}])
        milestones = sorted({max(1, int(total_steps * 0.8)), max(1, int(total_steps * 0.9))})
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=self.gamma)

    def detect(self, images: Tensor) -> Detection:
        grid_map, score = self.heads(self.heads.adapt(self.features(images)))
        anomaly_map = F.interpolate(grid_map.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if not self.scored_by_head:
            score = grid_map.flatten(1).amax(1)
        return Detection(anomaly_map, score.float())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "head_score" not in state_dict:  # trained before adkit 0.4: scored by the head unless told map
            state_dict[prefix + "head_score"] = torch.tensor(self.score_mode != "map")
        self.scored_by_head = bool(state_dict[prefix + "head_score"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self.detect(images).anomaly_map
