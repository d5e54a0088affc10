"""The files a run leaves: per category metrics, scores, curves and overlays; the threshold predict reads beside
a checkpoint; summaries and bench tables. A folder's files are rendered first (pictures by adkit.outputs.report)
and then written, each atomically, by one call (adkit.core.files.write_files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from adkit.core import files
from adkit.core.grammar import PipelineSpec
from adkit.data.geometry import Geometry
from adkit.data.io import load_image
from adkit.data.loading import LoadedSplit
from adkit.outputs import pages, render, report
from adkit.run.evaluation import Evaluation
from adkit.stats import metrics
from adkit.stats.decisions import THRESHOLD_FILE, threshold_file

OVERLAY_SAMPLES = 8
DECISION_FILE = "decision.json"  # predict's threshold and policy
VALIDATION_FILE = "validation.json"  # a category's threshold fit and validation scores, for the report's slider


def write_category(test: LoadedSplit, category: str, evaluation: Evaluation, folder: Path,
                   threshold_for: tuple[PipelineSpec, str] | None = None) -> None:
    """metrics.json, validation.json, scores.csv, roc.png / pro.png, the gallery's thumbnails and overlays of a
    sample of test images, rendered first and then written in one call. With ``threshold_for`` (the pipeline the
    threshold holds for, and where it was fitted) the threshold.json that predict reads beside a checkpoint in this
    folder (decisions.threshold_file), too."""
    rows = test_score_rows(test, evaluation.test_scores, evaluation.decisions)
    contents = category_files(test, category, evaluation, threshold_for)
    files.write_files(folder, {"scores.csv": files.scores_table(rows), **contents})


def write_scored(folder: Path, test: LoadedSplit, scores: torch.Tensor, decisions: torch.Tensor | None,
                 result: dict[str, Any]) -> None:
    """scores.csv and metrics.json of image scores without maps (an ensemble's)."""
    files.write_files(folder, {"scores.csv": files.scores_table(test_score_rows(test, scores, decisions)),
                               "metrics.json": result})


def category_files(test: LoadedSplit, category: str, evaluation: Evaluation,
                   threshold_for: tuple[PipelineSpec, str] | None = None) -> dict[str, Any]:
    """A category's pictures and records (its path in the folder -> content; see files.encode), metrics.json last,
    so that a folder with metrics.json holds the rest (``threshold_for``: write_category's)."""
    maps = evaluation.pixel_maps
    contents = curve_files(test, category, evaluation)
    sampled = set(pages.round_robin([sample.defect for sample in test.samples], OVERLAY_SAMPLES))
    normal = test.labels == 0
    pixel_threshold = float(np.quantile(maps[normal].numpy(), 0.99)) if normal.any() else 0.5
    vmax = float(maps.max()) if maps.numel() else 1.0
    for i, sample in enumerate(test.samples):
        panel = report.overlay_panel(test.images[i], maps[i], pixel_threshold, vmax, test.masks[i])
        contents[f"{pages.THUMBS}/{i:05d}.jpg"] = report.thumbnail(panel)  # the report's gallery, every image
        if i in sampled:
            contents[f"overlays/{sample.defect}-{sample.path.stem}.png"] = report.png_bytes(panel)
    if evaluation.validation is not None:
        contents[VALIDATION_FILE] = evaluation.validation
        if threshold_for is not None:
            contents[THRESHOLD_FILE] = threshold_file(evaluation.validation, *threshold_for)
    contents["metrics.json"] = evaluation.metrics
    return contents


def test_score_rows(test: LoadedSplit, scores: torch.Tensor, decisions: torch.Tensor | None) -> list[dict[str, Any]]:
    """scores.csv's rows for a labelled split: each image's score, and its decision (blank without)."""
    return score_rows([s.path for s in test.samples], [s.label for s in test.samples], scores, decisions)


def score_rows(paths: list[Path], labels: list[Any], scores: torch.Tensor,
               decisions: torch.Tensor | None) -> list[dict[str, Any]]:
    """scores.csv rows: path, label ("" when unknown), score, and the decision (1 anomalous, 0 normal; blank
    without a threshold)."""
    marks = [""] * len(paths) if decisions is None else [int(d) for d in decisions]
    return [{"path": str(path), "label": label, "score": repr(float(score)), "prediction": mark}
            for path, label, score, mark in zip(paths, labels, scores, marks)]


def curve_files(test: LoadedSplit, category: str, evaluation: Evaluation) -> dict[str, Any]:
    """roc.png (image and pixel ROC) and pro.png (PRO against FPR, the 0.3 limit marked), where they can be drawn."""
    result, maps = evaluation.metrics, evaluation.pixel_maps
    labels = test.labels.numpy()
    masks = test.masks[:, 0].numpy() > 0.5
    curves, contents = [], {}
    if 0 < labels.sum() < labels.size:
        fpr, tpr, _ = roc_curve(labels, evaluation.test_scores.numpy())
        curves.append((f"image AUROC {result['image_auroc']:.3f}", fpr, tpr))
    if evaluation.pixel_level and masks.any() and not masks.all():
        fpr, tpr, _ = roc_curve(masks.ravel(), maps[:, 0].numpy().ravel())
        curves.append((f"pixel AUROC {result['pixel_auroc']:.3f}", fpr, tpr))
        fprs, pros = metrics.pro_curve(maps[:, 0].numpy(), masks)
        step = max(1, len(fprs) // 2000)
        contents["pro.png"] = report.png_bytes(report.curve_plot(
            [(f"AUPRO@0.3 {result['aupro']:.3f}", fprs[::step], pros[::step])], f"PRO curve, {category}", "FPR",
            "PRO", x_marker=0.3))
    if curves:
        contents["roc.png"] = report.png_bytes(report.curve_plot(curves, f"ROC, {category}", "FPR", "TPR"))
    return contents


def write_predictions(out: Path, loaded: LoadedSplit, maps: torch.Tensor, scores: torch.Tensor,
                      decisions: torch.Tensor | None, decision: dict[str, Any] | None, geometry: Geometry,
                      save_maps: bool = False) -> None:
    """predict's files: scores.csv (with decisions where a threshold is known), decision.json (the threshold and
    its policy, or null), overlays of the first images' maps (after the post-processors) at each image's own size,
    and with ``save_maps`` every map at the image's size as maps/<name>.npy (float32, higher = more anomalous)."""
    paths = [sample.path for sample in loaded.samples]
    vmax = float(maps.max())
    pixel_threshold = float(np.quantile(maps.numpy(), 0.99))
    for i, path in enumerate(paths):  # image by image: a folder of maps need not fit in memory
        placement = loaded.placements[i]
        own_size = geometry.to_original(maps[i], placement)
        image = loaded.images[i] if placement.original == geometry.size else load_image(path)
        panel = report.overlay_panel(image, own_size, pixel_threshold, vmax)
        pictures = {f"{pages.THUMBS}/{i:05d}.jpg": report.thumbnail(panel)}
        if i < OVERLAY_SAMPLES * 4:
            pictures[f"overlays/{path.stem}.png"] = report.png_bytes(panel)
        if save_maps:
            pictures[f"maps/{path.stem}.npy"] = report.npy_bytes(own_size[0].numpy().astype(np.float32))
        files.write_files(out, pictures)
    files.write_files(out, {"scores.csv": files.scores_table(score_rows(paths, [""] * len(paths), scores, decisions)),
                            DECISION_FILE: None if decision is None else
                            {k: decision.get(k) for k in ("threshold", "policy", "fit", "fitted_on")}})


def write_summary(out: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """summary.md, summary.json (config and per-category rows) and report.html with the figures it draws, in one
    call."""
    summary = {"config": config, "results": results}
    markdown = render.summary_markdown(results)
    page = pages.run_page_files(out, summary)
    files.write_files(out, {"summary.md": markdown, "summary.json": summary, **page})


BENCH_COLUMNS = ("configuration", "category", *render.METRIC_COLUMNS, "train_s", "infer_img_s")


def write_bench(out: Path, rows: list[dict[str, Any]]) -> None:
    """bench.md (the table), bench.json (every row) and bench.csv."""
    files.write_files(out, {"bench.md": render.bench_markdown(rows), "bench.csv": files.Table(list(BENCH_COLUMNS), rows),
                            "bench.json": rows})
