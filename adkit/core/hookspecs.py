"""The hooks a plugin implements to extend adkit.

Every component hook receives a ``register`` callable (see :class:`adkit.core.registry.Register`):

    register(name, factory, help="one line")

``factory`` is a class or function; its keyword parameters, with their type annotations and defaults, become the
parameters a user sets in a component spec such as ``draem:recon_width=32``. Plugins mark their implementations
with ``adkit.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from adkit.core.registry import Register

hookspec = pluggy.HookspecMarker("adkit")
hookimpl = pluggy.HookimplMarker("adkit")


@hookspec
def register_detectors(register: Register) -> None:
    """Register detectors: factories returning an :class:`adkit.core.components.Detector`.

    A detector turns an image batch (B, 3, H, W) in [0, 1] into an anomaly map (B, 1, h, w), higher = more
    anomalous. Gradient-trained detectors implement ``training_step``; statistical ones implement ``fit``.
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbones: factories returning an :class:`adkit.core.components.Backbone`, a frozen pretrained feature
    extractor that maps images (B, 3, H, W) in [0, 1] to the requested stages' features, each (B, C, H / s, W / s)
    for the stage's stride s. Detectors that work on pretrained features (``patchcore:backbone=NAME``) build them
    by name; a checkpoint names its backbone and a digest of its weights instead of storing them.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register losses: factories returning an ``nn.Module`` mapping ``(prediction, target)`` to a scalar.

    Every loss spec also accepts ``weight`` (float, default 1.0), applied by whoever sums the losses.
    """


@hookspec
def register_samplers(register: Register) -> None:
    """Register samplers: factories returning an :class:`adkit.core.components.Sampler`, which draws samples of
    low energy from an energy network ``(B, C, H, W) -> (B,)``."""


@hookspec
def register_postprocessors(register: Register) -> None:
    """Register post-processors: factories returning an :class:`adkit.core.components.PostProcessor`, which maps an
    anomaly map (B, 1, H, W) to another anomaly map (B, 1, H', W'); they chain in the order given."""


@hookspec
def register_scorers(register: Register) -> None:
    """Register scorers: factories returning an :class:`adkit.core.components.Scorer`, which reduces an anomaly map
    (B, 1, H, W) to image scores (B,)."""


@hookspec
def register_ensembles(register: Register) -> None:
    """Register ensemble scorers: factories returning an :class:`adkit.core.components.Ensemble`, which combines the
    image scores of several detectors after normalising each on held-out normal images."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: factories returning an :class:`adkit.data.AnomalyDataset` (train / validation / test
    splits of image paths with labels and masks)."""


@hookspec
def register_exporters(register: Register) -> None:
    """Register export formats: factories returning an :class:`adkit.core.exporting.ExportFormat`, which writes
    a deployed pipeline (images and threshold in; map, score and decision out) to one file and loads it back.
    ``adkit export --format NAME`` writes it; ``adkit predict --model`` and ``adkit serve`` read it by the name
    model.json records. Built-ins: ``onnx`` and ``torchscript``.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``adkit`` click group (``cli.command()`` or ``cli.add_command``)."""
