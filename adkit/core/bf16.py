"""bf16 backbones for fitted detectors on CPUs with bf16 instructions (``--precision auto``; what ``--precision``
means for a whole run is adkit.run.precision).

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

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adkit.core.backbone import Backbone

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


Detect = Callable[[Tensor], Any]  # a fitted detector's detect: images -> its Detection


def _set(backbones: list[Backbone], precision: str, record: dict[str, Any] | None) -> None:
    for backbone in backbones:
        backbone.precision, backbone.precision_check = precision, record


def _paired_scores(detect: Detect, backbones: list[Backbone],
                   batches: Iterable[Tensor]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Image scores (the detector's own, else its map's maximum) with the backbones in float32 and in bf16, and
    the seconds each took. Both precisions score each batch in turn, the first one alternating, so that whatever
    else loads the machine falls on both alike: the speed-up is a paired measurement."""
    scores: dict[str, list[Tensor]] = {"fp32": [], "bf16": []}
    seconds = {"fp32": 0.0, "bf16": 0.0}
    for i, images in enumerate(batches):
        for precision in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
            _set(backbones, precision, None)
            started = time.perf_counter()
            detection = detect(images)
            own = detection.image_scores
            scores[precision].append((own if own is not None else detection.anomaly_map.flatten(1).amax(1)).float().cpu())
            seconds[precision] += time.perf_counter() - started
    fp32, bf16 = (torch.cat(scores[p]).double().numpy() if scores[p] else np.zeros(0) for p in ("fp32", "bf16"))
    return fp32, bf16, seconds["fp32"], seconds["bf16"]


def _warm_up(detect: Detect, backbones: list[Backbone], batches: Iterable[Tensor], precision: str) -> None:
    """One batch through the detector at ``precision``: a backbone's first call at a precision pays its setup."""
    _set(backbones, precision, None)
    first = next(iter(batches), None)
    if first is not None:
        detect(first)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); 1.0 when both are constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0
    value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0


def choose_backbone_precision(backbones: list[Backbone], detect: Detect, batches: Callable[[], Iterable[Tensor]],
                              precision: str, device: torch.device) -> None:
    """After a fit: with ``--precision auto`` on a CPU, decide the precision of a fitted detector's frozen
    ``backbones`` (Detector.backbones) as the module docstring says, scoring with its ``detect``. ``batches()``
    yields the held-out normal images afresh each call. Other precisions and GPUs are left as they are
    (``--precision`` then applies to the whole pipeline); trained detectors are not checked."""
    if precision != "auto" or device.type != "cpu" or not backbones:
        return
    if not cpu_has_bf16():
        _set(backbones, "fp32", {"used": "fp32", "summary": "float32 backbone: this CPU has no bf16 instructions "
                                "(avx512_bf16, amx_bf16)"})
        return
    count = sum(images.shape[0] for images in batches())
    if count < MIN_IMAGES:
        _set(backbones, "fp32", {"used": "fp32", "images": int(count),
                                "summary": f"float32 backbone: {count} held-out images are too few to check bf16 "
                                           f"(at least {MIN_IMAGES})"})
        return
    _warm_up(detect, backbones, batches(), "fp32")
    _warm_up(detect, backbones, batches(), "bf16")
    fp32, bf16, fp32_s, bf16_s = _paired_scores(detect, backbones, batches())
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
    _set(backbones, record["used"], record)


def precision_here(backbones: list[Backbone]) -> None:
    """A restored detector's frozen ``backbones``: one that its check put in bf16 runs float32 on a CPU without bf16
    instructions (bf16 there is emulated and slow), and its record says so."""
    for backbone in backbones:
        on_cpu = all(p.device.type == "cpu" for p in backbone.parameters())
        if backbone.precision == "bf16" and on_cpu and not cpu_has_bf16():
            backbone.precision = "fp32"
            earlier = (backbone.precision_check or {}).get("summary", "")
            backbone.precision_check = {**(backbone.precision_check or {}), "used": "fp32",
                                        "summary": f"float32 backbone here: this CPU has no bf16 instructions "
                                                   f"(where it was fitted: {earlier})"}
