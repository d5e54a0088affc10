"""The files a run leaves: per category metrics, scores, curves and overlays; the threshold predict reads beside
a checkpoint; summaries and bench tables. Every file is written atomically (adkit.outputs.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from adkit.core import files
from adkit.core.datasets import Sample
from adkit.data.geometry import Geometry
from adkit.data.io import load_image
from adkit.data.loading import LoadedSplit
from adkit.outputs import pages, render, report
from adkit.run.evaluation import Evaluation
from adkit.stats import metrics

OVERLAY_SAMPLES = 8
DECISION_FILE = "decision.json"  # predict's threshold and policy
VALIDATION_FILE = "validation.json"  # a category's threshold fit and validation scores, for the report's slider


def write_category(test: LoadedSplit, category: str, evaluation: Evaluation, folder: Path) -> None:
    """metrics.json, scores.csv, roc.png / pro.png and overlays of a sample of test images."""
    result, maps = evaluation.metrics, evaluation.pixel_maps
    folder.mkdir(parents=True, exist_ok=True)
    files.write_json(folder / "metrics.json", result)
    if evaluation.validation is not None:
        files.write_json(folder / VALIDATION_FILE, evaluation.validation)
    write_curves(test, category, evaluation, folder)
    write_test_scores(folder / "scores.csv", test, evaluation.test_scores, evaluation.decisions)
    normal = test.labels == 0
    pixel_threshold = float(np.quantile(maps[normal].numpy(), 0.99)) if normal.any() else 0.5
    vmax = float(maps.max()) if maps.numel() else 1.0
    sampled = set(overlay_sample(test.samples))
    for i, sample in enumerate(test.samples):
        panel = report.overlay_panel(test.images[i], maps[i], pixel_threshold, vmax, test.masks[i])
        report.write_thumbnail(panel, folder / pages.THUMBS / f"{i:05d}.jpg")  # the report's gallery, every image
        if i in sampled:
            report.save_png_atomic(panel, folder / "overlays" / f"{sample.defect}-{sample.path.stem}.png")


def write_test_scores(path: Path, test: LoadedSplit, scores: torch.Tensor, decisions: torch.Tensor | None) -> None:
    """scores.csv of a labelled split: each image's score, and its decision (blank without)."""
    files.write_scores_csv(path, score_rows([s.path for s in test.samples], [s.label for s in test.samples], scores,
                                            decisions))


def score_rows(paths: list[Path], labels: list[Any], scores: torch.Tensor,
               decisions: torch.Tensor | None) -> list[dict[str, Any]]:
    """scores.csv rows: path, label ("" when unknown), score, and the decision (1 anomalous, 0 normal; blank
    without a threshold)."""
    marks = [""] * len(paths) if decisions is None else [int(d) for d in decisions]
    return [{"path": str(path), "label": label, "score": repr(float(score)), "prediction": mark}
            for path, label, score, mark in zip(paths, labels, scores, marks)]


def overlay_sample(samples: list[Sample], count: int = OVERLAY_SAMPLES) -> list[int]:
    """Indices of up to ``count`` test images, taken round-robin over defect types (normal images last)."""
    return pages.round_robin([sample.defect for sample in samples], count)


def write_curves(test: LoadedSplit, category: str, evaluation: Evaluation, folder: Path) -> None:
    """roc.png (image and pixel ROC) and pro.png (PRO against FPR, the 0.3 limit marked)."""
    result, maps = evaluation.metrics, evaluation.pixel_maps
    labels = test.labels.numpy()
    masks = test.masks[:, 0].numpy() > 0.5
    curves = []
    if 0 < labels.sum() < labels.size:
        fpr, tpr, _ = roc_curve(labels, evaluation.test_scores.numpy())
        curves.append((f"image AUROC {result['image_auroc']:.3f}", fpr, tpr))
    if evaluation.pixel_level and masks.any() and not masks.all():
        fpr, tpr, _ = roc_curve(masks.ravel(), maps[:, 0].numpy().ravel())
        curves.append((f"pixel AUROC {result['pixel_auroc']:.3f}", fpr, tpr))
        fprs, pros = metrics.pro_curve(maps[:, 0].numpy(), masks)
        step = max(1, len(fprs) // 2000)
        report.save_png_atomic(report.curve_plot([(f"AUPRO@0.3 {result['aupro']:.3f}", fprs[::step], pros[::step])],
                                                 f"PRO curve, {category}", "FPR", "PRO", x_marker=0.3),
                               folder / "pro.png")
    if curves:
        report.save_png_atomic(report.curve_plot(curves, f"ROC, {category}", "FPR", "TPR"), folder / "roc.png")


def write_predictions(out: Path, loaded: LoadedSplit, maps: torch.Tensor, scores: torch.Tensor,
                      decisions: torch.Tensor | None, decision: dict[str, Any] | None, geometry: Geometry,
                      save_maps: bool = False) -> None:
    """predict's files: scores.csv (with decisions where a threshold is known), decision.json (the threshold and
    its policy, or null), overlays of the first images' maps (after the post-processors) at each image's own size,
    and with ``save_maps`` every map at the image's size as maps/<name>.npy (float32, higher = more anomalous)."""
    paths = [sample.path for sample in loaded.samples]
    files.write_scores_csv(out / "scores.csv", score_rows(paths, [""] * len(paths), scores, decisions))
    files.write_json(out / DECISION_FILE, None if decision is None else
                      {k: decision.get(k) for k in ("threshold", "policy", "fit", "fitted_on")})
    vmax = float(maps.max())
    pixel_threshold = float(np.quantile(maps.numpy(), 0.99))
    for i, path in enumerate(paths):
        placement = loaded.placements[i]
        own_size = geometry.to_original(maps[i], placement)
        image = loaded.images[i] if placement.original == geometry.size else load_image(path)
        panel = report.overlay_panel(image, own_size, pixel_threshold, vmax)
        report.write_thumbnail(panel, out / pages.THUMBS / f"{i:05d}.jpg")
        if i < OVERLAY_SAMPLES * 4:
            report.save_png_atomic(panel, out / "overlays" / f"{path.stem}.png")
        if save_maps:
            report.save_npy_atomic(own_size[0].numpy().astype(np.float32), out / "maps" / f"{path.stem}.npy")


def write_summary(out: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """summary.json (config and per-category rows) and summary.md."""
    files.write_json(out / "summary.json", {"config": config, "results": results})
    files.write_text_atomic(out / "summary.md", render.summary_markdown(results))


BENCH_COLUMNS = ("configuration", "category", *render.METRIC_COLUMNS, "train_s", "infer_img_s")


def write_bench(out: Path, rows: list[dict[str, Any]]) -> None:
    """bench.md (the table), bench.json (every row) and bench.csv."""
    files.write_text_atomic(out / "bench.md", render.bench_markdown(rows))
    files.write_json(out / "bench.json", rows)
    files.write_csv(out / "bench.csv", list(BENCH_COLUMNS), rows)
