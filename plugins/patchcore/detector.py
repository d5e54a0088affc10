"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022); spec §5 and
docs/methods/patchcore.md give our reading.

fit: locally aware patch features of every training image -> greedy coreset on a random projection -> memory
bank. detect: distance of each test patch to its nearest bank feature is the patch map, upsampled to the image and
Gaussian-smoothed (sigma 4); the image score is the paper's re-weighted maximum (or the plain maximum).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from adkit import distributed
from adkit.components import Backbone, Detection, Detector, DetectorContext
from adkit.engine import derived_seed
from adkit.errors import AdkitError
from adkit.features import align_stages, build_backbone, check_layers, pool_channels
from adkit_plugins.patchcore.coreset import partitioned_greedy_coreset, random_projection
from adkit_plugins.patchcore.search import knn, knn_projected


def memory_limit_bytes() -> int:
    """Half the machine's physical memory: the most the patch features collected before the coreset may take."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 8 << 30


class PatchCore(Detector):
    """PatchCore: nearest-neighbour distance of locally aware patch features to a coreset memory bank."""

    trainable = False
    default_postprocessors = ()
    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"backbone"})
    fitted_buffers: ClassVar[tuple[str, ...]] = ("memory_bank", "bank_projected")
    fit_shards = True  # under torchrun each rank embeds its share; every rank selects the same coreset from all

    def __init__(self, backbone: str = "efficientnet-lite0", layers: tuple[int, ...] = (2, 3), dim: int = 128,
                 coreset: float = 0.1, projection: int = 128, partition: int = 16384, neighbours: int = 9,
                 score: Literal["reweighted", "max"] = "reweighted", sigma: float = 4.0,
                 search: Literal["exact", "projected"] = "exact", search_dim: int = 32, candidates: int = 10,
                 seed: int = 0):
        super().__init__()
        self.layers = check_layers(layers, "patchcore")
        if dim < len(self.layers):
            raise ValueError(f"patchcore dim must be at least one per layer ({len(self.layers)}), got {dim}")
        if not 0 < coreset <= 1:
            raise ValueError(f"patchcore coreset is a fraction in (0, 1], got {coreset}")
        if projection < 1 or neighbours < 1 or sigma < 0 or candidates < 1 or partition < 0 or search_dim < 1:
            raise ValueError("patchcore needs projection >= 1, partition >= 0, neighbours >= 1, sigma >= 0, "
                             "search_dim >= 1, candidates >= 1")
        # greedy coreset on random partitions of this many features (0: exact greedy over all; coreset.py)
        self.partition = partition
        self.backbone_spec, self.dim, self.coreset = backbone, dim, coreset
        self.projection_dim, self.neighbours, self.score_mode = projection, neighbours, score
        self.sigma, self.search, self.search_dim, self.candidates, self.seed = sigma, search, search_dim, candidates, seed
        self.backbone: Backbone | None = None
        self.smooth = None
        self.register_buffer("memory_bank", torch.zeros(0, dim))
        # search=projected: candidates come from a scan on this projection of the bank, then exact re-ranking
        self.register_buffer("search_projection", torch.zeros(dim, search_dim))
        self.register_buffer("bank_projected", torch.zeros(0, search_dim))

    def setup(self, context: DetectorContext) -> None:
        self.backbone = build_backbone(context, self.backbone_spec)
        self.backbone.check_stages(self.layers, "patchcore")
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "patchcore-search"))
        self.search_projection = random_projection(self.dim, self.search_dim, generator, context.device)
        self.smooth = (context.catalog["postprocessor"].create(f"gaussian:sigma={self.sigma}")
                       if self.sigma > 0 else None)

    def embed(self, images: Tensor) -> Tensor:
        """Locally aware patch features (B, dim, h, w) on the first layer's grid: each stage averaged over 3x3
        neighbourhoods (zero border, as the reference's unfold), deeper stages bilinearly upsampled, each pooled
        over channels to dim / layers, concatenated."""
        features = self.backbone(images, self.layers)
        features = align_stages([F.avg_pool2d(f.float(), 3, stride=1, padding=1) for f in features])
        share = [self.dim // len(self.layers) + (i < self.dim % len(self.layers)) for i in range(len(self.layers))]
        return torch.cat([pool_channels(f, n) for f, n in zip(features, share)], dim=1)

    def fit(self, batches: Iterable[Tensor]) -> None:
        limit = memory_limit_bytes()
        collected: list[Tensor] = []
        total = 0
        for images in batches:
            patches = self.embed(images).permute(0, 2, 3, 1).reshape(-1, self.dim)
            total += patches.numel() * patches.element_size()
            if total > limit:
                raise AdkitError(f"patchcore: the patch features exceed {limit / 2**30:.1f} GiB (half this machine's "
                                 f"memory) before the coreset; use fewer or smaller images (--image-size), a smaller "
                                 f"dim (now {self.dim}) or layers with a coarser grid")
            collected.append(patches.view(images.shape[0], -1, self.dim).cpu())
        local = torch.cat(collected) if collected else torch.zeros(0, 1, self.dim)
        # (images, patches, dim) in the original image order on every rank: the same coreset as one process
        features = distributed.gather_sharded(local).reshape(-1, self.dim)
        if features.shape[0] == 0:
            raise AdkitError("patchcore: no training images to fit on")
        device = self.memory_bank.device
        count = max(1, round(self.coreset * features.shape[0]))
        if count < features.shape[0]:
            generator = torch.Generator(device=device).manual_seed(derived_seed(self.seed, "patchcore-coreset"))
            on_device = features.to(device)
            projected = on_device @ random_projection(self.dim, self.projection_dim, generator, device)
            bank = on_device[partitioned_greedy_coreset(projected, count, generator, self.partition)]
        else:
            bank = features.to(device)
        self.memory_bank = bank.contiguous()
        self.bank_projected = (bank @ self.search_projection).contiguous()

    def _nearest(self, patches: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self.search == "projected":
            return knn_projected(patches, self.memory_bank, self.search_projection, self.bank_projected, k,
                                 self.candidates)
        return knn(patches, self.memory_bank, k)

    def detect(self, images: Tensor) -> Detection:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patchcore: fit() must run before detect()")
        embedding = self.embed(images)
        b, _, h, w = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(-1, self.dim)
        distance, index = self._nearest(patches, 1)
        patch_scores = distance[:, 0].view(b, h * w)
        anomaly_map = F.interpolate(patch_scores.view(b, 1, h, w), size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)
        if self.smooth is not None:
            anomaly_map = self.smooth(anomaly_map)
        top, where = patch_scores.max(dim=1)
        if self.score_mode == "max":
            return Detection(anomaly_map, top)
        # m_test* (the most anomalous patch) and m* (its nearest bank feature), by gather rather than arange(b)
        # indexing, which a traced graph would freeze at the traced batch size
        test_feature = patches.view(b, h * w, self.dim).gather(1, where[:, None, None].expand(-1, 1, self.dim))[:, 0]
        nearest_bank = index[:, 0].view(b, h * w).gather(1, where[:, None])[:, 0]
        return Detection(anomaly_map, top * self.reweighting(test_feature, nearest_bank))

    def reweighting(self, test_feature: Tensor, nearest_bank: Tensor) -> Tensor:
        """PatchCore's w = 1 - exp|m_test* - m*| / sum over N_b(m*) of exp|m_test* - m| (Eq. 7), with N_b(m*)
        the b nearest bank features of m* (m* itself among them): (B, d), (B,) bank indices -> (B,)."""
        _, support = knn(self.memory_bank[nearest_bank], self.memory_bank, self.neighbours)
        distances = (test_feature[:, None, :] - self.memory_bank[support]).pow(2).sum(-1).sqrt()
        own = (test_feature - self.memory_bank[nearest_bank]).pow(2).sum(-1).sqrt()
        return 1 - torch.exp(own - torch.logsumexp(distances, dim=1))

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self.detect(images).anomaly_map
