"""The pipeline: detector -> post-processors -> scorer as one module, what evaluation, prediction, export and the
service all run."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adkit.core.components import Detector, check_images, check_map, upsample
from adkit.core.exporting import Exportable
from adkit.core.tiling import Tiling


class Pipeline(nn.Module):
    """detector -> post-processors -> scorer as one module: what evaluation, ``adkit predict`` and ``adkit export``
    all run, so no two of them can score differently. The scorer reduces the post-processed map unless the
    detector returned image scores of its own."""

    def __init__(self, detector: Detector, postprocessors: list[nn.Module], scorer: nn.Module,
                 tiling: Tiling | None = None):
        super().__init__()
        self.detector = detector
        self.postprocessors = nn.ModuleList(postprocessors)
        self.scorer = scorer
        self.tiling = tiling
        self._detect = detector.detect
        # declared by the detector's class; with tiles a tile's own score is not an image's, so the scorer scores
        # the stitched map
        self.own_scores = detector.own_scores and tiling is None

    def compile(self) -> None:
        """Compile the detector's forward with torch.compile (on its first batches; a new shape recompiles)."""
        self._detect = torch.compile(self.detector.detect)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> the detector's map upsampled to (B, 1, H, W), the post-processed map
        (B, 1, H', W') and the image scores (B,), all float32. With a tiling the detector sees the tiles, their
        maps are stitched, and the scorer scores the stitched map (a tile's own score is not an image's)."""
        check_images(images)
        inputs = images if self.tiling is None else self.tiling.split(images)
        detection = self._detect(inputs)
        name = type(self.detector).__name__
        check_map(detection.anomaly_map, name)
        raw = detection.anomaly_map.float()
        raw = upsample(raw, inputs.shape[-2:])
        if self.tiling is not None:
            raw = self.tiling.stitch(raw)
        processed = raw
        for post in self.postprocessors:
            processed = post(processed)
        if self.detector.own_scores and detection.image_scores is None:
            raise ValueError(f"{name} declares own_scores but returned no image scores")
        scores = detection.image_scores if self.own_scores else self.scorer(processed)
        if scores.ndim != 1 or scores.shape[0] != images.shape[0]:
            who = name if self.own_scores else type(self.scorer).__name__
            raise ValueError(f"{who} must return image scores (B,), got {tuple(scores.shape)}")
        return raw, processed.float(), scores.float()

    def not_exportable(self) -> list[str]:
        """The components that declare they cannot be exported (``exportable = False``)."""
        parts = [self.detector, *self.postprocessors, self.scorer]
        return [type(part).__name__ for part in parts if isinstance(part, Exportable) and not part.exportable]
