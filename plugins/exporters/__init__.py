"""The built-in export formats: ONNX (for onnxruntime, outside Python too) and TorchScript."""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_exporters(register):
    from adkit_plugins.exporters.formats import Onnx, TorchScript

    register("onnx", Onnx, help="ONNX (torch.onnx dynamo exporter), run with onnxruntime: pip install 'adkit[onnx]'")
    register("torchscript", TorchScript, help="TorchScript (torch.jit.trace), run with torch alone")
