"""The contract between component kinds, and the tensors that pass between them.

- image batch: float tensor (B, 3, H, W) with values in [0, 1], on the detector's device;
- anomaly map: float tensor (B, 1, h, w), higher = more anomalous; h, w may differ from H, W (the pipeline
  upsamples where pixel metrics need the input size);
- image scores: float tensor (B,).

The pipeline (adkit.core.pipeline) is detector -> post-processors (a chain, map -> map) -> scorer (map -> score);
what export declares and writes is adkit.core.exporting. docs/architecture.md describes it for plugin authors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from adkit.core import checkpoints
from adkit.core.backbone import Backbone  # the backbone contract, imported from here as before
from adkit.core.builder import ComponentBuilder
from adkit.core.exporting import Exportable, is_exporting


def check_images(images: Tensor, who: str = "detector") -> None:
    """Raise if ``images`` is not an image batch (B, 3, H, W) of floats."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{who} expects images (B, 3, H, W) float, got {tuple(images.shape)} {images.dtype}")


def check_map(anomaly_map: Tensor, who: str) -> None:
    """Raise if ``anomaly_map`` is not an anomaly map (B, 1, H, W) of floats."""
    if anomaly_map.ndim != 4 or anomaly_map.shape[1] != 1 or not anomaly_map.is_floating_point():
        raise ValueError(f"{who} expects an anomaly map (B, 1, H, W) float, got {tuple(anomaly_map.shape)}")


