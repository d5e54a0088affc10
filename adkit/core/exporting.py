"""What export needs from components: the ``exportable`` declaration, the ``exporting()`` context (a component
with an eager-only fast path takes its traceable path inside it) and the ExportFormat contract of a file format."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Exportable:
    """What a component declares about export: ``exportable = False`` for one whose forward cannot be traced
    into a graph (data-dependent Python control flow, calls outside torch). Detectors, post-processors and scorers
    deriving from adkit's base classes inherit True. A component with a faster eager-only path (an approximate
    index) takes its traceable path while ``exporting()`` is true, for the trace and for the check against it."""

    exportable: ClassVar[bool] = True

    def export_note(self) -> str | None:
        """What the exported graph computes differently from the eager module, for model.json; None: nothing."""
        return None


_exporting = [False]


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """While ``adkit export`` traces a pipeline and checks the exported file against it."""
    _exporting.append(True)
    try:
        yield
    finally:
        _exporting.pop()


def is_exporting() -> bool:
    return _exporting[-1]


# an exported model run: images (B, 3, H, W) float32 and the threshold () float32 -> (maps, scores, decisions)
ExportedRun = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class ExportFormat(ABC):
    """A file format ``adkit export`` writes a deployed pipeline to, and ``adkit predict --model`` and ``adkit
    serve`` load back (registered by ``register_exporters``; ONNX and TorchScript are built-in plugins).

    The module given to ``write`` takes two inputs, ``images`` (B, 3, H, W) float32 in [0, 1] with a dynamic
    batch dimension and ``threshold`` () float32, and returns ``anomaly_map`` (B, 1, H, W), ``score`` (B,) and
    ``decision`` (B,) bool. ``load`` returns a function with the same contract whose outputs are CPU tensors.
    adkit checks every written file against the module at two batch sizes before the export folder appears."""

    # the model file's name inside the export folder (model.json names it too)
    file: ClassVar[str] = ""
    # what ``adkit export --quantize`` may ask of this format besides float32, e.g. ("int8",)
    quantizations: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def write(self, module: nn.Module, example: tuple[Tensor, Tensor], path: Path) -> None:
        """Trace or save ``module`` (run on ``example``) to ``path``; raise on failure (adkit names the cause)."""

    @abstractmethod
    def load(self, path: Path, device: torch.device) -> ExportedRun:
        """A function running the file at ``path`` on ``device``."""

    def quantize(self, path: Path, out: Path, scheme: str, scopes: Sequence[str],
                 calibration: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        """Write to ``out`` the file at ``path`` with the computations inside the modules ``scopes`` (qualified
        names in the exported module, e.g. ``pipeline.detector.backbone``: the frozen pretrained backbones)
        quantized by ``scheme``, one of ``quantizations``, calibrated on the module inputs (images, threshold)
        that ``calibration`` yields; everything else stays float32. Returns what was quantized, for model.json.
        adkit then checks the quantized file against the float one on the validation images (adkit.deploy.quantize)
        and refuses it when the scores or decisions drift beyond the stated bounds."""
        raise NotImplementedError(f"{type(self).__name__} declares no quantization")
