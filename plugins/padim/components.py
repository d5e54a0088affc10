"""PaDiM (Defard et al., ICPR 2021): a Gaussian per feature-map position over pretrained features, the
Mahalanobis distance as the anomaly map (spec §5; docs/methods/patchcore.md gives our reading).

fit streams the sums of the embeddings and of their outer products per position (float64), so memory does not
grow with the number of training images; the covariance is regularised by 0.01 I as in the paper. The fitted
state is the count, the means and the scatter matrices (adkit.stats.moments), so ``update`` adds images by merging
their moments: the same Gaussians a fit on all the images gives. The inverse covariances are derived from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import (
    AdkitError,
    Backbone,
    Detector,
    DetectorContext,
    Moments,
    align_stages,
    all_reduce_sum,
    build_backbone,
    check_layers,
    derived_seed,
    merge,
    world_size,
)

SUM_CHUNK_ELEMENTS = 1 << 25  # embedding values (positions x images x d) summed as one batched product: 256 MiB


class PaDiM(Detector):
    """PaDiM: per-position Gaussians of a random subset of pretrained feature channels; Mahalanobis map."""

    trainable = False
    # the paper's smoothing (sigma 4 px) as the pipeline's first post-processor, pixel metrics on its output
    default_postprocessors = ("gaussian:sigma=4",)
    default_pixel_map = "post"
    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"backbone"})
    fitted_buffers: ClassVar[tuple[str, ...]] = ("mean", "scatter")
    fit_shards = True  # under torchrun each rank sums over its share of the images; the sums are all-reduced
    updatable = True  # moments merge exactly

    def __init__(self, backbone: str = "efficientnet-lite0", layers: tuple[int, ...] = (1, 2, 3),
                 features: int = 100, regularisation: float = 0.01, seed: int = 0):
        super().__init__()
        self.layers = check_layers(layers, "padim")
        if features < 1 or regularisation <= 0:
            raise ValueError("padim needs features >= 1, regularisation > 0")
        self.backbone_spec, self.features, self.regularisation = backbone, features, regularisation
        self.seed = seed
        self.backbone: Backbone | None = None
        self.register_buffer("channels", torch.zeros(features, dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # training images
        self.register_buffer("mean", torch.zeros(0, features))  # (positions, d)
        self.register_buffer("scatter", torch.zeros(0, features, features))  # (positions, d, d): sum of (x - m)(x - m)^T
        # (positions, d, d), derived from count and scatter when they change (not stored: a checkpoint holds them)
        self.register_buffer("inverse_covariance", torch.zeros(0, features, features), persistent=False)

    def setup(self, context: DetectorContext) -> None:
        self.backbone = build_backbone(context, self.backbone_spec)
        self.image_size = context.image_size
        self.backbone.check_stages(self.layers, "padim")
        total = sum(self.backbone.channels[i] for i in self.layers)
        if self.features > total:
            raise AdkitError(f"padim features={self.features}: layers {'+'.join(map(str, self.layers))} of "
                             f"{self.backbone.spec} have {total} channels; choose features <= {total}")
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "padim-channels"))
        self.channels = torch.randperm(total, generator=generator)[:self.features].sort().values.to(context.device)

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, d, h, w): the stages concatenated on the first stage's grid (nearest upsampling, as
        the reference), then the selected channels."""
        features = align_stages([f.float() for f in self.backbone(images, self.layers)], mode="nearest")
        return torch.cat(features, dim=1).index_select(1, self.channels)

    def fit(self, batches: Iterable[Tensor]) -> None:
        total, outer, count = self._sums(batches)
        if world_size() > 1:
            device = self.channels.device
            count = int(all_reduce_sum(torch.tensor([float(count)], device=device)).item())
            if total is None:  # a rank with no images still takes part in the reduction
                _, _, h, w = self.embed(torch.zeros(1, 3, self.image_size, self.image_size, device=device)).shape
                total = torch.zeros(h * w, self.features, dtype=torch.float64, device=device)
                outer = torch.zeros(h * w, self.features, self.features, dtype=torch.float64, device=device)
            total, outer = all_reduce_sum(total), all_reduce_sum(outer)
        if count < 2:
            raise AdkitError(f"padim needs at least 2 training images for a covariance, got {count}")
        self._keep(_moments(total, outer, count))

    def update(self, batches: Iterable[Tensor]) -> None:
        """Add normal images: their moments merged with the fitted ones (a fit on all the images, up to rounding)."""
        if self.mean.shape[0] == 0 or int(self.count) == 0:
            raise AdkitError("padim: this checkpoint holds no moments to add images to (fitted before adkit 0.4): "
                             "fit it again on all the images with adkit train")
        total, outer, count = self._sums(batches)
        if count == 0:
            return
        if total.shape[0] != self.mean.shape[0]:
            raise AdkitError(f"padim was fitted on a {self.mean.shape[0]}-position grid; these images give "
                             f"{total.shape[0]}: use the image size it was fitted with")
        fitted = Moments(int(self.count), self.mean.double(), self.scatter.double())
        self._keep(merge(fitted, _moments(total, outer, count)))

    def _sums(self, batches: Iterable[Tensor]) -> tuple[Tensor | None, Tensor | None, int]:
        """Per position, the sums of the embeddings (P, d) and of their outer products (P, d, d), in float64, and
        the number of images. The outer products are summed over chunks of images (SUM_CHUNK_ELEMENTS embedding
        values) as one batched product each: per batch of a few images, adding the (P, d, d) result cost more
        than the products."""
        total = outer = None
        count = 0
        pending: list[Tensor] = []

        def add(chunk: list[Tensor]) -> None:
            nonlocal total, outer
            x = torch.cat(chunk, dim=1).double()  # (positions, images, d)
            total = x.sum(1) if total is None else total + x.sum(1)
            chunk_outer = torch.bmm(x.transpose(1, 2), x)
            outer = chunk_outer if outer is None else outer.add_(chunk_outer)

        for images in batches:
            embedding = self.embed(images)
            b, d, h, w = embedding.shape
            pending.append(embedding.permute(2, 3, 0, 1).reshape(h * w, b, d))  # (positions, B, d)
            count += b
            if sum(x.numel() for x in pending) >= SUM_CHUNK_ELEMENTS:
                add(pending)
                pending = []
        if pending:
            add(pending)
        return total, outer, count

    def _keep(self, stats: Moments) -> None:
        """Store the moments and derive the inverse covariances (unbiased covariance + regularisation I) from what
        is stored, so a restored checkpoint derives the very same inverses."""
        self.count = torch.tensor(stats.count, device=self.channels.device)
        self.mean = stats.mean.float()
        self.scatter = stats.scatter.float()
        covariance = self.scatter.double().div_(stats.count - 1)
        covariance.diagonal(dim1=-2, dim2=-1).add_(self.regularisation)
        # contiguous: LAPACK returns the batch column-major, which made every Mahalanobis product (and so PaDiM's
        # inference) several times slower
        self.inverse_covariance = torch.linalg.inv(covariance).float().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "inverse_covariance" in state_dict and prefix + "scatter" not in state_dict
        inverse = state_dict.pop(prefix + "inverse_covariance", None)
        if old:  # fitted before adkit 0.4: the inverse alone, no moments (it scores; it cannot be updated)
            state_dict[prefix + "scatter"] = torch.zeros(0, self.features, self.features)
            state_dict[prefix + "count"] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if old:
            self.inverse_covariance = inverse.to(self.mean.device).contiguous()
        elif self.scatter.shape[0]:
            self._keep(Moments(int(self.count), self.mean.double(), self.scatter.double()))

    def anomaly_map(self, images: Tensor) -> Tensor:
        if self.mean.shape[0] == 0:
            raise RuntimeError("padim: fit() must run before anomaly_map()")
        embedding = self.embed(images)
        b, d, h, w = embedding.shape
        if h * w != self.mean.shape[0]:
            raise AdkitError(f"padim was fitted on a {self.mean.shape[0]}-position grid; these images give {h}x{w}: "
                             "use the image size it was fitted with")
        # (positions, B, d), row-major: the batched products run several times slower on a strided operand
        delta = (embedding.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean[:, None, :]).contiguous()
        squared = torch.einsum("pbi,pij,pbj->pb", delta, self.inverse_covariance, delta).clamp_min(0)
        distance = squared.sqrt().T.reshape(b, 1, h, w)
        anomaly_map = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return anomaly_map


def _moments(total: Tensor, outer: Tensor, count: int) -> Moments:
    """Moments from the raw sums of x (P, d) and x x^T (P, d, d) over ``count`` samples."""
    mean = total / count
    return Moments(count, mean, outer - count * mean[:, :, None] * mean[:, None, :])