def upsample(maps: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of anomaly maps (N, 1, h, w) to ``size`` (no-op when already there)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return nn.functional.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


@dataclass
class DetectorContext:
    """What the engine tells a detector before training: where it runs and how to build other components."""

    build: ComponentBuilder
    image_size: int
    device: torch.device
    seed: int = 0
    losses: list[str] = field(default_factory=list)  # loss specs the user asked for
    replace_losses: bool = False  # True: ``losses`` replace the detector's defaults instead of adding to them
    sampler: str | None = None
    backbone: str | None = None  # backbone spec the user asked for (--backbone), for detectors that use one
    anomaly_source: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelledDefects:
    """Defective training images a line has labelled (a dataset's ``train_defects``): images (N, 3, H, W) in
    [0, 1], masks (N, 1, H, W) in {0, 1} (zeros where unknown) and ``masked`` (N,) bool, whether an image's mask
    is known (else only its label is: weak supervision); ``tiles`` rows in a row are one image's tiles."""

    images: Tensor
    masks: Tensor
    masked: Tensor
    tiles: int = 1  # consecutive rows per image (its tiles, where the geometry tiles)


@dataclass
class Detection:
    """What a detector returns for an image batch: the anomaly map (B, 1, h, w) and, for detectors that compute
    their own image scores from more than the map (PatchCore's re-weighted score needs the embeddings), the
    scores (B,); None lets the pipeline's scorer reduce the map."""

    anomaly_map: Tensor
    image_scores: Tensor | None = None


class LeftOutRows:
    """``Detector.leaving_out``'s training rows, read call after call: ``take(b)`` gives the parts (row // group)
    of the next ``b`` input rows and moves on. ValueError naming ``name`` when more rows are scored than were
    given, or, with ``whole_parts``, when a call holds part of a part."""

    def __init__(self, rows: Tensor, group: int, name: str):
        self.rows, self.group, self.name, self.done = rows.long(), int(group), name, 0

    def take(self, b: int, whole_parts: bool = False) -> Tensor:
        if self.done + b > self.rows.shape[0]:
            raise ValueError(f"{self.name}.leaving_out was given {self.rows.shape[0]} rows; {self.done + b} were scored")
        parts = self.rows[self.done:self.done + b] // self.group
        if whole_parts and (b % self.group or (parts.view(-1, self.group) != parts.view(-1, self.group)[:, :1]).any()):
            raise ValueError(f"{self.name}.leaving_out scores whole parts of {self.group} row(s) in order: "
                             f"{self.rows.shape[0]} rows given, {self.done} scored, {b} now")
        self.done += b
        return parts


class Detector(nn.Module, Exportable, ABC):
    """An anomaly detector. Gradient-trained detectors implement ``training_step`` (and keep ``trainable``
    True); statistical ones set ``trainable = False`` and implement ``fit``. Both implement ``anomaly_map``
    (or ``detect``, when they compute image scores of their own)."""

    trainable: ClassVar[bool] = True
    # one value per image (a (B, 1, 1, 1) map): no pixel-level opinion, so no pixel metrics
    image_level: ClassVar[bool] = False
    # detect() returns image scores of its own (Detection.image_scores), which replace the pipeline's scorer
    own_scores: ClassVar[bool] = False
    # update() adds normal images to the fitted state without refitting, exactly or by a stated rule (adkit update)
    updatable: ClassVar[bool] = False
    # learns from labelled defective images (a dataset's train_defects): on_train_start receives them as
    # ``defects`` (LabelledDefects); a detector without it refuses a dataset that holds some
    uses_defects: ClassVar[bool] = False
    # named settings for a run: {"quick": {"image_size": .., "batch_size": .., "steps": .., "params": {..}}}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # buffers whose shape depends on the data (a memory bank, per-position statistics): a checkpoint restores
    # them at the saved shape
    fitted_buffers: ClassVar[tuple[str, ...]] = ()
    # under torchrun, fit() sees only this rank's share of the training images and combines what every rank
    # collected itself (adkit.core.distributed.gather_sharded / all_reduce_sum), so all ranks end with the same state;
    # False: every rank fits on all images
    fit_shards: ClassVar[bool] = False
    # the run options this detector reads in setup(): a subset of {"loss", "sampler", "backbone",
    # "anomaly_source"}; a user who sets another one is told it is ignored
    consumes: ClassVar[frozenset[str]] = frozenset()
    # the post-processor specs (a chain) and scorer spec a run uses when the user names none
    default_postprocessors: ClassVar[tuple[str, ...]] = ()
    default_scorer: ClassVar[str] = "max"
    # which map pixel metrics read unless the user says (--pixel-map): the detector's own ("raw") or the
    # post-processed one ("post", for a detector whose default post-processing is part of its method)
    default_pixel_map: ClassVar[Literal["raw", "post"]] = "raw"

    def setup(self, context: DetectorContext) -> None:
        """Build what depends on the run (losses, samplers, backbones, image size); called once before training."""

    def on_train_start(self, images: Tensor, generator: torch.Generator) -> None:
        """Called once before the first training step with all training images (N, 3, H, W) on the CPU. A detector
        that declares ``uses_defects`` takes a third argument, ``defects`` (LabelledDefects or None)."""

    def training_step(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """One optimisation step's losses for an image batch; the key ``loss`` is minimised, others are logged.
        ``generator`` (on the images' device) drives every random draw, so a run is reproducible."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by gradient steps")

    def configure_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """The optimiser and an optional per-step learning-rate scheduler (None)."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by gradient steps")

    def fit(self, batches: Iterable[Tensor]) -> None:
        """Fit a statistical detector on batches of normal images (B, 3, H, W). The engine calls it in eval mode
        under ``torch.inference_mode``; a detector that declares ``uses_defects`` is given ``defects`` as well
        (LabelledDefects) where the dataset has labelled some."""
        raise NotImplementedError(f"{type(self).__name__} is trained by gradient steps, not fit()")

    def update(self, batches: Iterable[Tensor]) -> None:
        """Add batches of normal images (B, 3, H, W) to a fitted detector without refitting it from scratch
        (``adkit update``), for a detector that declares ``updatable``: merged moments, a memory bank extended by
        its selection rule. Called like ``fit`` (eval mode, inference mode; ``defects`` too where it declares
        ``uses_defects`` and labelled defects are added), then ``calibrate``."""
        raise NotImplementedError(f"{type(self).__name__} declares no update (updatable = False)")

    def calibrate(self, batches: Iterable[Tensor]) -> None:
        """Check an approximation against the exact path on held-out normal images (B, 3, H, W), after ``fit``:
        the validation split's normal images (the training images where there is none). A detector with an
        approximate path (a search index, a lower precision) measures its agreement here, falls back where it
        misses, keeps what it measured in its fitted state and reports it by ``approximations``. Called in eval
        mode under ``torch.inference_mode``; the default checks nothing."""

    def approximations(self) -> dict[str, Any]:
        """What approximate paths the fitted detector takes and how they measured against the exact ones, for the
        log, metrics.json, report.html and the model card: {name: {"summary": one line, ...}}, JSON values;
        {} for a detector without any."""
        return {}

    def can_leave_out(self, group: int = 1) -> bool:
        """Whether the fitted detector can score a training image (a part of ``group`` training rows: its tiles) as
        if it had not been fitted on it (``leaving_out``): scores that decision thresholds pool with the validation
        images'. Default: no."""
        return False

    def leaving_out(self, rows: Tensor, group: int = 1) -> AbstractContextManager[None]:
        """While the context is open, ``detect`` scores the input rows it is given, call after call, as the
        training rows ``rows[0]``, ``rows[1]``, ... (indices into the images ``fit`` took, in order), each as if
        its part had not been fitted on: the rows r with the same r // ``group`` (an image's tiles). Only where
        ``can_leave_out(group)``; eager mode only."""
        raise NotImplementedError(f"{type(self).__name__} cannot leave its training images out")

    @abstractmethod
    def anomaly_map(self, images: Tensor) -> Tensor:
        """Anomaly map (B, 1, h, w) for images (B, 3, H, W) in [0, 1]."""

    def detect(self, images: Tensor) -> Detection:
        """The map and, where the detector has them, its own image scores (default: the map alone)."""
        return Detection(self.anomaly_map(images))

    # -- checkpoints: what was trained or fitted, never the frozen pretrained weights -----------------------------

    def backbones(self) -> dict[str, Backbone]:
        """The frozen backbones inside this detector, by attribute path (a fine-tuned one trains: its weights
        belong in checkpoints like any other)."""
        return {name: module for name, module in self.named_modules()
                if isinstance(module, Backbone) and not any(p.requires_grad for p in module.parameters())}

    def backbone_identities(self) -> dict[str, dict[str, Any]]:
        """Per backbone: the spec it was built from and the digest of its weights, and the precision its forward
        pass runs at with what the check measured (stored in checkpoints: adkit.core.checkpoints.identities)."""
        return checkpoints.identities(self.backbones())

    def all_approximations(self) -> dict[str, Any]:
        """``approximations`` and, where a check chose it, the backbones' precision (``precision``)."""
        checks = [b.precision_check for b in self.backbones().values() if b.precision_check]
        if not checks:
            return self.approximations()
        check = checks[0]
        if is_exporting() and check.get("used") == "bf16":  # an exported graph is traced in float32
            check = {**check, "used": "fp32", "summary": f"float32 in the exported graph, with the threshold fitted "
                                                         f"on the checkpoint's bf16 scores ({check['summary']})"}
        return {**self.approximations(), "precision": check}

    def checkpoint_state(self) -> dict[str, Tensor]:
        """The state dict without the frozen backbones' tensors, on the CPU (adkit.core.checkpoints.frozen_state)."""
        return checkpoints.frozen_state(self, self.backbones())

    def load_checkpoint_state(self, state: dict[str, Tensor], identities: dict[str, dict[str, Any]],
                              where: str = "checkpoint") -> None:
        """Load ``checkpoint_state`` output after checking that this detector's backbones are the ones it was
        fitted with (adkit.core.checkpoints.load_state)."""
        checkpoints.load_state(self, self.backbones(), state, identities, where)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a fitted buffer takes the saved shape (its size depends on the data, unknown before fit)
        for name in self.fitted_buffers:
            saved = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if saved is not None and current is not None and saved.shape != current.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Loss(nn.Module):
    """A loss: ``forward(prediction, target)`` returns a scalar (0-dim) tensor, lower is better; the spec's
    ``weight`` is applied by the detector that sums its losses. What detectors pass: reconstruction losses
    (DRAEM's l2, ssim, color, psnr) get the reconstruction and the clean image, both (B, 3, H, W) in [0, 1];
    segmentation losses (focal) get logits (B, 2, H, W) and a mask (B, 1, H, W) in {0, 1}. Compute in float32
    (decorate ``forward`` with ``adkit.run.precision.in_float32``): networks may run under bf16 autocast. What a loss
    factory builds must derive from it (plugin API 3)."""


class PostProcessor(nn.Module, Exportable):
    """Maps an anomaly map (B, 1, H, W) to an anomaly map (B, 1, H', W'). Subclasses implement ``forward``."""


class Scorer(nn.Module, Exportable):
    """Reduces an anomaly map (B, 1, H, W) to image scores (B,). Subclasses implement ``forward``."""


class EnergyNetwork(nn.Module):
    """What samplers climb: ``forward`` maps inputs x in [-1, 1], images (B, C, H, W) or vectors (B, D), to f(x)
    (B,), high on data (the energy is E(x) = -f(x)). It declares where its first linear map is, which samplers
    such as PYLD-M-N step through cheaply: ``first_layer()``, the Conv2d or Linear whose output z1 the forward
    computes, and ``input_layer()``, the whole map from x to z1."""

    def first_layer(self) -> nn.Module:
        """The layer whose output is z1, called by ``forward``: by default the first Conv2d or Linear registered."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                return module
        raise ValueError(f"{type(self).__name__} has no Conv2d or Linear layer: override first_layer()")

    def input_layer(self) -> nn.Module:
        """The map from the network input x to z1: ``first_layer()`` itself, unless the network transforms x before
        it (a pretrained trunk normalises x first: override this to return that composition)."""
        return self.first_layer()


class Sampler(ABC):
    """Draws low-energy samples of an energy network (``EnergyNetwork``): samplers climb its f. They count their
    cost in ``full_passes`` (forward + backward through the whole network) and ``first_layer_passes``."""

    full_passes: int = 0
    first_layer_passes: int = 0

    @abstractmethod
    def sample(self, network: EnergyNetwork, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
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
