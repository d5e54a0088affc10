"""ONNX and TorchScript as export formats (adkit.plugin.ExportFormat)."""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adkit.plugin import AdkitError, ExportedRun, ExportFormat

INPUTS = ("images", "threshold")
OUTPUTS = ("anomaly_map", "score", "decision")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # the operations --quantize int8 quantizes inside the scopes it is given
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's record of the modules a node came from


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
    quantizations = ("int8",)

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

    def quantize(self, path: Path, out: Path, scheme: str, scopes: Sequence[str],
                 calibration: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        """onnxruntime's static quantization in the QDQ format: int8 weights per output channel and uint8
        activations, their ranges the minimum and maximum seen on ``calibration``; only the Conv, MatMul and Gemm
        nodes that the exporter recorded inside ``scopes``."""
        onnxruntime()
        import onnx
        from onnxruntime import quantization as q

        class Feeds(q.CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(calibration)

            def get_next(self) -> dict[str, Any] | None:
                batch = next(self.batches, None)
                return None if batch is None else dict(zip(INPUTS, (t.float().cpu().numpy() for t in batch)))

        nodes = [node for node in onnx.load(str(path)).graph.node
                 if node.op_type in QUANTIZED_OPS and _inside(node, scopes)]
        if not nodes:
            raise AdkitError(f"--quantize {scheme}: the exported graph has no {'/'.join(QUANTIZED_OPS)} node inside "
                             f"{', '.join(scopes)}; export with --quantize none")
        with _quiet():
            q.quantize_static(str(path), str(out), Feeds(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              nodes_to_quantize=[node.name for node in nodes],
                              calibrate_method=q.CalibrationMethod.MinMax)
        ops = Counter(node.op_type for node in nodes)
        return {"method": "onnxruntime static quantization (QDQ): int8 weights per output channel, uint8 activations, "
                          "ranges from min-max calibration",
                "quantized": {"scopes": list(scopes), "nodes": dict(sorted(ops.items()))}}


def _inside(node: Any, scopes: Sequence[str]) -> bool:
    """Whether the exporter recorded ``node`` inside one of the modules ``scopes``."""
    recorded = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), "[]")
    try:
        names = ast.literal_eval(recorded)
    except (ValueError, SyntaxError):
        return False
    return any(name == scope or name.startswith(scope + ".") for name in names for scope in scopes)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer's advice (run a pre-processing step first) goes to the root logger: not the user's."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


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
