"""Pictures of results, rendered to bytes: heatmap overlays, PNG, JPEG and .npy contents, figures and curve plots
(adkit.core.files writes them, with the rest of a folder's outputs, in one call)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue -> green -> yellow -> red map for values in [0, 1]: (H, W) -> (H, W, 3)."""
    stops = np.array([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [0.0, 0.9, 0.6], [1.0, 0.9, 0.0], [0.9, 0.0, 0.0]])
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return stops[i] * (1 - t) + stops[i + 1] * t


def overlay_panel(image: torch.Tensor, anomaly_map: torch.Tensor, threshold: float, vmax: float,
                  mask: torch.Tensor | None = None) -> Image.Image:
    """Side by side: input | ground truth (if any) | heatmap over the input | thresholded prediction.
    image (3, H, W) in [0, 1]; anomaly_map (1, H, W); mask (1, H, W)."""
    img = image.permute(1, 2, 0).numpy()
    values = anomaly_map[0].numpy()
    heat = 0.5 * img + 0.5 * heat_colours(values / max(vmax, 1e-12))
    predicted = np.repeat((values > threshold)[..., None], 3, axis=2).astype(np.float32)
    panels = [img]
    if mask is not None:
        panels.append(np.repeat(mask[0].numpy()[..., None], 3, axis=2))
    panels += [heat, predicted]
    gap = np.ones((img.shape[0], 4, 3))
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    return Image.fromarray((np.clip(row, 0, 1) * 255 + 0.5).astype(np.uint8))


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy (no pickling: numbers only)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def new_figure(width: int, height: int) -> tuple[Any, Any]:
    """A matplotlib figure of ``width`` x ``height`` px and its axes, on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(figsize=(width / 100, height / 100), dpi=100)


def figure_png(figure: Any) -> bytes:
    """The figure laid out tightly as PNG bytes; the figure is closed."""
    from matplotlib import pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def curve_plot(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str, x_label: str, y_label: str,
               x_marker: float | None = None, size: int = 420) -> Image.Image:
    """A matplotlib line plot of ``curves`` (label, x, y) with x and y in [0, 1], a legend and an optional
    vertical marker (e.g. the AUPRO FPR limit), as a ``size`` x ``size`` px picture."""
    figure, axes = new_figure(size, size)
    for label, x, y in curves:
        axes.plot(x, y, label=label, linewidth=1.2)
    if x_marker is not None:
        axes.axvline(x_marker, color="grey", linestyle=":", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), title=title, xlabel=x_label, ylabel=y_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return Image.open(io.BytesIO(figure_png(figure))).convert("RGB")


def score_histogram(rows: list[dict[str, str]], threshold: float, band: tuple[float | None, ...],
                    category: str) -> bytes:
    """Scores of normal and defective test images, the threshold and (fpr policies) its 95 % band."""
    figure, axes = new_figure(420, 320)
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([r.get("label", "") for r in rows])
    bins = np.histogram_bin_edges(scores, bins=min(40, max(5, len(scores) // 4)))
    for value, name, colour in (("0", "normal", "tab:blue"), ("1", "defective", "tab:red")):
        if (labels == value).any():
            axes.hist(scores[labels == value], bins=bins, alpha=0.6, label=name, color=colour)
    axes.axvline(threshold, color="black", linestyle="--", label="threshold")
    if band and band[0] is not None:
        high = band[1] if band[1] is not None else max(float(scores.max()), threshold)
        axes.axvspan(band[0], high, color="grey", alpha=0.2,
                     label="95 % band" + ("" if band[1] is not None else " (open above)"))
    axes.set(title=f"test scores, {category}", xlabel="image score", ylabel="images")
    axes.legend(fontsize=8)
    return figure_png(figure)


def history_plot(rows: list[dict[str, str]], category: str) -> bytes:
    """Every logged training value (history.csv's rows, at least one) against the step."""
    figure, axes = new_figure(420, 320)
    steps = [float(r["step"]) for r in rows]
    for key in rows[0]:
        if key != "step":
            axes.plot(steps, [float(r[key]) if r[key] else np.nan for r in rows], label=key)
    axes.set(title=f"training, {category}", xlabel="step")
    axes.legend(fontsize=8)
    return figure_png(figure)


def thumbnail(panel: Any, height: int = 96) -> bytes:
    """A small JPEG of an overlay panel for the report's gallery."""
    width = max(1, round(panel.width * height / panel.height))
    buffer = io.BytesIO()
    panel.convert("RGB").resize((width, height)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
