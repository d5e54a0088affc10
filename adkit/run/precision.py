"""Numerical precision: what ``--precision`` means for a run (``autocast``), losses kept in float32 under it
(``in_float32``), and bf16 backbones for fitted detectors on CPUs with bf16 instructions (``--precision auto``).

A fitted detector's frozen backbone (PatchCore, PaDiM) can run its forward pass under bf16 autocast, about twice as
fast on CPUs with AVX512-BF16 or AMX, while the banks, Gaussians and searches stay float32. Whether a model does is
decided once, after it is fitted, on the held-out normal images ``calibrate`` gets: the image scores are computed
with the backbone in float32 and in bf16, and bf16 is kept when

- bf16's rounding moves the held-out images' scores by at most MAX_NOISE of their own spread: the root mean
  square of the change over the float32 scores' standard deviation. The threshold is fitted on that spread, and a
  defect's distance from it is measured in it, so this bounds what bf16 can do to decisions and ranking (measured
  on the shared sets: 0.10-0.25, with test image AUROC within 0.001 of float32's), and
- bf16 is faster there by at least MIN_SPEEDUP (each batch scored at both precisions in turn, so that the
  machine's load falls on both alike),

else the backbone stays float32. The choice and what was measured go with the backbone's identity into the
checkpoint and show in the log, metrics.json, report.html and the model card (``precision``). Thresholds are then
fitted on the scores of the precision that runs. A checkpoint opened on a CPU without bf16 instructions runs float32.
ADKIT_CPU_BF16=0 (or 1) overrides what the CPU's flags say.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adkit.core.components import Detector
from adkit.core.errors import AdkitError

PRECISIONS = ("auto", "fp32", "bf16")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for ``bf16``, and for ``auto`` on CUDA; float32 otherwise. ``auto`` keeps the CPU's pipeline
    in float32: bf16 is slow on CPUs without bf16 instructions; on those with them (AVX512-BF16, AMX) a fitted
    detector's backbone alone runs bf16 where a check allows it (choose_backbone_precision)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether ``precision`` on ``device`` means bf16 autocast (see ``autocast``)."""
    if precision not in PRECISIONS:
        raise AdkitError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def in_float32(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorate a loss of two tensors, a function ``f(a, b, ...)`` or a method ``forward(self, a, b, ...)``, to
    compute in float32 with autocast off, whatever precision the network ran in; floating inputs are cast, others
    (integer masks) kept. Under bf16 autocast the blurs inside SSIM run in bf16, where var = E[x^2] - E[x]^2
    cancels catastrophically: the SSIM denominator reaches zero and the loss is NaN from the first step."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs) -> Tensor:
        lead = 0 if isinstance(args[0], Tensor) else 1  # a method's self comes first
        first, second = args[lead], args[lead + 1]
        with torch.autocast(first.device.type, enabled=False):
            pair = tuple(t.float() if t.is_floating_point() else t for t in (first, second))
            return loss(*args[:lead], *pair, *args[lead + 2:], **kwargs)

    return wrapper


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions
MAX_NOISE = 0.3
MIN_SPEEDUP = 1.1
MIN_IMAGES = 8  # fewer held-out images than this: no check, float32


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 instructions; ADKIT_CPU_BF16=0 or 1 overrides what the flags say."""
    forced = os.environ.get("ADKIT_CPU_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(BF16_FLAGS & cpu_flags())


def _set(detector: Detector, precision: str, record: dict[str, Any] | None) -> None:
    for backbone in detector.backbones().values():
        backbone.precision, backbone.precision_check = precision, record


def _paired_scores(detector: Detector, batches: Iterable[Tensor]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Image scores (the detector's own, else its map's maximum) with the backbones in float32 and in bf16, and
    the seconds each took. Both precisions score each batch in turn, the first one alternating, so that whatever
    else loads the machine falls on both alike: the speed-up is a paired measurement."""
    scores: dict[str, list[Tensor]] = {"fp32": [], "bf16": []}
    seconds = {"fp32": 0.0, "bf16": 0.0}
    for i, images in enumerate(batches):
        for precision in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
            _set(detector, precision, None)
            started = time.perf_counter()
            detection = detector.detect(images)
            own = detection.image_scores
            scores[precision].append((own if own is not None else detection.anomaly_map.flatten(1).amax(1)).float().cpu())
            seconds[precision] += time.perf_counter() - started
    fp32, bf16 = (torch.cat(scores[p]).double().numpy() if scores[p] else np.zeros(0) for p in ("fp32", "bf16"))
    return fp32, bf16, seconds["fp32"], seconds["bf16"]


def _warm_up(detector: Detector, batches: Iterable[Tensor], precision: str) -> None:
    """One batch through the detector at ``precision``: a backbone's first call at a precision pays its setup."""
    _set(detector, precision, None)
    first = next(iter(batches), None)
    if first is not None:
        detector.detect(first)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); 1.0 when both are constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0
    value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0


