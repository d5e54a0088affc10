"""Deployment: a trained pipeline with its decision as one module (``Deployed``), what ``adkit predict`` runs from a
checkpoint and what ``adkit export`` writes in a registered export format (ONNX, TorchScript, or a plugin's), with
a model.json beside the file; and the loader that runs an exported file for ``adkit predict --model``. One module,
so the exported model and predict cannot drift apart. The threshold is an input of the module, not a constant inside it: model.json records the
fitted one and the validation scores it came from, so a line can move it without exporting again."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import adkit
from adkit.core.components import upsample
from adkit.core.errors import AdkitError
from adkit.core.exporting import Exportable, ExportFormat, exporting
from adkit.core.files import atomic_dir, write_json
from adkit.core.pipeline import Pipeline
from adkit.core.plugins import get_catalog
from adkit.data.geometry import Geometry
from adkit.deploy import quantize
from adkit.deploy.quantize import Quantization
from adkit.run.precision import autocast
from adkit.stats.thresholds import widest_gap

MODEL_JSON = "model.json"
# exported outputs must match the module they were traced from within this (maps relative to their largest value)
TOLERANCE = 1e-4

# images (B, 3, S, S), threshold (or None: no decisions) -> (maps, scores, decisions) on the CPU
Runner = Callable[[Tensor, "float | None"], tuple[Tensor, Tensor, Tensor]]


def threshold_input(threshold: float | None) -> Tensor:
    """The module's threshold input: a float32 scalar; NaN (every decision False) when there is none."""
    return torch.tensor(float("nan") if threshold is None else threshold, dtype=torch.float32)


class Deployed(nn.Module):
    """Images (B, 3, S, S) in [0, 1] and a threshold () float32 -> the anomaly map after the post-processors,
    upsampled to (B, 1, S, S), the image scores (B,) and the decisions score > threshold (B,) bool, compared in
    float32. A NaN threshold (none fitted) decides nothing: every decision is False."""

    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, images: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, processed, scores = self.pipeline(images)
        return upsample(processed, images.shape[-2:]), scores, scores.float() > threshold.float()


def export_format(name: str) -> ExportFormat:
    """The registered export format ``name``; one line naming the formats there are otherwise."""
    formats = get_catalog()["exporter"]
    if name not in formats:
        raise AdkitError(f"--format {name}: choose {' or '.join(formats.names()) or 'nothing (no format registered)'}")
    return formats.create(name)


