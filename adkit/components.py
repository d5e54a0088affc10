"""The contract between component kinds, and the tensors that pass between them.

- image batch: float tensor (B, 3, H, W) with values in [0, 1], on the detector's device;
- anomaly map: float tensor (B, 1, h, w), higher = more anomalous; h, w may differ from H, W (the pipeline
  upsamples where pixel metrics need the input size);
- image scores: float tensor (B,).

The pipeline is detector -> post-processors (a chain, map -> map) -> scorer (map -> score). docs/architecture.md
describes it for plugin authors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from adkit.plugins import Catalog


def check_images(images: Tensor, who: str = "detector") -> None:
    """Raise if ``images`` is not an image batch (B, 3, H, W) of floats."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{who} expects images (B, 3, H, W) float, got {tuple(images.shape)} {images.dtype}")


def check_map(anomaly_map: Tensor, who: str) -> None:
    """Raise if ``anomaly_map`` is not an anomaly map (B, 1, H, W) of floats."""
    if anomaly_map.ndim != 4 or anomaly_map.shape[1] != 1 or not anomaly_map.is_floating_point():
        raise ValueError(f"{who} expects an anomaly map (B, 1, H, W) float, got {tuple(anomaly_map.shape)}")


@dataclass
class DetectorContext:
    """What the engine tells a detector before training: where it runs and how to reach other components."""

    catalog: Catalog
    image_size: int
    device: torch.device
    seed: int = 0
    losses: list[str] = field(default_factory=list)  # loss specs the user asked for
    replace_losses: bool = False  # True: ``losses`` replace the detector's defaults instead of adding to them
    sampler: str | None = None
    anomaly_source: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


class Detector(nn.Module, ABC):
    """An anomaly detector. Gradient-trained detectors implement ``training_step`` (and keep ``trainable``
    True); statistical ones set ``trainable = False`` and implement ``fit``. Both implement ``anomaly_map``."""

    trainable: bool = True
    # named settings for a run: {"quick": {"image_size": .., "batch_size": .., "steps": .., "params": {..}}}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def setup(self, context: DetectorContext) -> None:
        """Build what depends on the run (losses, samplers, image size); called once before training."""

    def on_train_start(self, images: Tensor, generator: torch.Generator) -> None:
        """Called once before the first training step with all training images (N, 3, H, W) on the CPU."""

    def training_step(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """One optimisation step's losses for an image batch; the key ``loss`` is minimised, others are logged.
        ``generator`` (on the images' device) drives every random draw, so a run is reproducible."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by gradient steps")

    def configure_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """The optimiser and an optional per-step learning-rate scheduler (None)."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by gradient steps")

    def fit(self, batches: Iterable[Tensor]) -> None:
        """Fit a statistical detector on batches of normal images (B, 3, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} is trained by gradient steps, not fit()")

    @abstractmethod
    def anomaly_map(self, images: Tensor) -> Tensor:
        """Anomaly map (B, 1, h, w) for images (B, 3, H, W) in [0, 1]."""


class PostProcessor(nn.Module):
    """Maps an anomaly map (B, 1, H, W) to an anomaly map (B, 1, H', W'). Subclasses implement ``forward``."""


class Scorer(nn.Module):
    """Reduces an anomaly map (B, 1, H, W) to image scores (B,). Subclasses implement ``forward``."""


class Sampler(ABC):
    """Draws low-energy samples of an energy network. The network maps inputs (B, C, H, W) in [-1, 1] to
    f(x) (B,), high on data; the energy is E(x) = -f(x), so samplers climb f. Samplers count their cost in
    ``full_passes`` (forward + backward through the whole network) and ``first_layer_passes``."""

    full_passes: int = 0
    first_layer_passes: int = 0

    @abstractmethod
    def sample(self, network: nn.Module, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Samples of the same shape as ``x0``, detached; random draws from ``generator``."""


class Ensemble(ABC):
    """Combines image scores of several detectors. ``fit`` sees each detector's scores on held-out normal
    images (never test labels); ``combine`` maps each detector's test scores (N,) to ensemble scores (N,)."""

    def check(self, count: int) -> None:
        """Raise ValueError if this ensemble cannot combine ``count`` detectors (e.g. a weight per detector)."""

    @abstractmethod
    def fit(self, normal_scores: list[Tensor]) -> None:
        """Learn the per-detector normalisation from validation scores of normal images."""

    @abstractmethod
    def combine(self, scores: list[Tensor]) -> Tensor:
        """Ensemble scores (N,) from one score tensor (N,) per detector, in the order given to ``fit``."""


class Pipeline:
    """detector -> post-processors -> scorer, on image batches."""

    def __init__(self, detector: Detector, postprocessors: list[nn.Module], scorer: nn.Module):
        self.detector = detector
        self.postprocessors = postprocessors
        self.scorer = scorer
        self._anomaly_map = detector.anomaly_map

    def compile(self) -> None:
        """Compile the detector's map with torch.compile (on its first batches; a new shape recompiles)."""
        self._anomaly_map = torch.compile(self.detector.anomaly_map)

    def raw_maps(self, images: Tensor) -> Tensor:
        check_images(images)
        maps = self._anomaly_map(images)
        check_map(maps, type(self.detector).__name__)
        return maps.float()

    def postprocess(self, maps: Tensor) -> Tensor:
        for post in self.postprocessors:
            maps = post(maps)
        return maps

    def score(self, processed_maps: Tensor) -> Tensor:
        scores = self.scorer(processed_maps)
        if scores.ndim != 1 or scores.shape[0] != processed_maps.shape[0]:
            raise ValueError(f"{type(self.scorer).__name__} must return scores (B,), got {tuple(scores.shape)}")
        return scores
