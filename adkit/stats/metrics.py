"""Anomaly-detection metrics computed as the field computes them.

Image AUROC / AP and pixel AUROC / AP come from scikit-learn. F1-max is the best F1 over all thresholds of the
precision-recall curve. AUPRO follows MVTec AD's evaluation code: connected components of each ground-truth mask
(8-connectivity); over all thresholds, PRO = mean over all regions of the dataset of the fraction of the region's
pixels scored >= threshold, FPR over all normal pixels; the PRO-vs-FPR curve is integrated with the trapezoid rule
from 0 to the limit (0.3), interpolating exactly at the limit, and divided by the limit.

Pixel metrics are exact: scores are kept as float32 (4 bytes per pixel, ~40 MB for a full MVTec category at
256 x 256) and labels as bool; nothing is binned.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else float("nan")


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise); NaN with one class."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    return float(average_precision_score(labels, scores)) if _both_classes(labels) else float("nan")


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over thresholds, the threshold reaching it); (NaN, NaN) with one class."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if not _both_classes(labels):
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best])


def pro_curve(anomaly_maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, as MVTec's ``compute_pro``: maps and masks (N, H, W)."""
    maps = np.asarray(anomaly_maps, dtype=np.float64)
    masks = np.asarray(masks) > 0.5
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"pro_curve expects maps and masks (N, H, W) of one shape, got {maps.shape}, {masks.shape}")
    fp_changes = np.zeros(maps.shape, dtype=np.float64)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    num_ok = int((~masks).sum())
    regions: list[tuple[int, np.ndarray]] = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        for region in range(1, count + 1):
            regions.append((i, labelled == region))
    if num_ok == 0 or not regions:
        raise ValueError("AUPRO needs both normal pixels and at least one anomalous region")
    fp_changes[~masks] = 1.0 / num_ok
    for i, region in regions:
        pro_changes[i][region] = 1.0 / (len(regions) * region.sum())
    order = np.argsort(maps.ravel(), kind="mergesort")[::-1]
    sorted_scores = maps.ravel()[order]
    fprs = np.cumsum(fp_changes.ravel()[order])
    pros = np.cumsum(pro_changes.ravel()[order])
    keep = np.append(np.diff(sorted_scores) != 0, True)  # last pixel of each distinct score
    fprs = np.clip(np.concatenate(([0.0], fprs[keep])), 0, 1)
    pros = np.clip(np.concatenate(([0.0], pros[keep])), 0, 1)
    # below every score all pixels are in: the curve ends at (1, 1), which the sums of 1 / n can miss by rounding
    fprs[-1], pros[-1] = 1.0, 1.0
    return fprs, pros


def trapezoid_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) from x[0] to ``x_max`` by the trapezoid rule, interpolating y exactly at ``x_max``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x_max > x[-1]:
        raise ValueError("x_max beyond the curve")
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max:
        i = int(np.searchsorted(x, x_max))  # first point past the limit
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def aupro(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``; NaN without anomalous regions."""
    masks = np.asarray(masks) > 0.5
    if not masks.any() or masks.all():
        return float("nan")
    fprs, pros = pro_curve(anomaly_maps, masks)
    return trapezoid_area(fprs, pros, fpr_limit) / fpr_limit


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    f1, _ = f1_max(labels, scores)
    return {"image_auroc": auroc(labels, scores), "image_ap": average_precision(labels, scores), "image_f1max": f1}


def pixel_metrics(anomaly_maps: np.ndarray, masks: np.ndarray, with_aupro: bool = True) -> dict[str, float]:
    """Pixel AUROC / AP / F1-max over all pixels, and AUPRO: maps and masks (N, H, W)."""
    maps = np.asarray(anomaly_maps, dtype=np.float32)
    labels = np.asarray(masks) > 0.5
    f1, _ = f1_max(labels.ravel(), maps.ravel())
    out = {"pixel_auroc": auroc(labels.ravel(), maps.ravel()), "pixel_ap": average_precision(labels.ravel(), maps.ravel()),
           "pixel_f1max": f1}
    if with_aupro:
        out["aupro"] = aupro(maps, labels)
    return out