def export(model: Deployed, fmt: str, out: Path, geometry: Geometry, decision: dict[str, Any],
           info: dict[str, Any], quantization: Quantization | None = None) -> Path:
    """Write ``model`` in the registered format ``fmt`` to ``out`` with model.json beside it (with ``decision``:
    the threshold, its policy and the validation scores it was fitted on); the folder appears whole or not at
    all. The exported file is run on check images at two batch sizes and must reproduce ``model``; with
    ``quantization`` its backbone is then quantized and must pass adkit.deploy.quantize's check."""
    writer = export_format(fmt)
    if out.exists():
        raise AdkitError(f"{out} exists: choose another --out (an export never overwrites)")
    blocked = model.pipeline.not_exportable()
    if blocked:
        raise AdkitError(f"cannot export: {', '.join(blocked)} declare(s) exportable = False")
    if quantization is not None:
        quantize.require(writer, fmt, model.pipeline, quantization.scheme)
    model = model.cpu().eval()
    with atomic_dir(out) as staging, exporting():
        path = staging / writer.file
        example = _check_images(2, geometry.size, seed=0)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracers' deprecation and tracer warnings are not the user's
                writer.write(model, (example, threshold_input(0.5)), path)
        except AdkitError:
            raise
        except Exception as exc:  # any tracer failure: name the components and the cause
            parts = ", ".join(type(p).__name__ for p in (model.pipeline.detector, *model.pipeline.postprocessors,
                                                         model.pipeline.scorer))
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise AdkitError(f"export to {fmt} failed for the pipeline {parts}: {type(exc).__name__}: {first}; one "
                             "of them cannot be traced (a plugin should declare exportable = False)") from exc
        runner = load_runner(path, fmt, torch.device("cpu"))
        for batch in (1, 3):  # another batch size than traced: the batch dimension must stay dynamic
            _compare(model, runner, _check_images(batch, geometry.size, seed=batch), fmt)
        quantized = {"scheme": "none"}
        if quantization is not None and quantization.scheme != "none":
            staged = path.with_name(f"{quantization.scheme}-{path.name}")
            scopes = quantize.quantized_scopes(model.pipeline)
            how = writer.quantize(path, staged, quantization.scheme, scopes,
                                  quantize.calibration_batches(quantization.calibration))
            quantized = quantize.check(runner, load_runner(staged, fmt, torch.device("cpu")), quantization,
                                       float(decision["threshold"]), how, fmt)
            staged.replace(path)
        parts = (model.pipeline.detector, *model.pipeline.postprocessors, model.pipeline.scorer)
        notes = [note for part in parts if isinstance(part, Exportable) and (note := part.export_note())]
        write_json(staging / MODEL_JSON, {**model_card(fmt, writer.file, geometry, decision), **info,
                                          "notes": notes, "quantization": quantized,
                                          "adkit_version": adkit.__version__,
                                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return out


RESIZE_TEXT = {"squash": "bilinear with antialiasing to {w}x{h}, aspect ratio not kept",
               "pad": "scaled to fit inside {w}x{h} keeping the aspect ratio (bilinear, antialiased), centred, the "
                      "rest filled by repeating the image's border pixels",
               "crop": "scaled to cover {w}x{h} keeping the aspect ratio (bilinear, antialiased), centre cut out"}


def model_card(fmt: str, file: str, geometry: Geometry, decision: dict[str, Any]) -> dict[str, Any]:
    """What a caller outside adkit needs to feed the model and read its outputs."""
    h, w = geometry.size
    return {
        "format": fmt, "file": file,
        "input": {"name": "images", "shape": ["batch", 3, h, w], "dtype": "float32",
                  "layout": "NCHW, RGB", "range": [0.0, 1.0],
                  "resize": RESIZE_TEXT[geometry.resize].format(w=w, h=h) + " (adkit's image loader)",
                  "normalisation": "none: pixel values / 255; the model normalises inside where its network needs it"},
        "inputs": {"images": "(batch, 3, S, S) float32 as 'input' says",
                   "threshold": "() float32: decisions are score > threshold; feed 'threshold' below, or your own "
                                "(NaN decides nothing)"},
        "geometry": geometry.as_dict(),
        "outputs": {"anomaly_map": f"(batch, 1, {h}, {w}) float32, after the post-processors, "
                                   "higher = more anomalous",
                    "score": "(batch,) float32 image score", "decision": "(batch,) bool, score > threshold"},
        "threshold": decision["threshold"],
        "threshold_policy": decision.get("policy"),
        "decision": decision,
    }


def _check_images(batch: int, size: tuple[int, int], seed: int) -> Tensor:
    """Images for tracing and checking: smooth random fields, so every detector sees image-like input."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.rand(batch, 3, max(2, h // 8), max(2, w // 8), generator=generator)
    fine = torch.rand(batch, 3, h, w, generator=generator)
    return (0.8 * upsample(coarse, (h, w)) + 0.2 * fine).clamp(0, 1)


def _compare(model: Deployed, runner: Runner, images: Tensor, fmt: str) -> None:
    """Maps and scores within TOLERANCE; decisions equal at a threshold between two of the scores (the middle
    of their widest gap), where the scores' agreement makes them meaningful."""
    with torch.inference_mode():
        expected = model(images, threshold_input(None))
    cut, _ = widest_gap(expected[1])
    got = runner(images, cut)
    scale = max(float(expected[0].abs().max()), 1e-12)
    map_error = float((got[0] - expected[0]).abs().max()) / scale
    score_error = float((got[1] - expected[1]).abs().max()) / max(float(expected[1].abs().max()), 1e-12)
    margin = TOLERANCE * max(float(expected[1].abs().max()), 1e-12)
    meaningful = (expected[1].float() - cut).abs() > margin
    if map_error > TOLERANCE or score_error > TOLERANCE or \
            not torch.equal(got[2][meaningful], (expected[1].float() > cut)[meaningful]):
        raise AdkitError(f"the exported {fmt} model differs from the pipeline at batch {len(images)} (maps by "
                         f"{map_error:.1e}, scores by {score_error:.1e} of their range, or in its decisions): not "
                         "written")


def eager_runner(model: Deployed, device: torch.device, precision: str = "auto") -> Runner:
    """A function running ``model`` itself (predict from a checkpoint, a served checkpoint): the same contract as
    an exported file's runner, outputs on the CPU."""
    model.to(device).eval()

    def run(images: Tensor, threshold: float | None) -> tuple[Tensor, Tensor, Tensor]:
        with torch.inference_mode(), autocast(device, precision):
            outputs = model(images.to(device), threshold_input(threshold).to(device))
        return tuple(t.cpu() for t in outputs)  # type: ignore[return-value]

    return run


def load_runner(path: Path, fmt: str, device: torch.device) -> Runner:
    """A function running the exported file ``path`` of the registered format ``fmt``."""
    run = export_format(fmt).load(path, device)

    def runner(images: Tensor, threshold: float | None) -> tuple[Tensor, Tensor, Tensor]:
        return run(images, threshold_input(threshold))

    return runner


def read_model(path: Path) -> tuple[Path, dict[str, Any]]:
    """The model file and its model.json, given either the export folder or the file in it."""
    folder = path if path.is_dir() else path.parent
    card_path = folder / MODEL_JSON
    if not card_path.is_file():
        raise AdkitError(f"{card_path} not found: --model takes the folder `adkit export` wrote (or the model file "
                         "in it)")
    card = json.loads(card_path.read_text())
    file = folder / card.get("file", "")
    formats = get_catalog()["exporter"]
    if card.get("format") not in formats and isinstance(card.get("format"), str) and file.is_file():
        raise AdkitError(f"{card_path}: format {card['format']!r} is not a registered export format (registered: "
                         f"{', '.join(formats.names())}); install the plugin that provides it")
    if card.get("format") not in formats or not file.is_file():
        raise AdkitError(f"{card_path} names no readable model ({card.get('format')!r}, {file.name}); export again")
    if "decision" not in card or "geometry" not in card:
        raise AdkitError(f"{card_path} was written by adkit {card.get('adkit_version', '?')}, whose models hold "
                         "their threshold inside: export the checkpoint again")
    return file, card
