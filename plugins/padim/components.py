"""PaDiM (Defard et al., ICPR 2021): a Gaussian per feature-map position over pretrained features, the
Mahalanobis distance as the anomaly map (spec §5; docs/methods/patchcore.md gives our reading).

fit streams the embeddings' moments per position (count, mean, scatter; adkit.stats.moments), a chunk of images at
a time: each chunk's scatter from its own centred values, merged into the running ones in float32 (the dtype they
are stored in), so memory does not grow with the number of training images and no raw sums cancel; the covariance
is regularised by 0.01 I as in the paper. ``update`` merges the new images' moments the same way: the same
Gaussians a fit on all the images gives. The inverse covariances are derived from them (in float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import (
    AdkitError,
    Backbone,
    Detector,
    DetectorContext,
    LeftOutRows,
    Moments,
    align_stages,
    all_reduce_sum,
    build_backbone,
    check_layers,
    derived_seed,
    merge_into,
    spd_inverse,
    world_size,
)

SUM_CHUNK_ELEMENTS = 1 << 25  # embedding values (positions x images x d) whose scatter is one batched product


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
        self._left_out: tuple[Tensor, LeftOutRows] | None = None  # leaving_out's inverses and rows

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
        stats = self._moments_of(batches)
        if world_size() > 1:  # the ranks' raw sums (float64) are all-reduced, and the moments taken from them
            device = self.channels.device
            count = int(all_reduce_sum(torch.tensor([float(stats.count if stats else 0)], device=device)).item())
            if stats is None:  # a rank with no images still takes part in the reduction
                _, _, h, w = self.embed(torch.zeros(1, 3, self.image_size, self.image_size, device=device)).shape
                total = torch.zeros(h * w, self.features, dtype=torch.float64, device=device)
                outer = torch.zeros(h * w, self.features, self.features, dtype=torch.float64, device=device)
            else:
                mean = stats.mean.double()
                total = stats.count * mean
                outer = stats.scatter.double() + total[:, :, None] * mean[:, None, :]  # sum of x x^T
            stats = _moments(all_reduce_sum(total), all_reduce_sum(outer), count) if count else None
        count = stats.count if stats else 0
        if count < 2:
            raise AdkitError(f"padim needs at least 2 training images for a covariance, got {count}")
        self._keep(stats)

    def update(self, batches: Iterable[Tensor]) -> None:
        """Add normal images: their moments merged with the fitted ones (a fit on all the images, up to rounding)."""
        if self.mean.shape[0] == 0 or int(self.count) == 0:
            raise AdkitError("padim: this checkpoint holds no moments to add images to (fitted before adkit 0.4): "
                             "fit it again on all the images with adkit train")
        new = self._moments_of(batches)
        if new is None:
            return
        if new.mean.shape[0] != self.mean.shape[0]:
            raise AdkitError(f"padim was fitted on a {self.mean.shape[0]}-position grid; these images give "
                             f"{new.mean.shape[0]}: use the image size it was fitted with")
        self._keep(merge_into(Moments(int(self.count), self.mean, self.scatter), new))

    def _moments_of(self, batches: Iterable[Tensor]) -> Moments | None:
        """The embeddings' moments per position (mean (P, d), scatter (P, d, d), float32), None without images.
        Images are taken in chunks of SUM_CHUNK_ELEMENTS embedding values: a chunk's scatter is one batched product
        of its centred values (per batch of a few images, adding the (P, d, d) result cost more than the
        products), merged into the running moments in place."""
        stats: Moments | None = None
        pending: list[Tensor] = []

        def add(chunk: list[Tensor]) -> None:
            nonlocal stats
            x = torch.cat(chunk, dim=1).float()  # (positions, images, d)
            mean = x.mean(1)
            centred = x - mean[:, None, :]
            part = Moments(x.shape[1], mean, torch.bmm(centred.transpose(1, 2), centred))
            stats = part if stats is None else merge_into(stats, part)

        for images in batches:
            embedding = self.embed(images)
            b, d, h, w = embedding.shape
            pending.append(embedding.permute(2, 3, 0, 1).reshape(h * w, b, d))  # (positions, B, d)
            if sum(x.numel() for x in pending) >= SUM_CHUNK_ELEMENTS:
                add(pending)
                pending = []
        if pending:
            add(pending)
        return stats

    def _keep(self, stats: Moments) -> None:
        """Store the moments and derive the inverse covariances (unbiased covariance + regularisation I) from what
        is stored, so a restored checkpoint derives the very same inverses."""
        self.count = torch.tensor(stats.count, device=self.channels.device)
        self.mean = stats.mean.float()
        self.scatter = stats.scatter.float()
        self.inverse_covariance = self._inverses(stats.count - 1)

    def _inverses(self, divisor: int) -> Tensor:
        """(scatter / ``divisor`` + regularisation I)^-1 per position, float32, row-major, computed in float64
        (spd_inverse: on a CPU by their Cholesky factors, one chunk of matrices at a time on each thread, 2.5x as fast
        as torch's batched inverse)."""
        return spd_inverse(self.scatter, 1.0 / divisor, self.regularisation, torch.float32)

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

    def can_leave_out(self, group: int = 1) -> bool:
        """Exact, for whole images or parts of ``group`` tiles, of a fit that kept its moments on at least
        ``group`` + 2 images."""
        return int(self.count) >= group + 2 and self.scatter.shape[0] == self.mean.shape[0] > 0

    @contextlib.contextmanager
    def leaving_out(self, rows: Tensor, group: int = 1) -> Iterator[None]:
        """``anomaly_map`` gives each training row its distance to the Gaussians of the training rows outside its
        part (the ``group`` consecutive rows of one image's tiles, all in one call), exactly and without a refit
        (_left_out_squared). The inverses of B = S / (n - group - 1) + regularisation I (S the scatter) are
        computed once for the context; the rows are read to check that each call holds whole parts."""
        if not self.can_leave_out(group):
            raise AdkitError(f"padim leaves out parts of {group} row(s) of a fit with moments on at least {group + 2} "
                             f"images ({int(self.count)})")
        self._left_out = (self._inverses(int(self.count) - group - 1), LeftOutRows(rows, group, "padim"))
        try:
            yield
        finally:
            self._left_out = None

    @torch.compiler.disable  # eager under --compile: it reads and advances leaving_out's rows
    def _left_out_squared(self, images: Tensor, delta: Tensor) -> Tensor:
        """leaving_out's squared distances (positions, B) of the rows' embeddings (``delta``: minus the mean) to the
        Gaussians of the training rows outside their part. Per part of T rows, U (d x T) holds the samples the part
        gave the fit minus the mean: its embeddings as the fit computed them, with the backbone in float32 (it ran so
        before its precision check; a bf16 backbone's scores start from other features). The others' scatter is
        S - U M U^T with M = I + 1 1^T / (n - T), their mean the mean - U 1 / (n - T), so their covariance is
        B - U C U^T with C = M / (n - T - 1), and by Woodbury the squared distance of a row x, with w = x - their
        mean, is w^T B^-1 w + r^T G^-1 r, r = U^T B^-1 w, G = (n - T - 1)(I - 1 1^T / n) - U^T B^-1 U."""
        inverse, rows = self._left_out
        positions, b, d = delta.shape
        rows.take(b, whole_parts=True)
        backbone = self.backbone
        if backbone.precision == "fp32":
            fitted = delta
        else:
            backbone.precision = "fp32"
            try:
                embedding = self.embed(images)
            finally:
                backbone.precision = "bf16"
            fitted = (embedding.flatten(2).permute(2, 0, 1) - self.mean[:, None, :]).contiguous()
        n, t = int(self.count), rows.group
        samples = fitted.view(positions, b // t, t, d)  # U, per part
        others = delta.view(positions, b // t, t, d) + samples.sum(2, keepdim=True) / (n - t)  # w
        inverse_samples = torch.einsum("pij,pqtj->pqti", inverse, samples)  # B^-1 U
        gram = torch.einsum("pqsi,pqti->pqst", samples, inverse_samples).double()  # U^T B^-1 U
        ones = torch.ones(t, t, dtype=torch.float64, device=delta.device)
        g = (n - t - 1) * (torch.eye(t, dtype=torch.float64, device=delta.device) - ones / n) - gram
        r = torch.einsum("pqsi,pqti->pqst", inverse_samples, others).double()  # column t: U^T B^-1 w_t
        correction = (r * torch.linalg.solve(g, r)).sum(2)  # r_t^T G^-1 r_t, (P, parts, T)
        squared = torch.einsum("pqti,pij,pqtj->pqt", others, inverse, others)
        return (squared + correction.to(squared.dtype)).clamp_min(0).reshape(positions, b)

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
        if self._left_out is None:
            squared = torch.einsum("pbi,pij,pbj->pb", delta, self.inverse_covariance, delta).clamp_min(0)
        else:
            squared = self._left_out_squared(images, delta)
        distance = squared.sqrt().T.reshape(b, 1, h, w)
        anomaly_map = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return anomaly_map


def _moments(total: Tensor, outer: Tensor, count: int) -> Moments:
    """Moments from the raw sums of x (P, d) and x x^T (P, d, d) over ``count`` samples."""
    mean = total / count
    return Moments(count, mean, outer - count * mean[:, :, None] * mean[:, None, :])