def choose_backbone_precision(detector: Detector, batches: Callable[[], Iterable[Tensor]], precision: str,
                              device: torch.device) -> None:
    """After a fit: with ``--precision auto`` on a CPU, decide the backbones' precision as the module
    docstring says. ``batches()`` yields the held-out normal images afresh each call. Other precisions, GPUs and
    trained detectors are left as they are (``--precision`` then applies to the whole pipeline)."""
    if precision != "auto" or device.type != "cpu" or detector.trainable or not detector.backbones():
        return
    if not cpu_has_bf16():
        _set(detector, "fp32", {"used": "fp32", "summary": "float32 backbone: this CPU has no bf16 instructions "
                                "(avx512_bf16, amx_bf16)"})
        return
    count = sum(images.shape[0] for images in batches())
    if count < MIN_IMAGES:
        _set(detector, "fp32", {"used": "fp32", "images": int(count),
                                "summary": f"float32 backbone: {count} held-out images are too few to check bf16 "
                                           f"(at least {MIN_IMAGES})"})
        return
    _warm_up(detector, batches(), "fp32")
    _warm_up(detector, batches(), "bf16")
    fp32, bf16, fp32_s, bf16_s = _paired_scores(detector, batches())
    spread = float(fp32.std())
    noise = float(np.sqrt(np.mean((bf16 - fp32) ** 2))) / spread if spread > 0 else \
        (0.0 if np.array_equal(bf16, fp32) else float("inf"))
    speedup = fp32_s / max(bf16_s, 1e-9)
    keep = noise <= MAX_NOISE and speedup >= MIN_SPEEDUP
    measured = (f"on {fp32.size} held-out images bf16 moves the scores by {noise:.3f} of their spread (RMS / std, "
                f"needs <= {MAX_NOISE}), {speedup:.2f}x the speed (needs >= {MIN_SPEEDUP})")
    record = {"used": "bf16" if keep else "fp32", "noise": round(noise, 6), "speedup": round(speedup, 3),
              "images": int(fp32.size), "spearman": round(rank_correlation(fp32, bf16), 6),
              "summary": ("bf16 backbone: " if keep else "float32 backbone: ") + measured}
    _set(detector, record["used"], record)


def precision_here(detector: Detector) -> None:
    """A restored detector whose backbones were checked into bf16 runs float32 on a CPU without bf16 instructions
    (bf16 there is emulated and slow); its record says so."""
    for backbone in detector.backbones().values():
        on_cpu = all(p.device.type == "cpu" for p in backbone.parameters())
        if backbone.precision == "bf16" and on_cpu and not cpu_has_bf16():
            backbone.precision = "fp32"
            earlier = (backbone.precision_check or {}).get("summary", "")
            backbone.precision_check = {**(backbone.precision_check or {}), "used": "fp32",
                                        "summary": f"float32 backbone here: this CPU has no bf16 instructions "
                                                   f"(where it was fitted: {earlier})"}
