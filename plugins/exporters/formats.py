"""ONNX and TorchScript as export formats (adkit.plugin.ExportFormat)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adkit.plugin import AdkitError, ExportedRun, ExportFormat

INPUTS = ("images", "threshold")
OUTPUTS = ("anomaly_map", "score", "decision")


def onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise AdkitError("ONNX needs onnxruntime, onnx and onnxscript: pip install 'adkit[onnx]'") from None
    return onnxruntime


class Onnx(ExportFormat):
    """model.onnx: traced by torch.onnx's dynamo exporter with a dynamic batch dimension; run by onnxruntime (the
    CUDA provider when the device is a GPU and onnxruntime has it)."""

    file = "model.onnx"

    def write(self, module: nn.Module, example: tuple[Tensor, Tensor], path: Path) -> None:
        onnxruntime()
        torch.onnx.export(module, example, str(path), dynamo=True, input_names=list(INPUTS),
                          output_names=list(OUTPUTS),
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}, "threshold": None},
                          verbose=False, external_data=False)

    def load(self, path: Path, device: torch.device) -> ExportedRun:
        ort = onnxruntime()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), options, providers=providers)

        def run(images: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            outputs = session.run(list(OUTPUTS), {"images": images.float().cpu().numpy(),
                                                  "threshold": threshold.float().cpu().numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)  # type: ignore[return-value]

        return run


class TorchScript(ExportFormat):
    """model.pt: torch.jit.trace of the module; loaded with torch alone (no adkit needed to run it)."""

    file = "model.pt"

    def write(self, module: nn.Module, example: tuple[Tensor, Tensor], path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; it still runs
            torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(path))

    def load(self, path: Path, device: torch.device) -> ExportedRun:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; it still runs
            module = torch.jit.load(str(path), map_location=device).eval()

        def run(images: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            with torch.inference_mode():
                maps, scores, decisions = module(images.to(device), threshold.to(device))
            return maps.cpu(), scores.cpu(), decisions.cpu()

        return run
