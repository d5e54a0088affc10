"""Quantized exports (``adkit export --quantize int8``): the frozen pretrained backbone of a detector on
pretrained features is quantized by its export format (ONNX: onnxruntime's static QDQ quantization), calibrated
on training images; the banks, Gaussians, searches, post-processing and scoring stay float32. The quantized file
is written only when, on the validation images, it decides as the float export does:

- its scores move by at most MAX_NOISE of the good validation images' spread (the root mean square of the
  change over the float scores' standard deviation): the bound and the measure of the bf16 check of
  ``--precision auto`` (adkit.core.bf16), since the threshold was fitted on the float scores and a defect's
  distance from it is measured in that spread; at least MIN_IMAGES good validation images;
- every validation image whose float score lies farther from the threshold than that margin (MAX_NOISE of the
  spread) keeps its decision;
- where the validation images include defects, their image AUROC drops by at most MAX_AUROC_DROP.

Otherwise the export is refused in one line naming ``--quantize none``, with what was measured. What was
quantized, how it was calibrated, what the check measured and the two files' speed on the validation images go
into model.json (``quantization``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adkit.core.bf16 import MAX_NOISE, MIN_IMAGES
from adkit.core.errors import AdkitError
from adkit.core.exporting import ExportFormat
from adkit.core.pipeline import Pipeline
from adkit.stats.metrics import auroc

SCHEMES = ("none", "int8")
MAX_AUROC_DROP = 0.005
CALIBRATION_IMAGES = 64  # training images the activation ranges are taken from (a seeded sample)
BATCH = 8


@dataclass
class Quantization:
    """What ``adkit export --quantize`` asks: the scheme, the training images to calibrate on (``calibration``,
    (N, 3, H, W) in [0, 1], as the module takes them) and the validation images with their labels (1: defective)
    to check on; ``described`` says where they came from, for model.json."""

    scheme: str
    calibration: Tensor
    validation: Tensor
    labels: Tensor
    described: str


def quantized_scopes(pipeline: Pipeline) -> list[str]:
    """The module paths, inside ``Deployed``, of the frozen pretrained backbones a quantization may touch."""
    return [f"pipeline.detector.{name}" for name in pipeline.detector.backbones()]


def require(writer: ExportFormat, fmt: str, pipeline: Pipeline, scheme: str) -> None:
    """One line, before anything is read or written, when ``scheme`` cannot be asked of this format or pipeline."""
    if scheme not in SCHEMES:
        raise AdkitError(f"--quantize {scheme}: choose {' or '.join(SCHEMES)}")
    if scheme == "none":
        return
    if scheme not in writer.quantizations:
        offered = f"it offers {', '.join(writer.quantizations)}" if writer.quantizations else "it writes float32 only"
        raise AdkitError(f"--quantize {scheme}: format {fmt} cannot ({offered}); use --format onnx, or --quantize none")
    if not quantized_scopes(pipeline):
        raise AdkitError(f"--quantize {scheme} quantizes a detector's frozen pretrained backbone and "
                         f"{type(pipeline.detector).__name__} has none; use --quantize none")


def calibration_batches(images: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """The module's inputs for calibration: ``images`` in batches, no threshold (NaN)."""
    for start in range(0, len(images), BATCH):
        yield images[start:start + BATCH], torch.tensor(float("nan"))


def scores_and_speed(runner: Any, images: Tensor) -> tuple[np.ndarray, float]:
    """The image scores of ``runner`` (images, threshold -> maps, scores, decisions) on ``images`` in batches of
    BATCH, and its images per second (after one warm-up batch)."""
    runner(images[:BATCH], None)
    scores, started = [], time.perf_counter()
    for start in range(0, len(images), BATCH):
        scores.append(runner(images[start:start + BATCH], None)[1].double())
    return torch.cat(scores).numpy(), len(images) / max(time.perf_counter() - started, 1e-9)


def drift(reference: np.ndarray, quantized: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """What the quantization does on the validation images, against the bounds of the module docstring: ``ok``
    and the figures (the noise over the good images' spread, the decisions changed outside the margin, the
    AUROC of both where there are defects)."""
    good = labels == 0
    if int(good.sum()) < MIN_IMAGES:
        return {"ok": False, "images": len(labels),
                "summary": f"cannot be checked: {int(good.sum())} good validation images are too few (at least "
                           f"{MIN_IMAGES})"}
    spread = float(reference[good].std())
    change = float(np.sqrt(np.mean((quantized[good] - reference[good]) ** 2)))
    noise = change / spread if spread > 0 else (0.0 if change == 0 else float("inf"))
    margin = MAX_NOISE * spread
    outside = np.abs(reference - threshold) > margin
    changed = int(((quantized > threshold) != (reference > threshold))[outside].sum())
    record: dict[str, Any] = {"images": len(labels), "defects": int((~good).sum()), "noise": round(noise, 4),
                              "max_noise": MAX_NOISE, "decisions_changed": changed,
                              "decided_outside_margin": int(outside.sum())}
    failures = []
    if noise > MAX_NOISE:
        failures.append(f"moves the scores by {noise:.2f} of the good images' spread (bound {MAX_NOISE})")
    if changed:
        failures.append(f"changes {changed} of {int(outside.sum())} decisions outside the margin")
    if good.any() and (~good).any():
        before, after = auroc(labels, reference), auroc(labels, quantized)
        record.update(auroc=round(before, 4), auroc_quantized=round(after, 4))
        if before - after > MAX_AUROC_DROP:
            failures.append(f"drops the image AUROC from {before:.4f} to {after:.4f} (bound {MAX_AUROC_DROP})")
    record["ok"] = not failures
    record["summary"] = "; ".join(failures) if failures else (
        f"moves the scores by {noise:.3f} of the good images' spread (bound {MAX_NOISE}), no decision outside the "
        "margin changed" + (f", image AUROC {record['auroc']:.4f} -> {record['auroc_quantized']:.4f}"
                            if "auroc" in record else ""))
    return record


def check(reference: Any, quantized: Any, request: Quantization, threshold: float, scheme_record: dict[str, Any],
          fmt: str) -> dict[str, Any]:
    """The quantized runner against the float one on the request's validation images: model.json's
    ``quantization`` record, or one line refusing it."""
    labels = request.labels.numpy().astype(int)
    before, float_speed = scores_and_speed(reference, request.validation)
    after, speed = scores_and_speed(quantized, request.validation)
    measured = drift(before, after, labels, threshold)
    if not measured["ok"]:
        raise AdkitError(f"--quantize {request.scheme}: on {measured['images']} validation images the {request.scheme} "
                         f"{fmt} model {measured['summary']}: not written; export with --quantize none")
    return {"scheme": request.scheme, **scheme_record, "calibration": request.described,
            "check": {**measured, "images_per_second": round(speed, 1),
                      "float_images_per_second": round(float_speed, 1)}}
